"""The server as a newcomer and a hostile web page meet it (issue 25), through HTTP: malformed
bodies, over-long chats, cross-origin POSTs, content types and security headers. An in-process
server over the tiny random model (tests/showkit.py), plain decoding."""
from __future__ import annotations

import httpx
import pytest

from selfspec.server.app import ServerSettings
from showkit import LiveServer, word_model

KEY = "k-25"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = word_model(tmp_path_factory.mktemp("tiny"), ctx_size=64)
    with LiveServer(model, None, ServerSettings(model_id="tiny-chat", max_queue=2, request_timeout=30)) as s:
        yield s


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert "traceback" not in r.text.lower()
    return r.json()["error"]


def test_deeply_nested_body_is_a_400(server):
    body = b"[" * 200_000  # under 1 MiB
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    e = error_of(r, 400)
    assert e["code"] == "invalid_json" and "nested" in e["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_over_the_context_without_max_tokens_says_what_was_sent(server):
    words = " ".join(f"w{i}" for i in range(100))  # more tokens than the context of 64
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny-chat", "messages": [{"role": "user", "content": words}]})
    e = error_of(r, 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages"
    assert "max_tokens" not in e["message"] and "-" not in e["message"].split("tokens")[0]
    assert "64" in e["message"]


def test_max_tokens_over_the_context_names_the_value_sent_and_the_room(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny-chat", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]})
    e = error_of(r, 400)
    assert e["param"] == "max_tokens" and "max_tokens 500 (as sent)" in e["message"]
    assert "at most" in e["message"]
