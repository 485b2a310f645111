"""The shared progress report: into a pipe it prints plain, flushed lines (a start line, at most
one per `every` seconds, an end line), never a silent wait and never a flood."""
from __future__ import annotations

from selfspec.progress import Bar


def test_piped_bar_prints_start_throttled_updates_and_end(capsys):
    with Bar("training", total=100, fields="loss {loss:.2f}", loss=9.0, every=3600) as bar:
        for i in range(100):
            bar.advance(loss=1.0 / (i + 1))
        bar.note("a note of its own")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("training: 0/100, loss 9.00")
    assert lines[1] == "a note of its own"
    assert lines[2].startswith("training: 100/100, loss 0.01") and lines[2].endswith("(done)")
    assert len(lines) == 3  # 100 updates inside `every` seconds: none printed


def test_piped_bar_reports_each_update_when_not_throttled(capsys):
    with Bar("bench", total=2, every=0) as bar:
        bar.update(1, label="ar · p1")
        bar.update(1, label="ar · p2")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["bench: 0/2", "ar · p1: 1/2", "ar · p2: 2/2", "ar · p2: 2/2"]


def test_disabled_bar_prints_nothing(capsys):
    with Bar("x", total=3, enabled=False) as bar:
        bar.advance()
        bar.note("hidden")
    assert capsys.readouterr().err == ""


def test_a_step_without_a_count_shows_no_zero(capsys):
    with Bar("converting the tokenizer", every=3600):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("converting the tokenizer, 0 s") and lines[-1].endswith("(done)")
    assert all(": 0" not in line for line in lines)
