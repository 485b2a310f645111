"""Helpers for the tests of `selfspec.draftview`, the stream extension field and the playground (no
tests here): tokenizers with known text per token, drafters with a known accept/reject pattern,
and an in-process server on a loopback port."""
from __future__ import annotations

import socket
import threading
import time
import zlib

import httpx
import torch

from distributions import StubDrafter
from selfspec.drafters.base import Draft

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70


class WordTokenizer:
    """Token i is a made-up word; text is the words joined by spaces. Has a chat template, so the
    tiny random model can serve /v1/chat/completions (the playground)."""

    chat_template = "role: content lines"
    eos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = [SYLLABLES[i % 70] + SYLLABLES[(i * 7 + 3) % 70][0] for i in range(vocab_size)]

    def word(self, i: int) -> str:
        return self.words[int(i)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.word(i) for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()]
        return type("Encoding", (), {"input_ids": ids or [0]})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return text + ("\nassistant:" if add_generation_prompt else "")

    def get_vocab(self) -> dict[str, int]:
        return {w + str(i): i for i, w in enumerate(self.words)}


class ByteTokenizer:
    """Token i is the bytes `pieces[i]`: text is their UTF-8 decoding with U+FFFD for what is not
    (yet) a whole character, as byte-level BPE tokenizers decode."""

    chat_template = None
    eos_token_id = None

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


class Alternating(StubDrafter):
    """Drafts the target's own greedy continuation (an oracle, for any prompt) and spoils the last
    draft token on every other round: rounds alternate between k accepted drafts + the bonus
    token and k - 1 accepted drafts + a correction."""

    name = "alternating"

    def __init__(self, k: int = 4) -> None:
        self.k, self.rounds = k, 0

    def propose(self, ctx, max_tokens: int) -> Draft:
        self.rounds += 1
        tr, vocab = ctx.model.transformer, ctx.model.config.vocab_size
        pos, tok, out = len(ctx.tokens) - 1, ctx.tokens[-1], []
        for j in range(min(self.k, max_tokens)):
            logits = tr.forward(torch.tensor([tok], dtype=torch.long), pos + j, ctx.cache)  # [1, vocab]
            tok = int(logits[-1].argmax())
            out.append(tok)
        if self.rounds % 2 and out:
            out[-1] = (out[-1] + 1) % vocab
        return Draft(torch.tensor(out, dtype=torch.long))

    def reset(self):
        self.rounds = 0


def word_model(tmp_path, ctx_size: int = 512):
    """The tiny random Llama of tests/tiny.py (with room for a chat of a few turns) and a
    `WordTokenizer` (chat template included)."""
    from selfspec.models.loading import Model, load_transformer
    from tiny import build_tiny

    _, folder = build_tiny("llama", tmp_path, max_position_embeddings=ctx_size)
    tr = load_transformer(folder, torch.float32, ctx_size)
    return Model(name="tiny-chat", path=folder, config=tr.config, transformer=tr,
                 tokenizer=WordTokenizer(tr.config.vocab_size), dtype="fp32", ctx_size=tr.rope_max, load_seconds=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`create_app(model, drafter, settings)` under uvicorn in a thread on a free loopback port."""

    def __init__(self, model, drafter, settings) -> None:
        import uvicorn

        from selfspec.server.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(model, drafter, settings), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        end = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("the test server did not start within 30 s")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
