"""The command line, run as a user runs it (a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "selfspec.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    assert "generate" in proc.stdout and "models" in proc.stdout


def test_models_json():
    proc = run("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["alias"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["models"]}
    assert rows["smollm2-135m"]["arch"] == "llama" and rows["smollm2-135m"]["layers"] == 30
    assert rows["gemma3-270m"]["arch"] == "gemma3" and rows["gemma3-270m"]["layers"] == 18


@pytest.mark.parametrize("args, needles", [
    (["--temperature", "-1"], ["temperature"]),
    (["--top-p", "0"], ["top_p"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--top-k", "-3"], ["top_k"]),
    (["--repetition-penalty", "0"], ["repetition_penalty"]),
    (["--model", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf"]),
    (["--model", "no-such-alias"], ["no-such-alias", "smollm2-135m"]),
    (["--draft", "magic"], ["--draft", "magic"]),
    (["--dtype", "fp8"], ["--dtype", "fp8"]),
])
def test_bad_input_fails_with_one_line(args, needles):
    assert_user_error(run("generate", "--prompt", "hi", *args), *needles)


def test_empty_prompt():
    assert_user_error(run("generate", "--prompt", "   "), "empty")


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    assert_user_error(run("generate", "--model", str(bad), "--prompt", "hi"), "GGUF")
    from selfspec.models.registry import REGISTRY

    real = REGISTRY["smollm2-135m"].path()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real.read_bytes()[: 3 << 20])  # header and part of the tensors
    assert_user_error(run("generate", "--model", str(cut), "--prompt", "hi"), "cut.gguf")


def test_generate_json_and_over_long_prompt(tmp_path):
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "Say hello.", "-n", "12", "--draft", "none",
               "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"}
    assert out["finish_reason"] in ("stop", "length")
    assert 0 < len(out["token_ids"]) <= 12 and out["stats"]["new_tokens"] == len(out["token_ids"])
    for key in ("prompt_tokens", "new_tokens", "decode_seconds", "tokens_per_s", "rounds", "drafted", "accepted",
                "acceptance_rate", "mean_accepted_tokens", "draft_seconds", "verify_seconds", "dtype"):
        assert key in out["stats"], key
    assert "seconds" not in out["stats"]  # the undocumented alias of decode_seconds is gone
    assert out["text"] and out["text"] in proc.stderr + proc.stdout  # streamed text went to stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # --json: stdout holds only the JSON line

    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("word " * 300)
    proc = run("generate", "--model", "smollm2-135m", "--prompt-file", str(long_prompt), "--ctx-size", "128",
               "-n", "8")
    assert_user_error(proc, "exceeds the context")


def test_skip_config_for_another_model_is_refused(tmp_path):
    from selfspec.drafters.layerskip import shipped_config

    other = tmp_path / "gemma-skip.json"
    shipped_config("gemma3-270m").save(other)
    proc = run("generate", "--model", "smollm2-135m", "--prompt", "hi", "-n", "4", "--draft", "layer-skip",
               "--skip-config", str(other))
    assert_user_error(proc, "18 layers", "selfspec search")


# Flags that mean a different thing per command, by design: where the results go (a folder or the
# skip-config file), train-drafter's own seed (initialisation, not sampling), search's --draft
# (whose skip set to search: layer-skip or quantized).
DIFFERENT_PER_COMMAND = {"--out", "--seed", "--draft"}


def test_each_shared_option_is_declared_once():
    """Options that several commands take come from one declaration (options.py), so their help,
    default type and spelling cannot drift apart: a flag in two commands with two different help
    texts was declared twice."""
    import typer.main

    from selfspec.cli.main import app

    seen: dict[str, dict[str, str]] = {}  # flag -> {help text: command}
    group = typer.main.get_group(app)

    def walk(cmd, name):
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{name} {sub_name}".strip())
        for p in getattr(cmd, "params", []):
            for flag in getattr(p, "opts", []):
                if flag.startswith("--"):
                    seen.setdefault(flag, {}).setdefault(p.help or "", name)

    walk(group, "")
    twice = {f: cmds for f, cmds in seen.items() if len(cmds) > 1 and f not in DIFFERENT_PER_COMMAND}
    assert not twice, f"declared more than once (different help per command): {twice}"
    assert {"--max-new-tokens", "--chat", "--temperature", "--draft-bits", "--model"} <= set(seen)
