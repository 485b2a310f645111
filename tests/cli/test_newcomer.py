"""What a newcomer trips on (issue 25), run as a user runs it: a subprocess, bad input, one
`error:` line and exit 2, refused before the model loads."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from test_cli import assert_user_error, run


def run_bytes(*args, stdin: bytes, timeout=120):
    return subprocess.run([sys.executable, "-m", "selfspec.cli.main", *args], input=stdin, capture_output=True,
                          timeout=timeout)


def test_invalid_utf8_prompt_on_stdin_names_the_byte_offset():
    proc = run_bytes("generate", "-n", "4", stdin=b"Say \xff\xfe hello")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert_user_error(proc, "UTF-8", "byte offset 4")
    assert "loading" not in proc.stderr


def test_invalid_utf8_prompt_file_names_the_byte_offset(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"ok \xc3(")
    proc = run("generate", "-n", "4", "--prompt-file", str(bad))
    assert_user_error(proc, "UTF-8", "byte offset 3", "p.txt")


@pytest.mark.parametrize("args, needle", [(["--port", "99999"], "--port"), (["--port", "0"], "--port"),
                                          (["--host", "no-such-host.invalid"], "no-such-host.invalid")])
def test_serve_bad_port_or_host_fails_before_loading(args, needle):
    proc = run("serve", *args, timeout=120)
    assert_user_error(proc, needle)
    assert "loading" not in proc.stderr


def test_serve_port_in_use_fails_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run("serve", "--port", str(port), timeout=120)
    assert_user_error(proc, "already in use", str(port))
    assert "loading" not in proc.stderr


def test_datastore_build_without_decodable_files_is_refused(tmp_path):
    from selfspec.models.registry import REGISTRY

    if not REGISTRY["smollm2-135m"].installed:
        pytest.skip("smollm2-135m is not installed (its tokenizer builds the store)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blob.bin").write_bytes(b"\xff\xfe\x00\x81" * 100)
    proc = run("datastore", "build", "--corpus", str(corpus), "--out", str(tmp_path / "store"))
    assert_user_error(proc, "blob.bin", "UTF-8")
    assert not (tmp_path / "store").exists()


# ------------------------------------------------ refused before torch is imported, let alone a model
BAD_ARGS = [
    (["generate", "-p", "hi", "-n", "0"], "--max-new-tokens"),
    (["generate", "-p", "hi", "--max-draft", "0"], "--max-draft"),
    (["generate", "-p", "hi", "--draft", "quantized", "--draft-bits", "3"], "--draft-bits"),
    (["generate", "-p", "hi", "--draft", "ngram", "--tree", "0"], "--tree"),
    (["generate", "-p", "hi", "--draft", "layer-skip", "--skip-config", "/nope/skip.json"], "/nope/skip.json"),
    (["generate", "-p", "hi", "--draft", "retrieval", "--datastore", "/nope/store"], "/nope/store"),
    (["generate", "-p", "hi", "--gamma", "3"], "--gamma"),
    (["generate", "-p", "hi", "--top-p", "2"], "top_p"),
    (["generate", "-p", "hi", "--threads", "0"], "--threads"),
    (["generate", "-p", "hi", "--draft", "ngram", "--ngram-min", "4", "--ngram-max", "2"], "--ngram-min"),
    (["chat", "-n", "0"], "--max-new-tokens"),
    (["chat", "--temperature", "-1"], "temperature"),
    (["serve", "--max-draft", "0"], "--max-draft"),
    (["serve", "--port", "70000"], "--port"),
    (["bench", "-o", "/tmp/selfspec-never-written", "--limit", "0"], "--limit"),
    (["generate", "--help"], None),
    (["chat", "--help"], None),
    (["serve", "--help"], None),
]

PROBE = """
import json, sys
from typer.testing import CliRunner
from selfspec.cli.main import app
out = []
for args, _ in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    out.append([r.exit_code, r.output.strip().splitlines()[-1] if r.output.strip() else "", "torch" in sys.modules])
print(json.dumps(out))
"""


def test_argument_errors_and_help_never_import_torch():
    """Issue 25: mistakes were reported after torch import and model load (12-45 s)."""
    import json

    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(BAD_ARGS)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for (args, needle), (code, last, torch_loaded) in zip(BAD_ARGS, json.loads(proc.stdout)):
        assert not torch_loaded, f"{args} imported torch"
        if needle is None:
            assert code == 0, (args, last)
        else:
            assert code == 2 and last.startswith("error: ") and needle in last, (args, code, last)


# ------------------------------------------------------------------------------ small things
def test_chat_unknown_command_is_not_sent_to_the_model(monkeypatch):
    import io
    from types import SimpleNamespace

    from selfspec.cli import chat

    asked = []
    session = SimpleNamespace(templated=True, model=SimpleNamespace(name="m"), drafter=None,
                              ask=lambda line: asked.append(line) or iter(["ok"]))
    lines = iter(["/bogus", "//bogus is a path", "hello"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    out = io.StringIO()
    assert chat.run(session, out) == 0
    text = out.getvalue()
    assert "unknown command /bogus" in text and "/reset" in text and "/exit" in text
    assert asked == ["/bogus is a path", "hello"]


def test_every_drafter_is_listed_in_chat_and_generate_help():
    from typer.testing import CliRunner

    from selfspec.cli.main import app
    from selfspec.drafters.factory import DRAFTS

    for command in ("generate", "chat", "serve"):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output
        assert all(d in out for d in DRAFTS), (command, out)


def test_old_early_exit_kind_name_still_works(tmp_path):
    from selfspec.drafters.trained.kinds import KINDS, canonical_kind

    assert "early-exit" in KINDS and "early-exit-adapter" not in KINDS
    assert canonical_kind("early-exit-adapter") == "early-exit"
    proc = run("train-drafter", "--kind", "early-exit-adapter", "--heads", "2", "--out", str(tmp_path / "d"))
    assert "note: --kind early-exit-adapter is now called early-exit" in proc.stderr
    assert_user_error(proc, "--heads is for --kind medusa or hydra")


def test_models_never_truncates_names_in_a_pipe():
    from selfspec.models.registry import REGISTRY

    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "models"], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    for alias in REGISTRY:
        assert alias in proc.stdout


def test_models_never_truncates_names_on_a_narrow_terminal(monkeypatch, capsys):
    from selfspec.cli import options
    from selfspec.models.registry import REGISTRY

    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    monkeypatch.setenv("COLUMNS", "40")
    options.table("alias", "file", rows=[(a, "/a/very/long/path/" * 4) for a in REGISTRY])
    out = capsys.readouterr().out
    assert "…" not in out and all(a in out for a in REGISTRY)


def test_plurals():
    from selfspec.errors import plural

    assert plural(1, "prompt") == "1 prompt" and plural(2, "prompt") == "2 prompts"


def test_one_waiting_request_is_singular():
    import asyncio

    from selfspec.server.api import ApiError
    from selfspec.server.worker import Metrics, Worker

    worker = Worker(1, Metrics(lambda: 0))
    worker.jobs.put_nowait(object())
    with pytest.raises(ApiError, match="1 request is already waiting"):
        worker.submit(object())
