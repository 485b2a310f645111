"""`--device`: the pipeline honours the device it is given, creates every decoding tensor on the
model's device, and says plainly when CUDA is not there. These run without a GPU: a second
device is simulated with PyTorch's `meta` device (shapes only, no data), on which any tensor
made on the CPU by mistake fails loudly when it meets the model's tensors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from lossless import truncated_copy
from selfspec.hardware import check_cpu_only, device_dtype, resolve_device
from selfspec.drafters.auto import AutoDrafter
from selfspec.drafters.draft_model import DraftModelDrafter
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import NgramDrafter
from selfspec.drafters.anpd import AdaptiveNgramDrafter
from selfspec.drafters.swift import OnlineSkipDrafter
from selfspec.drafters.quantized import QuantizedSelfDrafter
from selfspec.errors import InvalidParameterError, SelfspecError
from selfspec.generation import generate
from selfspec.models.loading import Model, load_model, load_transformer
from selfspec.models.transformer import SkipSet, Transformer
from selfspec.prefix import PrefixCache
from selfspec.sampling import SamplingParams
from tiny import FakeTokenizer, build_tiny, one_thread

PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8, 5, 17]
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny("gemma3", tmp_path_factory.mktemp("gemma3"))[1]  # sliding windows, dual RoPE, qk-norm


def _model(folder, device="cpu", dtype=torch.float32) -> Model:
    tr = load_transformer(folder, dtype, 96, weight_cache=False, device=device)
    return Model(name="gemma3", path=folder, config=tr.config, transformer=tr, tokenizer=FakeTokenizer(tr.config.vocab_size),
                 dtype="fp32", ctx_size=tr.rope_max, load_seconds=0.0)


def _tensors(tr) -> dict[str, torch.Tensor]:
    """Every tensor a decoder holds: weights (packed or not), norms, RoPE tables, scales."""
    out = {"embed": tr.embed, "final_norm": tr.final_norm, "embed_scale": tr.embed_scale,
           **{f"rope_global{i}": t for i, t in enumerate(tr.rope_global)},
           **{f"rope_local{i}": t for i, t in enumerate(tr.rope_local)}}
    linears = {"lm_head": tr.lm_head}
    for i, layer in enumerate(tr.layers):
        for f in dataclasses.fields(layer):
            v = getattr(layer, f.name)
            if isinstance(v, torch.Tensor):
                out[f"L{i}.{f.name}"] = v
            elif v is not None:
                linears[f"L{i}.{f.name}"] = v
    for name, lin in linears.items():
        for part, v in vars(lin).items():
            if isinstance(v, torch.Tensor):
                out[f"{name}.{part}"] = v
    return out


# ------------------------------------------------------------------------------ resolving
def test_auto_resolves_to_what_torch_sees():
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(SelfspecError, match=r"CUDA is not available: torch .* use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(SelfspecError, match="CUDA is not available"):
        load_model("smollm2-135m", device="cuda")  # before any file is read


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", "CPU"])
def test_unknown_device_is_refused(bad):
    with pytest.raises(InvalidParameterError, match="--device"):
        resolve_device(bad)


def test_dtype_per_device():
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert device_dtype("auto", cuda) == "bf16" and device_dtype("fp32", cuda) == "fp32"
    for q in ("int8", "int4"):
        assert device_dtype(q, torch.device("cpu")) == q
        with pytest.raises(InvalidParameterError, match=f"--dtype {q} is CPU-only"):
            device_dtype(q, cuda)
    assert device_dtype("auto", torch.device("cpu")) == "auto"  # machine.resolve_dtype decides on a CPU


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["bench", "--out", "{tmp}"],
                                     ["search", "--out", "{tmp}/s.json"], ["serve"], ["chat"]])
def test_cli_device_cuda_without_cuda(command, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", *args, "--device", "cuda", "--model", "smollm2-135m"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CUDA is not available") and "--device cpu" in last, proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------- the model's device
def test_explicit_cpu_end_to_end(folder):
    """device="cpu" end to end: every tensor of the model, its cache and a generation's stats."""
    model = _model(folder, "cpu")
    assert model.device == torch.device("cpu")
    bad = {n: t.device for n, t in _tensors(model.transformer).items() if t.device.type != "cpu"}
    assert not bad
    cache = model.fresh_cache()
    assert cache.k.device.type == cache.v.device.type == "cpu"
    r = generate(model, PROMPT, drafter=NgramDrafter(), max_new_tokens=12)
    assert len(r.token_ids) == 12 and r.stats.to_dict()["device"] == "cpu"


def test_forward_on_another_device(folder):
    """A decoder loaded onto the meta device: each forward kind (prefill with masks, one token,
    skipped sub-layers, a draft head, an early exit) runs there; a tensor made on the CPU inside
    the forward (a mask, a RoPE table, a scale) would raise on meeting the model's."""
    model = _model(folder, "meta")
    tr = model.transformer
    assert {t.device.type for t in _tensors(tr).values()} == {"meta"}
    cache = model.fresh_cache()
    assert cache.k.device.type == "meta"
    ids = torch.tensor(PROMPT, device="meta")
    vocab = model.config.vocab_size
    assert tr.forward(ids, 0, cache).shape == (len(PROMPT), vocab)
    logits = tr.forward(ids[:1], len(PROMPT), cache)
    assert logits.device.type == "meta" and logits.dtype == torch.float32 and logits.shape == (1, vocab)
    assert tr.forward(ids[:4], len(PROMPT) + 1, cache, skip=SkipSet.of([1], [2]), last_only=True).shape == (1, vocab)
    assert tr.forward(ids[:3], 2, cache, exit_layer=2).shape == (3, model.config.hidden)
    logits, hidden = tr.forward(ids[:2], 5, cache, return_hidden=True)
    assert logits.device.type == hidden.device.type == "meta"


def test_quantized_is_cpu_only(folder):
    model = _model(folder, "meta")
    with pytest.raises(InvalidParameterError, match="--draft quantized is CPU-only"):
        QuantizedSelfDrafter.for_model(model)
    with pytest.raises(InvalidParameterError, match="CPU-only"):
        load_transformer(folder, torch.float32, 96, weight_bits=8, weight_cache=False, device="meta")
    with pytest.raises(InvalidParameterError, match="CPU-only"):
        check_cpu_only("x", torch.device("cuda"))
    check_cpu_only("x", torch.device("cpu"))


def _drafters(model):
    config = SkipConfig(model=model.name, n_layers=model.config.n_layers, attention=(1,), mlp=(2,))
    return {
        "none": lambda: None,
        "ngram": lambda: NgramDrafter(max_draft=4),
        "ngram-tree": lambda: NgramDrafter(max_draft=4, tree=3),
        "ngram-adaptive": lambda: AdaptiveNgramDrafter(max_draft=4),
        "online-skip": lambda: OnlineSkipDrafter.for_model(model, "online:window=8:cache=0:max_iter=4", max_draft=4),
        "layer-skip": lambda: LayerSkipDrafter(config, max_draft=4),
        "layer-skip-subset-head": lambda: LayerSkipDrafter(config, max_draft=4, draft_vocab=40),
        "quantized": lambda: QuantizedSelfDrafter.for_model(model, bits=8),
        "model": lambda: DraftModelDrafter(truncated_copy(model, 2), max_draft=3),
        "auto": lambda: AutoDrafter.for_model(model, config, max_draft=4),
    }


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=3),
                                      SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3, seed=4)],
                         ids=["greedy", "top-k", "top-p+penalty"])
def test_decoding_creates_every_tensor_on_the_model_device(folder, sampling, monkeypatch, tmp_path):
    """Generate with the default device set to `meta`: a tensor created during decoding without
    an explicit device lands there and fails on meeting the model's CPU tensors (or on being
    read). Every drafter, and the prefix cache, must give the same tokens as outside it."""
    import selfspec.drafters.vocab as vocab

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))  # auto's cost calibration is written there
    # The subset head's frequency ranking needs a real tokenizer: the first ids instead.
    monkeypatch.setattr(vocab, "frequency_ranking", lambda model: list(range(40)))
    # Indexing a CPU tensor with a meta one reads garbage instead of failing (torch 2.13): the
    # forward's token ids are checked here, where the embedding would read them.
    forward = Transformer.forward

    def checked(self, tokens, *args, **kwargs):
        assert tokens.device == self.device, f"forward input on {tokens.device}, model on {self.device}"
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", checked)
    model = _model(folder, "cpu")
    for name, make in _drafters(model).items():
        ref = generate(model, PROMPT, drafter=make(), sampling=sampling, max_new_tokens=16)
        drafter = make()  # built outside: loading and quantising are not decoding
        prefix = PrefixCache(model, budget_bytes=1 << 20)
        with torch.device("meta"):
            got = generate(model, PROMPT, drafter=drafter, sampling=sampling, max_new_tokens=16)
            again = generate(model, PROMPT + [7], drafter=drafter, sampling=sampling, max_new_tokens=4, prefix=prefix)
            generate(model, PROMPT + [9], drafter=drafter, sampling=sampling, max_new_tokens=4, prefix=prefix)
            reused = generate(model, PROMPT + [7], drafter=drafter, sampling=sampling, max_new_tokens=4, prefix=prefix)
        if sampling.greedy or name != "auto":  # auto's choices follow measured times; its samples may differ
            assert got.token_ids == ref.token_ids, name
        assert reused.stats.extras["cached_prompt_tokens"] > 0, name
        if sampling.greedy:
            assert reused.token_ids == again.token_ids, name
        assert got.stats.to_dict()["device"] == "cpu"


@pytest.mark.slow
def test_gpu_check_script_short_on_cpu(tmp_path):
    """scripts/gpu_check.sh in its short mode with --device cpu: every step runs and passes."""
    import json
    import os
    from pathlib import Path

    from selfspec.models.registry import REGISTRY

    if not REGISTRY["smollm2-135m"].installed:
        pytest.skip("smollm2-135m is not installed")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GPU_CHECK_SHORT": "1", "PYTHON": sys.executable, "DTYPE": "bf16"}
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "cpu", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and report["device"] == "cpu" and report["short"]
    assert [p["dtype"] for p in report["parity"]] == ["fp32", "bf16"] and all(p["ok"] for p in report["parity"])
    assert {k: v["status"] for k, v in report["lossless_fp32"].items()} == dict.fromkeys(
        ["none", "layer-skip", "ngram", "auto", "model", "quantized"], "ok")
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["machine"]["device"] == "cpu"
    assert {m["method"]: m["status"] for m in results["methods"]} == {"ar": "ok", "layer-skip": "ok", "ngram": "ok"}
    assert all(r["same_as_plain"] for r in results["runs"])
