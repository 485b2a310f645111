"""`selfspec serve`: the real server process on a loopback port, talked to with the `openai` client
and raw HTTP, plus an in-process server over a tiny random model with a drafter that fails or
stalls on demand (worker errors, timeouts, a full queue)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from distributions import StubDrafter
from selfspec.drafters.base import EMPTY, Draft

MODEL = "smollm2-135m"
KEY = "test-key-7"
MAX_QUEUE = 4
ROOT = Path(__file__).resolve().parents[2]
CHAT_PROMPT = "What is the capital of France?"
TEXT_PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"server not healthy after {timeout} s:\n{log.read_text() if log else ''}")


@pytest.fixture(scope="module")
def live(tmp_path_factory, request):
    """`selfspec serve` as a user starts it (key from the environment), fp32 so that its greedy
    output can be compared with the library's."""
    from selfspec.models.registry import REGISTRY

    if not REGISTRY[MODEL].installed:
        pytest.skip(f"{MODEL} is not installed ({REGISTRY[MODEL].install_hint})")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "selfspec.cli.main", "serve", "--model", MODEL, "--dtype", "fp32", "--ctx-size", "1024",
           "--draft", "ngram", "--port", str(port), "--max-queue", str(MAX_QUEUE), "--request-timeout", "120"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "SELFSPEC_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        request.getfixturevalue("smollm")  # the reference model loads here while the server loads there
        wait_healthy(url, proc, log)
        yield {"url": url, "port": port, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(live, path, body=None, *, content=None, key=KEY, timeout=120):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(live["url"] + path, content=content, headers=headers, timeout=timeout)
    return httpx.post(live["url"] + path, json=body, headers=headers, timeout=timeout)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- openai client
@pytest.fixture(scope="module")
def reference(smollm):
    """Greedy output of the library for the prompts the server gets, with the same drafter."""
    from selfspec.generation import generate
    from selfspec.drafters.factory import build_drafter

    drafter = build_drafter("ngram", smollm)
    chat = generate(smollm, CHAT_PROMPT, drafter=drafter, max_new_tokens=12, chat=True)
    text = generate(smollm, TEXT_PROMPT, drafter=drafter, max_new_tokens=12, chat=False)
    assert chat.text and text.text
    return {"chat": chat, "text": text}


def test_models_health_and_open_endpoints(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(live["url"] + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL
    assert httpx.get(live["url"] + "/metrics").status_code == 200


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_chat_equals_library_greedy(client, reference, streamed):
    want = reference["chat"]
    kw = dict(model=MODEL, messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=12, temperature=0)
    if not streamed:
        r = client.chat.completions.create(**kw)
        text, finish, usage, stats = r.choices[0].message.content, r.choices[0].finish_reason, r.usage, r.selfspec
        assert r.choices[0].message.role == "assistant"
    else:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1 and chunks[-1].choices == []
        finish, usage = finish[0], chunks[-1].usage
        stats = next(c.selfspec for c in chunks if c.choices and c.choices[0].finish_reason)
    assert text == want.text
    assert finish == want.finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_ids), len(want.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert stats["drafter"] == "ngram" and stats["new_tokens"] == len(want.token_ids)
    assert {"mean_accepted_tokens", "acceptance_rate", "drafted", "accepted", "tokens_per_s"} <= set(stats)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_completion_equals_library_greedy(client, reference, streamed):
    want = reference["text"]
    kw = dict(model=MODEL, prompt=TEXT_PROMPT, max_tokens=12, temperature=0)
    if not streamed:
        r = client.completions.create(**kw)
        text, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
        assert usage.completion_tokens == len(want.token_ids) and usage.prompt_tokens == len(want.prompt_ids)
    else:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert text == want.text
    assert finish == want.finish_reason


GREEDY_PROMPTS = ("Name three rivers in Europe.", "Write a haiku about the sea.", "What is 12 times 13?")


def test_same_greedy_request_same_text_whatever_drafter(client):
    """A greedy request gives the same text every time (the repeat reuses the first request's KV
    through the prefix cache) and whatever drafter it asks for: every path is exact."""
    for prompt in GREEDY_PROMPTS:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
        texts = {"server default": client.chat.completions.create(**kw).choices[0].message.content,
                 "repeat": client.chat.completions.create(**kw).choices[0].message.content}
        for draft in ("none", "auto", "layer-skip"):
            r = client.chat.completions.create(**kw, extra_body={"selfspec": {"draft": draft}})
            texts[draft] = r.choices[0].message.content
        assert len(set(texts.values())) == 1, f"{prompt!r}: {texts}"


def test_stop_seed_and_common_params(client, reference):
    want = reference["text"].text
    stop = want.strip().split()[1]  # a word inside the greedy answer
    r = client.completions.create(model=MODEL, prompt=TEXT_PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == want[: want.index(stop)]
    # Common OpenAI parameters at their neutral values, and unknown ones, are accepted.
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say a word."}], temperature=0.9, top_p=0.95,
              seed=7, max_completion_tokens=6, user="u1", presence_penalty=0, frequency_penalty=0, logprobs=False,
              n=1, extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "some_future_param": 1})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.usage.completion_tokens <= 6
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same drafter


# ------------------------------------------------------------------------------- bad input
LONG = "word " * 1100  # > 1024 tokens of context
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def _with(base, **changes):
    body = {**base, **changes}
    return {k: v for k, v in body.items() if v is not ...}


BAD = [  # (id, path, body or raw bytes, status, param, code)
    ("malformed-json", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, None, "invalid_json"),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("not-utf8", "/v1/completions", b"\xff\xfe{", 400, None, "invalid_json"),
    ("missing-model", "/v1/chat/completions", _with(CHAT, model=...), 400, "model", "missing_required_parameter"),
    ("missing-messages", "/v1/chat/completions", _with(CHAT, messages=...), 400, "messages", None),
    ("missing-prompt", "/v1/completions", _with(TEXT, prompt=...), 400, "prompt", None),
    ("messages-wrong-type", "/v1/chat/completions", _with(CHAT, messages="hi"), 400, "messages", None),
    ("message-no-role", "/v1/chat/completions", _with(CHAT, messages=[{"content": "hi"}]), 400, "messages.0.role", None),
    ("max-tokens-string", "/v1/chat/completions", _with(CHAT, max_tokens="ten"), 400, "max_tokens", None),
    ("temperature-string", "/v1/completions", _with(TEXT, temperature="hot"), 400, "temperature", None),
    ("stream-not-bool", "/v1/completions", _with(TEXT, stream="yes"), 400, "stream", None),
    ("prompt-wrong-type", "/v1/completions", _with(TEXT, prompt={"text": "hi"}), 400, "prompt", None),
    ("unknown-model", "/v1/chat/completions", _with(CHAT, model="gpt-4o"), 404, "model", "model_not_found"),
    ("empty-messages", "/v1/chat/completions", _with(CHAT, messages=[]), 400, "messages", None),
    ("empty-prompt", "/v1/completions", _with(TEXT, prompt=""), 400, "prompt", None),
    ("prompt-over-context", "/v1/completions", _with(TEXT, prompt=LONG), 400, "prompt", "context_length_exceeded"),
    ("chat-over-context", "/v1/chat/completions", _with(CHAT, messages=[{"role": "user", "content": LONG}]), 400,
     "messages", "context_length_exceeded"),
    ("max-tokens-zero", "/v1/chat/completions", _with(CHAT, max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", "/v1/completions", _with(TEXT, max_tokens=-5), 400, "max_tokens", None),
    ("max-tokens-over-context", "/v1/completions", _with(TEXT, max_tokens=5000), 400, "max_tokens",
     "context_length_exceeded"),
    ("temperature-negative", "/v1/chat/completions", _with(CHAT, temperature=-0.5), 400, "temperature", None),
    ("top-p-zero", "/v1/chat/completions", _with(CHAT, top_p=0), 400, "top_p", None),
    ("top-p-above-one", "/v1/completions", _with(TEXT, top_p=1.5), 400, "top_p", None),
    ("top-k-negative", "/v1/completions", _with(TEXT, top_k=-1), 400, "top_k", None),
    ("n-two", "/v1/chat/completions", _with(CHAT, n=2), 400, "n", None),
    ("presence-penalty", "/v1/chat/completions", _with(CHAT, presence_penalty=0.5), 400, "presence_penalty", None),
    ("batched-prompts", "/v1/completions", _with(TEXT, prompt=["a", "b"]), 400, "prompt", None),
    ("token-outside-vocab", "/v1/completions", _with(TEXT, prompt=[1, 10**9]), 400, "prompt", None),
    ("image-content", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages.0.content", None),
    ("oversized-body", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": "x" * (1 << 20)}]), 413, None, "request_too_large"),
    ("unknown-endpoint", "/v1/embeddings", _with(TEXT), 404, None, None),
]


@pytest.mark.parametrize("path, body, status, param, code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(live, path, body, status, param, code):
    r = post(live, path, content=body) if isinstance(body, bytes) else post(live, path, body)
    assert_error(r, status, param, code)


def test_bad_input_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
FIELDS = ["messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n",
          "stream_options", "logprobs", "min_p", "repetition_penalty", "max_completion_tokens"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), chat=st.booleans())
def test_fuzzed_bodies_never_5xx(live, body, chat):
    """Whatever the fields hold, a request for an unknown model is a 4xx: never a crash, never a
    generation (validation happens before the model check, which comes before queueing)."""
    r = post(live, "/v1/chat/completions" if chat else "/v1/completions", {**body, "model": "no-such-model"})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["message"]


def test_still_serving_after_bad_input(client, live):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(live["url"] + "/health").json()["status"] == "ok"


# ------------------------------------------------------------------------------------ auth
def test_api_key(live, client):
    for key in (None, "wrong-key"):
        r = httpx.get(live["url"] + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert_error(r, 401, code="invalid_api_key")
        assert_error(post(live, "/v1/chat/completions", CHAT, key=key), 401)
    r = httpx.get(live["url"] + "/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert_error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert client.models.list().data[0].id == MODEL
    assert post(live, "/v1/chat/completions", CHAT).status_code == 200
    assert httpx.get(live["url"] + "/health").status_code == 200
    assert httpx.get(live["url"] + "/metrics").status_code == 200


# ---------------------------------------------------------------------- load and disconnects
async def _stream_once(ac: httpx.AsyncClient, i: int) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": f"Count from {i}:", "max_tokens": 4, "stream": True, "ignore_eos": True}
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, {"headers": dict(r.headers), "body": r.json()}
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    return 200, {"events": events}


def test_concurrent_streams_complete_or_429(live):
    refused_before = metrics(live["url"]).get("selfspec_queue_full_total", 0)

    async def main():
        async with httpx.AsyncClient(base_url=live["url"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120, limits=httpx.Limits(max_connections=64)) as ac:
            return await asyncio.gather(*(_stream_once(ac, i) for i in range(32)))

    results = asyncio.run(main())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    for status, out in results:
        if status == 429:
            assert int(out["headers"]["retry-after"]) >= 1
            assert out["body"]["error"]["code"] == "queue_full"
            continue
        assert out["events"][-1] == "[DONE]"
        chunks = [json.loads(e) for e in out["events"][:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["selfspec"]["new_tokens"] == 4
        assert "".join(c["choices"][0]["text"] for c in chunks)
    assert metrics(live["url"])["selfspec_queue_full_total"] - refused_before == statuses.count(429)
    health = httpx.get(live["url"] + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    assert post(live, "/v1/completions", TEXT).status_code == 200


def _wait_idle(url: str, cancelled_before: float, reason: str = "disconnect", timeout: float = 6.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = metrics(url)
        if m.get(f"selfspec_cancelled_total{{reason={reason}}}", 0) > cancelled_before and m["selfspec_worker_busy"] == 0:
            return m
        time.sleep(0.1)
    pytest.fail(f"worker still busy {timeout} s after the client left: {metrics(url)}")


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "whole"])
def test_disconnect_frees_the_worker(live, streamed):
    """600 tokens take ~30 s here; the worker must be free within a few seconds of the client leaving."""
    url = live["url"]
    before = metrics(url)
    cancelled = before.get("selfspec_cancelled_total{reason=disconnect}", 0)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True, "stream": streamed}
    headers = {"Authorization": f"Bearer {KEY}"}
    if streamed:
        with httpx.Client(timeout=60) as hc, hc.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            got = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                    if len(got) == 3:
                        break
        assert len(got) == 3
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=1.5)
    t0 = time.monotonic()
    after = _wait_idle(url, cancelled)
    assert after["selfspec_generated_tokens_total"] == before["selfspec_generated_tokens_total"]  # never finished
    r = post(live, "/v1/completions", TEXT, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 20


def test_metrics_report_requests_tokens_and_speculation(live):
    before = metrics(live["url"])
    assert post(live, "/v1/chat/completions", CHAT).status_code == 200
    assert post(live, "/v1/chat/completions", _with(CHAT, top_p=7)).status_code == 400
    m = metrics(live["url"])
    assert m["selfspec_generated_tokens_total"] > before.get("selfspec_generated_tokens_total", 0)
    assert m["selfspec_prompt_tokens_total"] > before.get("selfspec_prompt_tokens_total", 0)
    for status in (200, 400):
        key = f"selfspec_requests_total{{endpoint=/v1/chat/completions,status={status}}}"
        assert m[key] == before.get(key, 0) + 1
    assert m["selfspec_request_seconds_count{endpoint=/v1/completions}"] >= 1
    assert 0 <= m["selfspec_acceptance_rate"] <= 1 and m["selfspec_mean_accepted_tokens"] >= 1
    assert m["selfspec_queue_depth"] == 0 and m["selfspec_worker_busy"] == 0
    assert m["selfspec_drafted_tokens_total"] >= m["selfspec_accepted_tokens_total"]
    log = live["log"].read_text()
    assert re.search(r"POST /v1/chat/completions 200 .* tok/s .* draft=ngram tau=", log), log[-2000:]


@pytest.mark.parametrize("args, needle", [(["--max-queue", "0"], "--max-queue"), (["--draft", "magic"], "magic"),
                                          (["--temperature", "-1"], "temperature")])
def test_serve_bad_flags_fail_before_loading(args, needle):
    from typer.testing import CliRunner

    from selfspec.cli.main import app

    result = CliRunner().invoke(app, ["serve", *args])  # in-process: no interpreter start-up to pay
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "loading" not in result.output


# ---------------------------------------------------------------------------------- README
def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Server", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _as_tested(code: str, live) -> str:
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{live['port']}").replace("my-key", KEY)
    return re.sub(r'(max_tokens"?\s*[:=]\s*)\d+', r"\g<1>6", code)


def test_readme_server_examples(live):
    shell = "\n".join(_readme_blocks("bash"))
    assert "selfspec serve" in shell
    curls = [c for c in re.split(r"\n(?=\S)", shell) if c.startswith("curl")]
    assert curls
    for cmd in curls:
        proc = subprocess.run(["bash", "-c", _as_tested(cmd, live)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "error" not in json.loads(proc.stdout) and "choices" in json.loads(proc.stdout)
    (code,) = _readme_blocks("python")
    proc = subprocess.run([sys.executable, "-c", _as_tested(code, live)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


# ------------------------------------------------------------- tiny model, faults on demand
class Trap(StubDrafter):
    """Drafts nothing; raises when the prompt starts with token 1, stalls each round when it starts
    with token 2."""

    name = "trap"

    def propose(self, ctx, max_tokens):
        if ctx.tokens[0] == 1:
            raise RuntimeError("trap sprung")
        if ctx.tokens[0] == 2:
            time.sleep(0.1)
        return Draft(EMPTY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import uvicorn

    from selfspec.server.app import ServerSettings, create_app
    from tiny import tiny_model

    model = tiny_model("llama", tmp_path_factory.mktemp("tiny"), ctx_size=128)
    settings = ServerSettings(model_id="tiny", max_queue=1, request_timeout=1.5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, Trap(), settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=30)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def _tiny_post(url, prompt, max_tokens=8, stream=False, timeout=30):
    return httpx.post(url + "/v1/completions", timeout=timeout,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": stream})


def test_generation_error_is_a_500_for_that_request_only(tiny):
    assert_error(_tiny_post(tiny, [1, 5, 6]), 500, code="generation_failed")
    r = _tiny_post(tiny, [1, 5, 6], stream=True)  # fails after the first token: an error event
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    ok = _tiny_post(tiny, [3, 4, 5])
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
    assert metrics(tiny)["selfspec_generation_errors_total"] == 2


def test_full_queue_429_then_timeouts(tiny):
    """max_queue 1: one request decodes (stalled 0.1 s a round), one waits, a third is refused.
    The two accepted ones outlive --request-timeout (1.5 s): the running stream ends with a timeout
    error event, the waiting one gets 504."""
    results = {}

    def call(name, stream):
        t0 = time.monotonic()
        results[name] = (_tiny_post(tiny, [2, 3, 4], max_tokens=100, stream=stream), time.monotonic() - t0)

    running = threading.Thread(target=call, args=("running", True))
    running.start()
    _wait_busy(tiny)
    queued = threading.Thread(target=call, args=("queued", False))
    queued.start()
    end = time.monotonic() + 5
    while metrics(tiny)["selfspec_queue_depth"] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    refused = _tiny_post(tiny, [3, 4, 5])
    assert_error(refused, 429, code="queue_full")
    assert int(refused.headers["retry-after"]) >= 1
    running.join()
    queued.join()
    r, seconds = results["running"]
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]" and seconds < 4
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert 0 < len(events) - 2 < 30  # some tokens, far from the 100 asked for
    r, seconds = results["queued"]
    assert_error(r, 504, code="request_timeout")
    assert seconds < 4
    _wait_idle(tiny, 0, reason="timeout")
    assert _tiny_post(tiny, [3, 4, 5]).status_code == 200


def _wait_busy(url, timeout=5.0):
    end = time.monotonic() + timeout
    while metrics(url)["selfspec_worker_busy"] != 1:
        assert time.monotonic() < end, "the worker never started"
        time.sleep(0.02)


def test_requests_sharing_a_prefix_process_only_the_rest(tiny):
    """--prefix-cache-mb (default 512): the live KV, and copies of earlier sequences' KV."""
    def complete(prompt):
        r = _tiny_post(tiny, prompt, max_tokens=8)
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["text"], body["selfspec"]

    conversation = [9] + [3 + (i * 7) % 150 for i in range(29)]  # no earlier request starts with 9
    cold, stats = complete(conversation)  # whatever was cached before shares no prefix with it
    assert stats["cached_prompt_tokens"] == 0 and stats["prefill_tokens"] == 30
    other, stats = complete([4] + conversation[1:20])  # another conversation takes the live cache
    assert stats["cached_prompt_tokens"] == 0
    again, stats = complete(conversation)  # back: its KV comes from the stored copy
    assert stats["cached_prompt_tokens"] == 29 and stats["prefill_tokens"] == 1
    assert again == cold
    longer, stats = complete(conversation + [5, 6, 7])
    assert stats["cached_prompt_tokens"] >= 30 and stats["prefill_tokens"] == 33 - stats["cached_prompt_tokens"]
