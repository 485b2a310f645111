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


# ------------------------------------------------------------ browsers: origin, content type
@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    model = word_model(tmp_path_factory.mktemp("tiny"), ctx_size=64)
    settings = ServerSettings(model_id="tiny-chat", api_key=KEY, max_queue=2, request_timeout=30, max_body=4096,
                              cors_origins=("http://localhost:3000",))
    with LiveServer(model, None, settings) as s:
        yield s


CHAT = {"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def chat(server, body=None, *, key=KEY, origin=None, content_type="application/json", content=None):
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if origin:
        headers["Origin"] = origin
    if content_type:
        headers["Content-Type"] = content_type
    raw = content if content is not None else httpx.Request("POST", "/", json=body or CHAT).content
    return httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers, timeout=30)


def test_text_plain_post_is_a_415(server):
    """A web page's simple (no-preflight) POST sends text/plain: refused, not parsed as JSON."""
    assert error_of(chat(server, key=None, content_type="text/plain"), 415)["code"] == "unsupported_media_type"
    assert error_of(chat(server, key=None, content_type=None), 415)["code"] == "unsupported_media_type"
    assert chat(server, key=None, content_type="application/json; charset=utf-8").status_code == 200


def test_foreign_origin_is_a_403_own_and_none_are_allowed(server):
    assert error_of(chat(server, key=None, origin="https://evil.example"), 403)["code"] == "origin_not_allowed"
    assert error_of(chat(server, key=None, origin="null"), 403)["code"] == "origin_not_allowed"
    assert chat(server, key=None, origin=server.url).status_code == 200  # the playground
    assert chat(server, key=None).status_code == 200  # curl, SDKs: no Origin header
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert error_of(r, 403)["code"] == "origin_not_allowed"


def test_cors_origin_allows_a_page_and_answers_its_preflight(keyed):
    r = chat(keyed, origin="http://localhost:3000")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    pre = httpx.options(keyed.url + "/v1/chat/completions",
                        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert error_of(chat(keyed, origin="http://localhost:4000"), 403)["code"] == "origin_not_allowed"


def test_checks_run_in_order_origin_key_content_type_size_body(keyed):
    big = b"[" + b" " * 5000 + b"]"  # over max_body 4096
    # everything wrong: the origin is reported first, then the key, the content type, the size, the body
    assert error_of(chat(keyed, key="bad", origin="https://evil.example", content_type="text/plain",
                         content=big), 403)
    assert error_of(chat(keyed, key="bad", content_type="text/plain", content=big), 401)
    assert error_of(chat(keyed, content_type="text/plain", content=big), 415)
    assert error_of(chat(keyed, content=big), 413)
    assert error_of(chat(keyed, content=b"{not json"), 400)["code"] == "invalid_json"


def test_security_headers(server):
    page = httpx.get(server.url + "/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for r in (page, httpx.get(server.url + "/health"), httpx.get(server.url + "/metrics"),
              httpx.get(server.url + "/no-such-page"), chat(server, key=None, content_type="text/plain"),
              chat(server, key=None)):
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.headers)


def test_bad_cors_origin_is_refused():
    from selfspec.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="--cors-origin"):
        ServerSettings(model_id="x", cors_origins=("localhost:3000/app",))
