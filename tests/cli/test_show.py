"""Seeing speculation (`selfspec.draftview`): text attributed to the tokens that produced it, multi-byte
characters and stop strings included; the stream extension field `selfspec` with a drafter of
known accept/reject pattern, through the openai client; `generate --show-drafts` (colour only on a
terminal) and its summary line. Tiny random models only: the whole file takes a few seconds."""
from __future__ import annotations

import io
import json
import random
import re
from types import SimpleNamespace

import openai
import pytest

from selfspec.generation import Chunk, SpecStats, TextStream, generate, stream
from selfspec.server.app import ServerSettings
from selfspec.draftview import DraftView, TerminalPainter, estimate, plain_step_seconds, round_origins, summary_line
from showkit import ByteTokenizer, LiveServer, WordTokenizer, word_model
from distributions import ScriptedDrafter
from tiny import one_thread

PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return word_model(tmp_path_factory.mktemp("tiny"))


def feed(tokenizer, rounds, stop=(), proposed=None):
    """Drive a TextStream (as the generation loop does) and a DraftView over `rounds` of
    (token ids, drafted flags); returns the chunks' texts and their spans."""
    stats = SpecStats()
    view, text = DraftView(tokenizer, stats), TextStream(tokenizer, stop)
    out = []
    for i, (ids, drafted) in enumerate(rounds):
        stats.drafted += proposed[i] if proposed else sum(drafted)
        delta = text.push(ids)
        out.append((delta, view.push(Chunk(delta, ids, drafted))))
        if text.stopped:
            return out, view
    tail = text.finish()
    out.append((tail, view.push(Chunk(tail, []))))
    return out, view


# ---------------------------------------------------------------------------- attribution
def test_multibyte_characters_go_to_the_token_that_completes_them():
    # "café €5 😀!" with é split over tokens 0|1, € over 2|3|4, the emoji over 5|6
    pieces = [b"caf\xc3", b"\xa9 ", b"\xe2", b"\x82", b"\xac5 ", b"\xf0\x9f", b"\x98\x80", b"!"]
    tok = ByteTokenizer(pieces)
    rounds = [([0], [False]), ([1, 2, 3], [True, True, False]), ([4, 5], [True, False]), ([6, 7], [False, False])]
    chunks, view = feed(tok, rounds, proposed=[0, 3, 2, 0])
    texts = [c for c, _ in chunks]
    assert "".join(texts) == "café €5 😀!"
    for delta, spans in chunks:
        assert "".join(s.text for s in spans) == delta  # the text is exactly the chunk's
    spans = [s for _, ss in chunks for s in ss]
    assert [(s.text, s.origin) for s in spans] == [
        ("caf", "target"), ("é ", "draft"), ("€5 ", "draft"), ("😀", "target"), ("!", "target")]
    assert "\ufffd" not in "".join(texts)
    assert view.origins == ["target", "draft", "draft", "correction", "draft", "correction", "target", "target"]


def test_stop_string_held_back_text_is_attributed_to_earlier_tokens():
    tok = WordTokenizer(160)
    ids = [3, 4, 5, 6, 7, 8]
    words = [tok.word(i) for i in ids]
    # Round 2 ends with a possible start of the first stop string: held back, released by round 3.
    # Round 4 completes the second stop string: its text is never sent.
    stops = [" " + words[2] + " zz", " " + words[5]]
    rounds = [([3, 4], [True, False]), ([5], [False]), ([6, 7], [True, True]), ([8], [False])]
    chunks, _ = feed(tok, rounds, stop=stops, proposed=[1, 3, 2, 0])
    assert chunks[1][0] == "" and chunks[2][0].startswith(" " + words[2])
    released = "".join(c for c, _ in chunks)
    assert released == " ".join(words[:5])  # nothing from the stop string on
    pairs = [(s.text, s.origin) for _, ss in chunks for s in ss]
    assert "".join(t for t, _ in pairs) == released
    assert pairs == [(words[0], "draft"), (" " + words[1], "bonus"), (" " + words[2], "correction"),
                     (" " + words[3], "draft"), (" " + words[4], "draft")]


def test_windowed_decoding_matches_decoding_the_whole_prefix():
    """Each round decodes only a window before its tokens; with multi-byte characters split at
    random points and round sizes up to 9, the character ends equal those of whole-prefix decoding."""
    rng = random.Random(0)
    text = "".join(rng.choice(["a", "b", " ", "é", "€", "😀", "ß", "\n"]) for _ in range(400)).encode()
    cuts = sorted(rng.sample(range(1, len(text)), 220))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    tok = ByteTokenizer(pieces)
    ids, rounds = list(range(len(pieces))), []
    while ids:
        n = rng.randint(1, 9)
        rounds.append((ids[:n], [True] * (n - 1) + [False]))
        ids = ids[n:]
    chunks, view = feed(tok, rounds)
    assert "".join(c for c, _ in chunks) == text.decode()
    whole = [len(tok.decode(list(range(n + 1))).rstrip("\ufffd")) for n in range(len(pieces))]
    assert view._ends == whole


def test_round_origins():
    assert round_origins([False], 0) == ["target"]  # first token or a plain step
    assert round_origins([True, True, False], 2) == ["draft", "draft", "bonus"]
    assert round_origins([True, False], 3) == ["draft", "correction"]
    assert round_origins([True, True], 4) == ["draft", "draft"]  # cut by max_new_tokens


# ------------------------------------------------------------------- the stream extension field
def test_stream_extension_marks_each_tokens_origin(model):
    """A drafter wrong on odd rounds and right on even ones (k = 3): the first token and every odd
    round give one target token (a correction after the first), every even round 3 accepted
    drafts + the bonus token; per chunk, the tokens' texts join to the delta. The openai client
    parses the stream and keeps the field."""
    plain = generate(model, PROMPT, max_new_tokens=21)
    drafter = ScriptedDrafter(len(PROMPT), plain.token_ids, 3, corrupt=None, vocab=model.config.vocab_size)
    with LiveServer(model, drafter, ServerSettings(model_id="tiny-chat")) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        chunks = list(client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=21, stream=True))
        text_chunks = [c for c in chunks if c.choices[0].finish_reason is None]
        final = chunks[-1]
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    tokens, rounds = [], []
    for c in text_chunks:
        ext = c.selfspec
        assert "".join(t["text"] for t in ext["tokens"]) == c.choices[0].text
        assert all(t["drafted"] == (t["origin"] == "draft") for t in ext["tokens"])
        tokens += ext["tokens"]
        rounds += ext["rounds"]
        assert {"tau", "acceptance_rate", "tokens_per_s", "new_tokens"} <= set(ext)
    want = ["target"] + [o for r in range(1, 9) for o in (["correction"] if r % 2 else ["draft"] * 3 + ["bonus"])]
    assert [t["origin"] for t in tokens] == want
    words = [model.tokenizer.word(i) for i in plain.token_ids]
    assert [t["text"] for t in tokens] == [words[0]] + [" " + w for w in words[1:]]
    assert [(r["tokens"], r["accepted"], r["proposed"]) for r in rounds] == \
        [(1, 0, 0)] + [(1, 0, 3) if r % 2 else (4, 3, 3) for r in range(1, 9)]
    assert [r["round"] for r in rounds] == list(range(1, 10))
    stats = final.selfspec  # the finishing chunk keeps the generation's stats
    assert stats["accepted"] == 12 and stats["drafted"] == 24 and stats["drafter"] == "scripted"
    assert text_chunks[-1].selfspec["tau"] == pytest.approx(21 / 9, abs=1e-3)


def test_chat_stream_request_may_choose_the_drafter(model):
    """`"selfspec": {"draft": NAME}` picks one of the server's choices (built on first use); the
    greedy text is the same; an unknown choice is a 400 naming the parameter; /v1/models lists
    the choices; the playground page loads."""
    settings = ServerSettings(model_id="tiny-chat", draft_choices=("none", "ngram"), api_key="k")
    with LiveServer(model, None, settings) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert client.models.retrieve("tiny-chat").model_extra["drafts"] == ["none", "ngram"]
        kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=24)
        texts = {}
        for draft in ("none", "ngram"):
            chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"selfspec": {"draft": draft}}))
            texts[draft] = "".join(c.choices[0].delta.content or "" for c in chunks)
            final = next(c for c in chunks if c.choices[0].finish_reason)
            assert final.selfspec["drafter"] == draft
            spans = [t for c in chunks if c.choices[0].delta.content for t in c.selfspec["tokens"]]
            assert "".join(t["text"] for t in spans) == texts[draft]
        assert texts["none"] == texts["ngram"]
        whole = client.chat.completions.create(**kw)  # not streamed: unchanged
        assert whole.choices[0].message.content == texts["none"]
        with pytest.raises(openai.BadRequestError, match="layer-skip") as e:
            client.chat.completions.create(**kw, extra_body={"selfspec": {"draft": "layer-skip"}})
        assert e.value.body["param"] == "selfspec.draft"
        import httpx

        page = httpx.get(live.url + "/")  # no key needed for the page itself
        assert page.status_code == 200 and "playground.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("playground.js", "playground.css"):
            assert httpx.get(f"{live.url}/static/{name}").status_code == 200
        assert httpx.get(live.url + "/static/secret.py").status_code == 404


# ------------------------------------------------------------------------ terminal and summary
def test_terminal_painter_colours_only_when_asked(model):
    for colour in (False, True):
        gen = stream(model, PROMPT, max_new_tokens=20,
                     drafter=ScriptedDrafter(len(PROMPT), generate(model, PROMPT, max_new_tokens=20).token_ids, 3, corrupt=None))
        out = io.StringIO()
        painter = TerminalPainter(out, DraftView(model.tokenizer, gen.stats), colour=colour)
        for chunk in gen:
            painter.write(chunk)
        text = out.getvalue()
        if not colour:
            assert text == gen.result.text and "\x1b" not in text
        else:
            assert ANSI.sub("", text) == gen.result.text
            assert "\x1b[32m" in text and "\x1b[35m" in text  # green drafts, magenta target tokens
            assert "\x1b[4;35m" in text or "\x1b[35;4m" in text  # underlined corrections


def test_summary_line_and_estimate():
    s = SpecStats(new_tokens=30, rounds=12, drafted=24, accepted=18, decode_seconds=1.5)
    line = summary_line(s, 0.1)
    assert "tau 2.50" in line and "18/24 drafts accepted (75%)" in line and "20.0 tok/s" in line
    assert "2.00x vs plain decoding estimated by the cost model (10.0 tok/s)" in line
    assert estimate(s, 0.1) == {"estimated_plain_tokens_per_s": 10.0, "estimated_speedup": pytest.approx(2.0)}
    assert "no estimate of plain decoding" in summary_line(s, None)
    assert estimate(s, None)["estimated_speedup"] is None


def test_plain_step_from_auto_costs_or_the_cache(model, tmp_path, monkeypatch):
    import torch

    from selfspec.drafters.costs import _key

    assert plain_step_seconds(model, SimpleNamespace(costs=SimpleNamespace(step=0.02))) == 0.02
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    assert plain_step_seconds(model, None) is None  # nothing cached: no estimate, nothing measured
    path = tmp_path / "costs" / f"{_key(model, torch.get_num_threads())}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"verify": [0.03, 0.04]}))
    assert plain_step_seconds(model, None) == 0.03


def test_generate_show_drafts_plain_when_not_a_terminal(model, monkeypatch, tmp_path):
    """Through the CLI (in-process, the tiny model): stdout is a pipe here, so no colour; the
    summary line goes to stderr; --json gets each token's origin."""
    from typer.testing import CliRunner

    import selfspec.models.loading as loading
    from selfspec.cli.main import app

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: model)
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    args = ["generate", "--prompt", "say sa sa say sa sa say sa sa", "--no-chat", "-n", "24", "--draft", "ngram",
            "--show-drafts"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and r.stdout.strip()
    assert "drafts: tau" in r.stderr and "no estimate of plain decoding" in r.stderr
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    origins = report["show_drafts"]["origins"]
    assert len(origins) == len(report["token_ids"]) and set(origins) <= {"draft", "correction", "bonus", "target"}
    assert origins.count("draft") == report["stats"]["accepted"]
    assert "\x1b" not in r.stdout + r.stderr
