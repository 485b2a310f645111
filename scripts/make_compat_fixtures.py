"""Write tests/data/compat/: on-disk files as an OLDER selfspec writes them, for tests/test_compat.py.

Run it with the old code on PYTHONPATH (the version before the package restructure, commit
1eaeb31), from this repository's root:

    git worktree add --detach /tmp/old 1eaeb31
    PYTHONPATH=/tmp/old python scripts/make_compat_fixtures.py

It writes, all for one tiny random Llama shipped in the fixture (so every recorded identity can be
recomputed):
  model/            the HF folder: config.json, model.safetensors, a byte-level tokenizer (+ chat template)
  skip.json         `selfspec search` output (a layer-skip SkipConfig)
  online-skip.json  `--skip-config online --save-skip-config` output
  medusa/           `selfspec train-drafter --kind medusa` (drafter.safetensors + drafter.json)
  datastore/        `selfspec datastore build` (tokens.npy, suffixes.npy, meta.json)
  cache/online/     the online-skip cache entry
  cache/costs/      the costs entry `--draft auto` calibrated
  cache/weights/    the weight-cache entry of the fp32 load
  MANIFEST.json     which commit wrote them and the commands run
The old version had no `rows.json` probe and no C kernels: those cache kinds have no old files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "compat"
SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "The capital of France is Paris. The capital of",
           "import os\nimport sys\n\nfor name in os.listdir", "Once upon a time there was a"]
CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + fibonacci({i})\n\n" for i in range(40))


def old_version() -> str:
    """The commit of the selfspec on PYTHONPATH; refuses the current layout (it must be the old one)."""
    if importlib.util.find_spec("selfspec.cachedir") is None:
        sys.exit("run with the OLD selfspec on PYTHONPATH (commit 1eaeb31, before the restructure)")
    import selfspec

    src = Path(selfspec.__file__).resolve().parent.parent
    return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


def build_model(folder: Path) -> None:
    """A tiny random Llama (2 query heads over 1 KV head, 4 layers) with a byte-level tokenizer of
    256 bytes + 2 specials; every parameter perturbed so no weight is a trivial identity."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # a set: sort it
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=SPECIALS)
    fast.chat_template = CHAT_TEMPLATE
    config = tf.LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(23)
    model = tf.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if p.dim() == 1:
                p.add_(1.0)  # norms around 1, not 0
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(str(folder))
    (folder / "generation_config.json").unlink(missing_ok=True)


def main() -> None:
    commit = old_version()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    model = OUT / "model"
    build_model(model)
    work = Path(tempfile.mkdtemp(prefix="selfspec-compat-"))
    cache = work / "cache"
    env = {**os.environ, "SELFSPEC_CACHE": str(cache), "PYTHONHASHSEED": "0"}
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (work / "corpus").mkdir()
    (work / "corpus" / "code.py").write_text(CORPUS)
    commands = []

    def old(*args: str) -> None:
        cmd = [sys.executable, "-c", "from selfspec.cli import main; main()", *args]
        commands.append(["selfspec", *(a.replace(str(OUT), "tests/data/compat").replace(str(work), "$TMP")
                                       for a in args)])
        print("+", " ".join(commands[-1]), file=sys.stderr)
        subprocess.run(cmd, env=env, check=True, cwd=work, stdout=subprocess.DEVNULL)

    m = ["--model", str(model)]
    old("search", *m, "--out", str(OUT / "skip.json"), "--prompts", str(work / "prompts.jsonl"),
        "--trials", "4", "-n", "8", "--objective", "match_rate", "--dtype", "fp32", "--threads", "1")
    old("train-drafter", *m, "--kind", "medusa", "--heads", "2", "--out", str(OUT / "medusa"),
        "--data", str(work / "prompts.jsonl"), "--self-distill", "2", "--distill-tokens", "24",
        "--steps", "3", "--batch", "2", "--window", "16", "--dtype", "fp32", "--threads", "1")
    shutil.rmtree(OUT / "medusa" / "checkpoint", ignore_errors=True)
    old("datastore", "build", *m, "--corpus", str(work / "corpus"), "--out", str(OUT / "datastore"))
    # Online skip search: enough tokens for the optimisation to score sets and cache its state.
    old("generate", *m, "--prompt", CORPUS[:120], "-n", "96", "--draft", "layer-skip", "--skip-config",
        "online:window=16", "--save-skip-config", str(OUT / "online-skip.json"), "--dtype", "fp32",
        "--threads", "1", "--no-chat", "--json")
    # --draft auto calibrates forward costs (the costs entry); the fp32 load writes the weight cache.
    old("generate", *m, "--prompt", PROMPTS[0], "-n", "8", "--draft", "auto", "--dtype", "fp32",
        "--threads", "1", "--no-chat", "--json")
    for kind in ("online", "costs", "weights"):
        if (cache / kind).is_dir():
            shutil.copytree(cache / kind, OUT / "cache" / kind)
        else:
            print(f"note: the old version wrote no {kind} cache entry", file=sys.stderr)
    (OUT / "MANIFEST.json").write_text(json.dumps(
        {"written_by": f"selfspec {commit}", "script": "scripts/make_compat_fixtures.py",
         "commands": commands, "cache_kinds": sorted(p.name for p in (OUT / "cache").iterdir())}, indent=1) + "\n")
    shutil.rmtree(work)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 2**10:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
