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
