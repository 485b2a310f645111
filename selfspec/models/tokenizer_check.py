"""Whether the light tokenizer (`light_tokenizer.py`) of a converted tokenizer folder behaves
exactly like transformers' tokenizer of the same folder, decided once and kept in `light.json`.

The check runs where transformers is loaded anyway: when a GGUF's tokenizer is converted, and once
for a folder converted before the check existed, or when the check, transformers, tokenizers or
jinja2 changed since (the marker records their versions), or a file of the folder did. It compares
the two tokenizers on a fixed probe set: encodings with and without special tokens of varied text
(unicode in several scripts and normal forms, emoji, code, whitespace runs, numbers, the special
and added tokens' own strings, the bench suites' prompts), decodings of those ids and of ids
spread over the whole vocabulary (special tokens included, with and without
`skip_special_tokens`, whole and incrementally as `selfspec.text` decodes a stream), the chat
template over a fixed set of conversations with and without the generation prompt, and the
attributes selfspec reads (vocabulary, special tokens and ids, chat template, space clean-up).
Any difference, or an error on one side only, keeps transformers' tokenizer for that folder.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

CHECK_VERSION = 1
MARKER = "light.json"
# transformers' backend where it differs from the folder's tokenizer.json (it changes some on load).
LIVE_BACKEND = "light-tokenizer.json"
VERSIONED = ("transformers", "tokenizers", "jinja2")  # packages whose behaviour the result depends on

PROBE_TEXTS = (
    "Hello, world!",
    "",
    " ",
    "  two leading spaces, two trailing  ",
    "tabs\tand\nnewlines\r\n\n\nafter three line breaks",
    "   \n\n   \t\t  \n",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "```python\nprint('hi')\n```\n{\"key\": [1, 2.5, {\"nested\": null}], 'x': True}",
    "Ünïcödé: naïve café, Straße, 東京タワー, Привет мир, مرحبا بالعالم, हिन्दी, 한국어, ภาษาไทย",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇩🇪 keycap 1\ufe0f\u20e3",
    "normal forms: e\u0301 \u00e9, \ufb01 ligature, ＡＢＣ full width, \u2126 \u03a9, \u212b \u00c5",
    "invisible: no\u00a0break\u2009thin\u200bzero\u200dwidth\ufeffbom \u2028line",
    "control \x00 \x07 \x1b[31mred\x1b[0m \x7f",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 𠜎𠜱",
    "numbers 0 1 12 123 1234 12345 123456789 3.14159 -42 1e-10 1,000,000 ½ ² ٣",
    "URL https://example.com/a/b?q=1&r=%20x#frag and mail first.last@example.org",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "I'm sure they'll say it's 'quoted' — don't they? \"Yes\", «oui», „ja“.",
    "<s></s><unk><pad><bos><eos><|endoftext|><|im_start|><|im_end|> <start_of_turn> [INST]",
)

CONVERSATIONS = (
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Answer in German."}, {"role": "user", "content": "Ünïcödé 😀 <|im_end|>"},
     {"role": "assistant", "content": "  Leerzeichen \n\n"}, {"role": "user", "content": "def f():\n\treturn 1"}],
    [{"role": "user", "content": ""}],
    [{"role": "assistant", "content": "I start."}],
)


# -------------------------------------------------------------------------------------- probes
def probe_texts(reference) -> list[str]:
    """The texts both tokenizers encode: PROBE_TEXTS, the reference's special and added tokens
    alone and inside text, and the bench suites' prompts."""
    from importlib import resources

    specials = list(reference.all_special_tokens)
    added = sorted(t.content for t in reference.added_tokens_decoder.values())[:64]
    texts = list(PROBE_TEXTS)
    texts += ["".join(specials), " ".join(specials), f"text {' and '.join(specials)} text"]
    texts += ["".join(added), f"x{' x'.join(added)} x"]
    suites = resources.files("selfspec").joinpath("data", "suites")
    for suite in sorted((f for f in suites.iterdir() if f.name.endswith(".jsonl")), key=lambda f: f.name):
        for line in suite.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["prompt"]] if "prompt" in row else row["turns"]
    return texts


def probe_ids(reference, texts: list[str]) -> list[list[int]]:
    """Id sequences both tokenizers decode: the reference's encodings of `texts`, the special
    tokens' ids among text, and ids spread over the whole vocabulary (byte tokens whose bytes
    are not whole characters included)."""
    seqs = [list(reference(t).input_ids) for t in texts]
    special = [i for i in reference.all_special_ids if i is not None]
    hello = list(reference("Hello there", add_special_tokens=False).input_ids)
    seqs += [special, special + hello + special, hello + special[:1] + hello]
    rng = random.Random(CHECK_VERSION)
    size = len(reference)
    seqs += [[rng.randrange(size) for _ in range(24)] for _ in range(60)]
    seqs += [list(range(start, min(start + 48, size))) for start in (0, 48, 96, 200, size - 48)]
    return seqs


def outcome(fn: Callable[[], object]) -> object:
    """What `fn` returns, or which error it raised (an error on both sides is a match)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (any error is an outcome to compare)
        return f"raised {type(e).__name__}"


def _incremental(tokenizer, ids: list[int]) -> list[str]:
    from selfspec.text import TextStream

    stream = TextStream(tokenizer)
    return [stream.push([i]) for i in ids] + [stream.finish()]


def probe(tokenizer, texts: list[str], seqs: list[list[int]]) -> dict[str, object]:
    """Everything compared, by name: the same names for both tokenizers."""
    out: dict[str, object] = {}
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id", "chat_template",
                 "clean_up_tokenization_spaces", "special_tokens_map", "all_special_tokens"):
        out[name] = outcome(lambda: getattr(tokenizer, name))
    out["len"] = outcome(lambda: len(tokenizer))
    out["vocab"] = outcome(tokenizer.get_vocab)
    out["has_backend"] = getattr(tokenizer, "backend_tokenizer", None) is not None
    def encode(text, special: bool = True) -> list:
        return list(tokenizer(text, add_special_tokens=special).input_ids)

    for i, text in enumerate(texts):
        out[f"encode[{i}]"] = outcome(lambda: encode(text))
        out[f"encode[{i}], no special tokens"] = outcome(lambda: encode(text, special=False))
    out["encode a batch"] = outcome(lambda: [list(x) for x in encode(texts[:8], special=False)])
    for i, ids in enumerate(seqs):
        out[f"decode[{i}]"] = outcome(lambda: tokenizer.decode(ids))
        out[f"decode[{i}], skipping special tokens"] = outcome(lambda: tokenizer.decode(ids, skip_special_tokens=True))
    for i, ids in enumerate(seqs[:12] + seqs[-8:]):
        out[f"stream[{i}]"] = outcome(lambda: _incremental(tokenizer, ids))
    for i, messages in enumerate(CONVERSATIONS):
        for gen in (True, False):
            key = f"chat[{i}], generation prompt {gen}"
            out[key] = text = outcome(lambda: tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=gen))
            if isinstance(text, str):
                out[key + ", ids"] = outcome(lambda: encode(text, special=False))
    return out


def differences(reference: dict, light: dict, limit: int = 8) -> list[str]:
    """The first `limit` probes whose outcomes differ, each with both values (shortened)."""
    def short(v) -> str:
        s = repr(v)
        return s if len(s) <= 160 else s[:157] + "..."

    diff = [k for k in reference if reference[k] != light.get(k)]
    return [f"{k}: transformers {short(reference[k])}, light {short(light.get(k))}" for k in diff[:limit]] + (
        [f"... and {len(diff) - limit} more"] if len(diff) > limit else [])


# ------------------------------------------------------------------------------------- marker
def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _stamp(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """Size and modification time of the folder's files the light tokenizer reads."""
    out = {}
    for name in names:
        p = folder / name
        if p.is_file():
            st = p.stat()
            out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _read_files(backend: str) -> list[str]:
    from selfspec.models.light_tokenizer import CHAT_TEMPLATE_FILE

    return sorted({backend, "tokenizer_config.json", CHAT_TEMPLATE_FILE})


def current_marker(folder: Path) -> dict | None:
    """The folder's marker where it is current: the same check, the same transformers, tokenizers
    and jinja2, the same files as when it was written; None where the check must run (again).
    Its `match` says whether the light tokenizer may be used, `backend` which file it reads."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("check") != CHECK_VERSION or marker.get("versions") != versions():
        return None
    if marker.get("match") is True and marker.get("backend") not in ("tokenizer.json", LIVE_BACKEND):
        return None
    if marker.get("files") != _stamp(folder, _read_files(marker.get("backend") or "tokenizer.json")):
        return None
    return marker


def check_folder(folder: Path, reference) -> dict:
    """Compare the light tokenizer of `folder` with `reference` (transformers' tokenizer of the
    same folder) and write the marker; returns it. Where transformers' backend differs from the
    folder's tokenizer.json, the light tokenizer reads transformers' backend, saved beside it.
    A check that cannot be run (a tokenizer without a Rust backend, an unreadable file) is a
    difference: the folder keeps transformers' tokenizer."""
    from selfspec.paths import atomic_write_json

    folder = Path(folder)
    marker = {"check": CHECK_VERSION, "versions": versions(), "reference": type(reference).__name__}
    try:
        marker.update(_compare(folder, reference))
    except Exception as e:  # noqa: BLE001 (whatever stops the check keeps transformers' tokenizer)
        marker.update(match=False, differences=[f"the check failed: {type(e).__name__}: {e}"])
    marker["files"] = _stamp(folder, _read_files(marker.get("backend", "tokenizer.json")))
    atomic_write_json(folder / MARKER, marker)
    return marker


def _compare(folder: Path, reference) -> dict:
    from tokenizers import Tokenizer

    from selfspec.models.light_tokenizer import LightTokenizer, UnsupportedTokenizer
    from selfspec.paths import atomic_write_text

    live = reference.backend_tokenizer.to_str()
    backend = "tokenizer.json"
    if Tokenizer.from_file(str(folder / backend)).to_str() != live:
        backend = LIVE_BACKEND
        atomic_write_text(folder / backend, live)
    try:
        light = LightTokenizer.from_folder(folder, backend)
    except UnsupportedTokenizer as e:
        return {"backend": backend, "match": False, "differences": [f"unsupported: {e}"]}
    texts = probe_texts(reference)
    seqs = probe_ids(reference, texts)
    found = differences(probe(reference, texts, seqs), probe(light, texts, seqs))
    return {"backend": backend, "match": not found, "differences": found, "probes": len(texts) + len(seqs)}
