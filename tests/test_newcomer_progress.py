"""Never a silent wait (issue 25): every long step reports through selfspec.progress.Bar, and
--compare says when its two timings are not comparable."""
from __future__ import annotations

import hashlib

import pytest

import selfspec.progress as progress
from selfspec.progress import Bar


class Recorder(Bar):
    labels: list[str] = []

    def __init__(self, label, *args, **kwargs):
        Recorder.labels.append(label)
        super().__init__(label, *args, **kwargs)


@pytest.fixture
def recorded(monkeypatch):
    Recorder.labels = []
    monkeypatch.setattr(progress, "Bar", Recorder)
    return Recorder.labels


def test_delayed_bar_is_quiet_when_quick_and_reports_when_slow(capsys, monkeypatch):
    with Bar("quick", total=3, delay=60) as bar:
        bar.advance()
    assert capsys.readouterr().err == ""
    with Bar("slow", total=3, delay=0.01) as bar:
        import time

        time.sleep(0.02)
        bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("slow: 1/3") and lines[-1].endswith("(done)")


def test_gguf_assembly_reports_progress(tmp_path, capsys):
    from selfspec.models.registry import GGUF_MAGIC, assemble

    data = GGUF_MAGIC + bytes(range(256)) * 20000
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}"
        p.write_bytes(data[i * len(data) // 3:(i + 1) * len(data) // 3])
        parts.append(p)
    assemble(parts, tmp_path / "m.gguf", hashlib.sha256(data).hexdigest(), len(data))
    err = capsys.readouterr().err
    assert "assembling m.gguf from 3 parts" in err and "(done)" in err


def test_quantisation_and_cost_calibration_report_progress(tmp_path, recorded):
    from selfspec.drafters.costs import calibrate
    from selfspec.models.quant import quantize_transformer
    from tiny import tiny_model

    model = tiny_model("llama", tmp_path, ctx_size=64)
    quantize_transformer(model.transformer, 8)
    calibrate(model, max_k=2, repeats=1, use_cache=False)
    assert any("quantising" in label for label in recorded)
    assert any("measuring forward-pass costs" in label for label in recorded)


def test_weights_and_weight_cache_writes_report_progress(tmp_path, recorded, monkeypatch):
    from selfspec.models.loading import load_transformer
    from tiny import build_tiny

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    _, folder = build_tiny("llama", tmp_path)
    load_transformer(folder, weight_cache=True)
    assert any(label.startswith("dequantising the weights") for label in recorded)
    assert any(label.startswith("writing the weight cache") for label in recorded)


def test_serve_warm_up_reports_progress(tmp_path, recorded):
    from selfspec.server.app import warm_up
    from showkit import word_model

    warm_up(word_model(tmp_path, ctx_size=64), None)
    assert any(label.startswith("warming up") for label in recorded)


def test_compare_caveat_for_a_busy_machine_or_a_short_run():
    from selfspec.hardware import comparison_caveat

    assert comparison_caveat([0.1, 0.2], [3.0, 4.0]) is None
    busy = comparison_caveat([0.5, 999.0], [3.0, 4.0])
    assert busy and "load average" in busy and "not comparable" in busy
    short = comparison_caveat([0.1], [0.05, 4.0])
    assert short and "0.05 s" in short


def test_bench_limit_keeps_the_first_prompts_of_each_category():
    from selfspec.bench.run import BenchSettings, limit_prompts, load_suite
    from selfspec.errors import InvalidParameterError

    prompts = load_suite("quick")
    one = limit_prompts(prompts, 1)
    categories = {p.category for p in prompts}
    assert len(one) == len(categories) and {p.category for p in one} == categories
    assert limit_prompts(prompts, None) == prompts
    with pytest.raises(InvalidParameterError, match="--limit"):
        BenchSettings(limit=0).check()


def test_a_bar_inside_another_on_a_terminal_joins_it(monkeypatch):
    """On a terminal, rich allows one live display: a nested bar (quantising inside a search)
    becomes a row of the outer one instead of raising."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with Bar("outer", total=2) as outer:
        with Bar("inner", total=3) as inner:
            inner.advance()
            assert inner._rich is outer._rich and len(outer._rich.tasks) == 2
        assert len(outer._rich.tasks) == 1
        outer.advance()
    assert Bar._live is None


def test_compare_repeats_a_short_answer_until_both_sides_have_decoded_long_enough():
    """`make run`'s default job decodes ~60 tokens in ~0.3 s: one run each was mostly noise and
    printed its own caveat. Short sides now run again (at most COMPARE_MAX_RUNS times) and the
    speedup is total tokens over total time."""
    import json
    import subprocess
    import sys

    from selfspec.cli.generate import COMPARE_MAX_RUNS

    r = subprocess.run([sys.executable, "-m", "selfspec.cli", "generate", "--model", "smollm2-135m", "--prompt", "Hi",
                        "-n", "3", "--draft", "ngram", "--compare", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    compare = json.loads(r.stdout.strip().splitlines()[-1])["compare"]
    # three tokens decode in milliseconds: both sides hit the cap, and still say they were short
    assert compare["runs"] == {"spec": COMPARE_MAX_RUNS, "plain": COMPARE_MAX_RUNS}, compare
    assert compare["same_as_plain"] and "decoded for only" in compare["warning"]
    assert compare["speedup"] == pytest.approx(compare["tokens_per_s"] / compare["plain_tokens_per_s"])
    assert f"over {COMPARE_MAX_RUNS} and {COMPARE_MAX_RUNS} runs" in r.stderr
