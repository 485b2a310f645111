"""selfspec/text.py: streamed text never splits a character, stop strings are matched across token
and round (draft) boundaries, nothing after a stop is released; with a tokenizer that has no
backend (the window decoder) and with a fast tokenizer (tokenizers' DecodeStream)."""
from __future__ import annotations

import random

import pytest

from showkit import ByteTokenizer
from selfspec.text import BackendDecoder, TextStream, WindowDecoder, incremental_decoder


def _fast_byte_tokenizer():
    """A small byte-level BPE fast tokenizer (transformers wrapping a tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(["café €5 😀 naïve STOP here and there, the cat sat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)


def _feed(stream: TextStream, rounds: list[list[int]]) -> list[str]:
    out = [stream.push(r) for r in rounds]
    return out + [stream.finish()]


def test_window_decoder_holds_a_split_character_and_releases_the_rest():
    # "café €!": é split over tokens 0|1, € over 1|2|3
    tok = ByteTokenizer([b"caf\xc3", b"\xa9 \xe2", b"\x82", b"\xac!"])
    assert isinstance(incremental_decoder(tok), WindowDecoder)
    out = _feed(TextStream(tok), [[0], [1], [2], [3]])
    assert out == ["caf", "é ", "", "€!", ""]  # never a U+FFFD, nothing lost
    out = _feed(TextStream(tok), [[0, 1, 2], [3]])  # a character split across a round boundary
    assert out == ["café ", "€!", ""]


def test_stop_string_across_a_draft_boundary_releases_nothing_after_it():
    # the stop string "STOP" starts in round 1's last token and ends in round 2's first
    tok = ByteTokenizer([b"hello S", b"T", b"OP and", b" more"])
    stream = TextStream(tok, stop=["STOP"])
    out = [stream.push([0, 1]), stream.push([2, 3])]
    assert out == ["hello ", ""] and stream.stopped
    assert stream.finish() == "" and stream.push([3]) == ""
    assert stream.text == "hello " and stream.ids_through_stop() == [0]  # the stop string's tokens are dropped


def test_a_possible_stop_string_is_held_back_then_released():
    tok = ByteTokenizer([b"a S", b"T", b"ay"])
    stream = TextStream(tok, stop=["STOP"])
    assert stream.push([0]) == "a " and stream.push([1]) == "" and stream.push([2]) == "STay"
    assert not stream.stopped


def test_fast_tokenizer_streams_through_decode_stream():
    pytest.importorskip("tokenizers.decoders", reason="tokenizers")
    tok = _fast_byte_tokenizer()
    assert isinstance(incremental_decoder(tok), BackendDecoder)
    text = "café €5 😀 naïve STOP here"
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(20):  # random round boundaries: same text as decoding all ids, never a U+FFFD
        stream, out, i = TextStream(tok), [], 0
        while i < len(ids):
            n = rng.randint(1, 4)
            out.append(stream.push(ids[i: i + n]))
            i += n
        out.append(stream.finish())
        assert "".join(out) == tok.decode(ids, skip_special_tokens=True) == text
        assert not any("\ufffd" in piece for piece in out)
    # byte by byte: every character split across tokens is held until it is whole
    byte_ids = [tok.convert_tokens_to_ids(pre) for pre in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("€😀")[0][0]]
    if all(isinstance(i, int) for i in byte_ids) and len(byte_ids) == 7:
        stream = TextStream(tok)
        assert [stream.push([i]) for i in byte_ids] == ["", "", "€", "", "", "", "😀"]
    # a stop string over a round boundary
    stream = TextStream(tok, stop=["STOP here"])
    cut = next(n for n in range(len(ids)) if "STOP" in tok.decode(ids[:n]))  # " here" comes in the next round
    released = stream.push(ids[:cut]) + stream.push(ids[cut:]) + stream.finish()
    assert released == "café €5 😀 naïve " and stream.stopped
