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
