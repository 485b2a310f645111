"""`selfspec bench` on a tiny random model with a real tokenizer (SmolLM2's, chat template
included): the harness end to end, its files, mismatch flagging, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfspec.bench.run import BenchSettings, OursRunner, load_suite, run_bench
from selfspec.errors import InvalidParameterError

RUN_KEYS = {"method", "category", "prompt_id", "repeat", "prompt_tokens", "new_tokens", "prefill_seconds",
            "decode_seconds", "tokens_per_s", "mean_accepted_tokens", "acceptance_rate", "peak_rss_mb",
            "token_ids", "same_as_plain", "same_as_own_plain"}
SUITE = [
    {"id": "one", "category": "qa", "prompt": "Why is the sky blue?"},
    {"id": "two", "category": "multi-turn", "turns": ["Hello there.", "Say it again, louder."]},
]


@pytest.fixture
def suite(tmp_path) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in SUITE))
    return path


class Broken(OursRunner):
    """Plain decoding that changes one token: what a lossy 'speedup' looks like."""

    def generate(self, prompt_ids, settings):
        turn = super().generate(prompt_ids, settings)
        turn.token_ids = turn.token_ids[:-1] + [(turn.token_ids[-1] + 1) % 49152]
        return turn


def test_harness_writes_results_report_and_flags_a_lossy_method(tiny_chat, suite, tmp_path):
    settings = BenchSettings(model=str(tiny_chat), suite=str(suite), methods=["ar", "ngram", "auto", "broken"],
                             max_new_tokens=6, repeats=2, threads=1)
    out = tmp_path / "out"
    results = run_bench(settings, out, isolate=False, progress=False,
                        extra_methods={"broken": lambda spec, s: Broken(spec, s)})
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] == results["runs"]
    assert {"cpu", "flags", "threads", "torch"} <= set(on_disk["machine"])
    assert on_disk["settings"]["max_new_tokens"] == 6
    runs = on_disk["runs"]
    assert len(runs) == 4 * len(SUITE) * 2  # methods x prompts x repeats
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["new_tokens"] == len(r["token_ids"]) > 0
        assert r["decode_seconds"] > 0 and r["peak_rss_mb"] > 0
    two = [r for r in runs if r["prompt_id"] == "two" and r["method"] == "ar"]
    assert all(r["new_tokens"] == 12 for r in two)  # both turns generated, 6 tokens each
    by = {(r["method"], r["prompt_id"], r["repeat"]): r for r in runs}
    assert all(by[(m, p["id"], k)]["same_as_plain"] is True for m in ("ngram", "auto") for p in SUITE for k in (0, 1))
    assert all(by[("auto", p["id"], 0)]["predicted_speedup"] > 0 for p in SUITE)
    assert all(by[("broken", p["id"], k)]["same_as_plain"] is False for p in SUITE for k in (0, 1))
    assert all(by[("ngram", p["id"], 0)]["mean_accepted_tokens"] >= 1 for p in SUITE)
    report = (out / "report.md").read_text()
    assert "MISMATCH: `broken`" in report
    assert "MISMATCH: `ngram`" not in report and "MISMATCH: `auto`" not in report
    assert "predicted vs realised" in report
    for name in ("speedup.png", "tau.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_each_method_in_its_own_process(tiny_chat, suite, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "selfspec.cli.main", "bench", "--model", str(tiny_chat), "--suite", str(suite),
         "--methods", "ngram,llama-cpp", "-n", "5", "--threads", "1", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    status = {m["method"]: m for m in summary["methods"]}
    assert list(status) == ["none", "ngram", "llama-cpp"]  # the plain baseline is added, first
    assert status["none"]["status"] == status["ngram"]["status"] == "ok"
    assert status["none"]["peak_rss_mb"] > 0 and status["ngram"]["peak_rss_mb"] > 0
    assert status["llama-cpp"]["status"] in ("not installed", "unavailable")  # no GGUF here either way
    assert summary["summary"]["ngram"]["same"] is True
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"none", "ngram"}
    assert "llama-cpp" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--methods", "ar,warp-drive"], "unknown method 'warp-drive'"),
    (["--methods", "layer-skip:skp=x"], "bad option"),
    (["--repeats", "0"], "--repeats"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--suite", "nosuchsuite"], "--suite"),
    (["--model", "/no/such/model.gguf"], "neither a known alias"),
])
def test_cli_bad_input(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "bench", "--out", str(tmp_path / "o"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_unwritable_out(tmp_path, suite):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "bench", "--suite", str(suite),
                           "--out", str(blocker / "sub")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot write to --out" in proc.stderr


@pytest.mark.parametrize("line, needle", [
    ("not json", "not JSON"),
    ('{"category": "qa", "prompt": "x"}', '"id"'),
    ('{"id": "a", "prompt": "x", "turns": ["y"]}', "exactly one"),
    ('{"id": "a", "turns": []}', "non-empty"),
    ('{"id": "a", "prompt": "  "}', "non-empty"),
])
def test_suite_schema_errors(line, needle, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InvalidParameterError, match=needle.replace('"', '.')):
        load_suite(str(path))


def test_shipped_suites_cover_the_categories():
    want = {"multi-turn", "translation", "summarisation", "qa", "math", "rag", "code", "code-edit"}
    for name, least in (("quick", 2), ("full", 5)):
        prompts = load_suite(name)
        counts = {c: sum(p.category == c for p in prompts) for c in want}
        assert set(p.category for p in prompts) == want
        assert min(counts.values()) >= least, (name, counts)
    assert {p.category for p in load_suite("code")} == {"code", "code-edit"}
    quick_ids = {p.id for p in load_suite("quick")}
    assert quick_ids <= {p.id for p in load_suite("full")}
