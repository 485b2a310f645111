"""Streaming text out of token ids: incremental detokenisation and stop strings.

`TextStream` turns a generation's token ids, pushed a round at a time, into released text:
  * a multi-byte character is never split: the text of a token that ends inside one is held
    back until the token that completes it arrives;
  * stop strings are matched across token and round boundaries: text that could still grow into
    a stop string is held back, and nothing from a stop on is ever released;
  * each token is decoded once, with a bounded context: fast tokenizers (a transformers tokenizer
    wrapping a `tokenizers.Tokenizer` as `.backend_tokenizer`) through the tokenizers library's
    `DecodeStream`, any other tokenizer (one with `.decode(ids)` only) by decoding a window that
    starts one whole token before the new one. Nothing re-decodes the sequence: O(n) in all.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

REPLACEMENT = "\ufffd"  # what a decoder makes of the bytes of an incomplete character


def _complete(text: str) -> str:
    """`text` without a trailing incomplete character."""
    return text[: len(text.rstrip(REPLACEMENT))] if text.endswith(REPLACEMENT) else text


class WindowDecoder:
    """Incremental decoding with any tokenizer's `decode`: each step decodes the ids from the
    window start (one token before the last clean boundary: context for the decoder's rules on
    leading spaces) and returns the complete characters not returned yet."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # first id of the window
        self.done = 0  # characters of the window's text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def step(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode(self.ids[self.start:])
        complete = _complete(text)
        piece = complete[self.done:]
        self.done = max(self.done, len(complete))
        if len(complete) == len(text) and len(self.ids) - 1 > self.start:  # a clean end: slide the window
            self.start = len(self.ids) - 1
            self.done = len(self._decode(self.ids[self.start:]))
        return piece


class BackendDecoder:
    """Incremental decoding with the tokenizers library's `DecodeStream`."""

    def __init__(self, backend) -> None:
        from tokenizers.decoders import DecodeStream

        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self.stream.step(self.backend, int(token)) or ""


def incremental_decoder(tokenizer):
    """`DecodeStream` where it decodes exactly as `tokenizer.decode` does: a fast tokenizer that
    does not clean up spaces after decoding (that clean-up is transformers', not the backend's);
    the window decoder otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        try:
            return BackendDecoder(backend)
        except ImportError:  # a tokenizers library without DecodeStream
            pass
    return WindowDecoder(tokenizer)


class TextStream:
    """Incremental detokenisation that never splits a multi-byte character, and stop strings
    matched across token boundaries: text that could still become a stop string is held back,
    and nothing after a stop is released (module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (whole characters)
        self.ends: list[int] = []  # ends[i]: len(self.text) once ids[: i + 1] were decoded
        self.sent = 0  # characters of self.text released
        self.stopped = False
        self._decoder = incremental_decoder(tokenizer)
        self._pieces: list[str] = []

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        n = len(self.text)
        for token in ids:
            piece = self._decoder.step(token)
            if piece:
                self._pieces.append(piece)
                n += len(piece)
            self.ids.append(token)
            self.ends.append(n)
        if self._pieces:
            self.text += "".join(self._pieces)
            self._pieces.clear()
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def ids_through_stop(self) -> list[int]:
        """The shortest prefix of the ids whose text reaches the end of the released text (after a
        stop: nothing of the stop string's tokens beyond the one where it starts)."""
        n = bisect_left(self.ends, len(self.text))
        return self.ids[: n + 1] if n < len(self.ids) else list(self.ids)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            final = True
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if s.startswith(self.text[end - n:]):
                        end = min(end, len(self.text) - n)
                        break
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
