"""Other engines in `selfspec bench`: method parsing of their options, an OpenAI-compatible server
(a fake one, started here) measured through streaming chat completions, OpenVINO GenAI reported
as "not installed" / "not supported" rather than failing, and (slow, `make extras`) a real
OpenVINO run on SmolLM2."""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfspec.bench.run import BenchSettings, OpenAIRunner, _mark_same_as_plain, gguf_architecture, run_bench
from selfspec.drafters.factory import MethodSpec, parse_method, parse_methods
from selfspec.errors import InvalidParameterError

SUITE = [{"id": "one", "category": "qa", "prompt": "Why is the sky blue?"},
         {"id": "two", "category": "multi-turn", "turns": ["Hello there.", "Say it again, louder."]}]


@pytest.fixture
def suite(tmp_path) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in SUITE))
    return path


# ------------------------------------------------------------------------------------- parsing
def test_parse_peer_methods_and_their_options():
    assert parse_method("openvino:precision=f32") == MethodSpec("openvino:precision=f32", "openvino",
                                                                {"precision": "f32"})
    assert parse_method("openvino-lookup").kind == "openvino-lookup"
    spec = parse_method("openvino-spec:draft=qwen2.5-coder-0.5b,precision=bf16")
    assert spec.options == {"draft_model": "qwen2.5-coder-0.5b", "precision": "bf16"}
    url = "http://127.0.0.1:8080/v1"
    spec = parse_method(f"openai:url={url},model=my-model,key_env=MY_KEY")
    assert spec.kind == "openai" and spec.options == {"url": url, "model": "my-model", "key_env": "MY_KEY"}
    # the URL's colons and the options' commas inside a list of methods
    specs = parse_methods(f"ar,openai:url={url},model=m,key_env=K,openvino:precision=f32,ngram:mode=adaptive")
    assert [s.kind for s in specs] == ["none", "openai", "openvino", "ngram"]
    assert specs[1].options == {"url": url, "model": "m", "key_env": "K"}
    assert specs[2].options == {"precision": "f32"} and specs[3].options == {"ngram_mode": "adaptive"}


@pytest.mark.parametrize("text, needle", [
    ("openvino:precision=f64", "precision"),
    ("openvino:skip=x.json", "bad option"),
    ("openai:model=m", "needs url="),
    ("openvino-spec", "needs draft="),
    ("llama-cpp:dtype=bf16", "takes no options"),
])
def test_parse_peer_methods_rejects_bad_options(text, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        parse_method(text)


def test_same_as_own_plain_compares_each_engine_with_its_own_plain_run():
    specs = [parse_method(m) for m in ("ar", "ngram", "openvino", "openvino-lookup", "openvino:precision=f32",
                                       "openvino-lookup:precision=f32", "openai:url=http://x:1/v1")]
    ids = {"ar": [1, 2, 3], "ngram": [1, 2, 3], "openvino": [1, 2, 4], "openvino-lookup": [1, 2, 5],
           "openvino:precision=f32": [1, 2, 3], "openvino-lookup:precision=f32": [1, 2, 3]}
    runs = [{"method": m, "prompt_id": "p", "repeat": 0, "token_ids": v, "text": "abc"} for m, v in ids.items()]
    runs.append({"method": "openai:url=http://x:1/v1", "prompt_id": "p", "repeat": 0, "token_ids": [9], "text": "abc"})
    _mark_same_as_plain(runs, specs, BenchSettings())
    got = {r["method"]: (r["same_as_plain"], r["same_as_own_plain"]) for r in runs}
    assert got == {"ar": (True, True), "ngram": (True, True), "openvino": (False, True),
                   "openvino-lookup": (False, False),  # its speculation changed its own output
                   "openvino:precision=f32": (True, True), "openvino-lookup:precision=f32": (True, True),
                   "openai:url=http://x:1/v1": (True, True)}  # a server's answer is compared as text


# --------------------------------------------------------------------------- a fake OpenAI server
ANSWER = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", "."]
DELAY = 0.02  # seconds before the first chunk and between chunks


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions with stream=true: ANSWER one word a chunk, then usage, then
    [DONE]; a Bearer key is required when the server has one."""

    seen: list = []
    key: str | None = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad key"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = ANSWER[: body.get("max_tokens") or len(ANSWER)]

        def send(obj):
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for w in words:
            time.sleep(DELAY)
            send({"choices": [{"index": 0, "delta": {"content": w}}]})
        send({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(words)}})
        send(b"[DONE]")


@pytest.fixture
def fake_server():
    FakeOpenAI.seen, FakeOpenAI.key = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_runner_times_chunks_and_sends_the_key(fake_server, monkeypatch):
    FakeOpenAI.key = "sekrit"
    monkeypatch.setenv("PEER_KEY", "sekrit")
    spec = parse_method(f"openai:url={fake_server},model=fake,key_env=PEER_KEY")
    runner = OpenAIRunner(spec, BenchSettings(model="smollm2-135m", max_new_tokens=32))
    n_prompt, turn = runner.turn(["Why is the sky blue?"], [], BenchSettings(model="smollm2-135m", max_new_tokens=32))
    seen = FakeOpenAI.seen[-1]
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer sekrit"
    assert seen["body"]["model"] == "fake" and seen["body"]["stream"] is True
    assert seen["body"]["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert turn.text == "".join(ANSWER) and n_prompt == 11
    assert turn.new_tokens == len(ANSWER)  # the server's usage count
    assert turn.prefill_seconds >= DELAY * 0.9  # time to the first content chunk
    assert (len(ANSWER) - 1) * DELAY * 0.9 <= turn.decode_seconds < (len(ANSWER) - 1) * DELAY + 1.0
    assert turn.token_ids  # the text re-tokenised with the model's tokenizer, to compare


def test_openai_missing_key_env_is_unavailable(fake_server, monkeypatch):
    from selfspec.bench.run import Unavailable

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(Unavailable, match="NO_SUCH_KEY_VAR"):
        OpenAIRunner(parse_method(f"openai:url={fake_server},key_env=NO_SUCH_KEY_VAR"), BenchSettings())


def test_bench_measures_an_openai_server_beside_ours(tiny_chat, suite, fake_server, tmp_path):
    method = f"openai:url={fake_server},model=fake"
    settings = BenchSettings(model=str(tiny_chat), suite=str(suite), methods=["ar", method], max_new_tokens=4,
                             threads=1)
    out = tmp_path / "out"
    results = run_bench(settings, out, isolate=False, progress=False)
    status = {m["method"]: m for m in results["methods"]}
    assert status[method]["status"] == "ok", status[method]
    runs = [r for r in results["runs"] if r["method"] == method]
    assert [r["prompt_id"] for r in runs] == ["one", "two"]
    one, two = runs
    assert one["new_tokens"] == 4 and two["new_tokens"] == 8  # both turns of the conversation
    assert one["text"] == "The sky is blue" and one["tokens_per_s"] > 0 and one["prefill_seconds"] > 0
    assert one["same_as_plain"] is False  # a random tiny model does not say that
    second = FakeOpenAI.seen[-1]["body"]["messages"]  # the server's own first answer went back to it
    assert [m["role"] for m in second] == ["user", "assistant", "user"] and second[1]["content"] == "The sky is blue"
    report = (out / "report.md").read_text()
    assert "## Ranking by decode tokens/s" in report and method in report


# --------------------------------------------------------------------------------- OpenVINO GenAI
def test_openvino_missing_is_a_not_installed_row(tiny_chat, suite, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino_genai", None)  # import fails as if not installed
    settings = BenchSettings(model=str(tiny_chat), suite=str(suite), methods=["ar", "openvino", "openvino-lookup"],
                             max_new_tokens=3, threads=1)
    out = tmp_path / "out"
    results = run_bench(settings, out, isolate=False, progress=False)
    status = {m["method"]: m for m in results["methods"]}
    for m in ("openvino", "openvino-lookup"):
        assert status[m]["status"] == "not installed" and "make extras" in status[m]["reason"]
    assert {r["method"] for r in results["runs"]} == {"ar"}
    report = (out / "report.md").read_text()
    assert "| – | `openvino` | openvino | not installed: openvino-genai is not installed (make extras)" in report


def test_openvino_unsupported_model_is_a_not_supported_row(tiny_chat, suite, tmp_path):
    pytest.importorskip("openvino_genai", reason="openvino-genai not installed (make extras)")
    settings = BenchSettings(model=str(tiny_chat), suite=str(suite), methods=["ar", "openvino"], max_new_tokens=3,
                             threads=1)
    results = run_bench(settings, tmp_path / "out", isolate=False, progress=False)
    status = {m["method"]: m for m in results["methods"]}["openvino"]
    assert status["status"] == "not supported" and "Hugging Face folder" in status["reason"]


def test_gguf_architecture_reads_the_header():
    from selfspec.models.registry import REGISTRY

    assert gguf_architecture(REGISTRY["smollm2-135m"].path()) == "llama"
    assert gguf_architecture(REGISTRY["gemma3-270m"].path()) == "gemma3"  # OpenVINO: not supported


@pytest.mark.slow
def test_openvino_real_run_on_smollm2(suite, tmp_path):
    pytest.importorskip("openvino_genai", reason="openvino-genai not installed (make extras)")
    settings = BenchSettings(model="smollm2-135m", suite=str(suite), methods=["ar", "openvino", "openvino-lookup"],
                             max_new_tokens=16, threads=2)
    results = run_bench(settings, tmp_path / "out", progress=False)  # one process per method
    status = {m["method"]: m for m in results["methods"]}
    assert status["openvino"]["status"] == status["openvino-lookup"]["status"] == "ok", status
    assert status["openvino"]["peak_rss_mb"] > 0
    runs = [r for r in results["runs"] if r["method"] == "openvino"]
    assert runs and all(r["same_as_own_plain"] is True and r["tokens_per_s"] > 0 and r["new_tokens"] > 0
                        for r in runs)
    assert all(isinstance(r["same_as_own_plain"], bool) for r in results["runs"] if r["method"] == "openvino-lookup")


# ------------------------------------------------------------------------------ llama.cpp build
def test_llama_cpp_build_is_keyed_by_isa_and_reused(tmp_path, monkeypatch, capsys):
    from selfspec.bench import extras

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    key = extras.build_key()
    assert key.startswith(extras.LLAMA_CPP_VERSION + "-") and key.split("-")[1] in ("avx512", "avx2", "default")
    folder = tmp_path / "llama-cpp" / key
    folder.mkdir(parents=True)
    wheel = folder / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"")

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although this machine's build is cached")

    monkeypatch.setattr(extras.subprocess, "Popen", no_build)
    assert extras.build_wheel() == wheel
    assert f"reusing the build for {key}" in capsys.readouterr().err
    (folder / "build.json").write_text(json.dumps({"isa": "avx512", "flags": ["avx2"]}))
    assert extras.build_info()["isa"] == "avx512"


def test_openvino_spec_with_an_unreadable_draft_is_not_supported():
    pytest.importorskip("openvino_genai", reason="openvino-genai not installed (make extras)")
    from selfspec.bench.run import OpenVINORunner, Unavailable

    spec = parse_method("openvino-spec:draft=gemma3-270m")
    with pytest.raises(Unavailable, match="does not read the draft") as e:
        OpenVINORunner(spec, BenchSettings(model="smollm2-135m"))
    assert e.value.status == "not supported"
