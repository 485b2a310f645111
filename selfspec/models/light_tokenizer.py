"""A tokenizer without `import transformers`: the `tokenizers` library's Rust tokenizer plus jinja2
for the chat template, over a folder that transformers wrote (a GGUF's converted tokenizer,
`loading.load_gguf_tokenizer`). It covers the part of a transformers tokenizer that selfspec
calls, no more: `tok(text).input_ids`, `decode`, `apply_chat_template(..., tokenize=False)`,
`get_vocab`, `len`, the special tokens and their ids, `chat_template`, `backend_tokenizer`.

It is only used where `selfspec.models.tokenizer_check` found it equal to transformers' tokenizer
of the same folder (`light.json`): transformers' start-up (~0.8 s of imports; ~3 s of Python JSON
parsing for Gemma-3's 262k vocabulary) is the larger part of a warm `load_model`. What makes the
two equal, and what this module must therefore keep doing the way transformers 5 does:
  * encoding and decoding are the backend's own (`Tokenizer.encode`, `Tokenizer.decode`), with
    the backend transformers ends up with: its `tokenizer.json` or, where transformers changes
    it on load (Qwen2's tokenizer adds an NFC normalizer), the changed one that the check saved;
    no truncation, no padding (what transformers' calls set by default);
  * decoding never "cleans up tokenization spaces" (a folder that asks for it is unsupported);
  * the chat template renders in a sandboxed jinja2 environment with trim_blocks, lstrip_blocks,
    loop controls and the `{% generation %}` tag, the globals `raise_exception`, `strftime_now`,
    `dict` and `namespace` and a `tojson` filter that does not escape HTML, and gets the named
    special tokens (`bos_token`, `eos_token`, ...) as variables next to `messages`, `tools`,
    `documents` and `add_generation_prompt`.
"""
from __future__ import annotations

import json
from pathlib import Path

# transformers' named special tokens, in the order of its special-tokens map.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # read by templates under these names
MIN_JINJA = (3, 1, 6)  # transformers refuses older jinja2 (sandbox escapes); so do we


class UnsupportedTokenizer(ValueError):
    """A folder this tokenizer cannot reproduce transformers' behaviour for (the check records
    the reason and keeps transformers' tokenizer)."""


class Encoding:
    """What calling the tokenizer returns: `input_ids`, a list of ids (a list of lists for a batch)."""

    __slots__ = ("input_ids",)

    def __init__(self, input_ids: list) -> None:
        self.input_ids = input_ids


class LightTokenizer:
    kind = "light"  # Model.load_info["tokenizer"]
    clean_up_tokenization_spaces = False  # folders that ask for the clean-up are refused

    def __init__(self, backend, config: dict, chat_template: str | None) -> None:
        backend.no_truncation()
        backend.no_padding()
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.special_tokens_map = {name: _token_text(config[name]) for name in NAMED_SPECIAL_TOKENS
                                   if config.get(name) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if not isinstance(extra, list):  # a dict names model-specific tokens: transformers adds attributes
            raise UnsupportedTokenizer(f"extra special tokens given as {type(extra).__name__}")
        every = [*self.special_tokens_map.values(), *map(_token_text, extra)]
        self.all_special_tokens = list(dict.fromkeys(every))
        self._compiled: tuple[str, object] | None = None  # (source, template): compiled on first use

    @classmethod
    def from_folder(cls, folder: Path, backend_file: str = "tokenizer.json") -> "LightTokenizer":
        """The tokenizer of a folder transformers saved (`save_pretrained`), with the backend read
        from `backend_file` in it. Raises `UnsupportedTokenizer` for what it does not reproduce."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if config.get("clean_up_tokenization_spaces"):
            raise UnsupportedTokenizer("clean_up_tokenization_spaces is set")
        if config.get("split_special_tokens"):
            raise UnsupportedTokenizer("split_special_tokens is set")
        if (folder / "additional_chat_templates").exists():
            raise UnsupportedTokenizer("several chat templates")
        template = config.get("chat_template")
        if (folder / CHAT_TEMPLATE_FILE).is_file():  # the file wins over the config's entry, as in transformers
            template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise UnsupportedTokenizer("several chat templates")
        return cls(Tokenizer.from_file(str(folder / backend_file)), config, template)

    # ------------------------------------------------------------------------------ vocabulary
    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """A token's id; an unknown token is the unknown token's id (None without one)."""
        index = self.backend_tokenizer.token_to_id(token)
        if index is None and token != self.special_tokens_map.get("unk_token"):
            return self.unk_token_id
        return index

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    # ------------------------------------------------------------------------ encode and decode
    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> Encoding:
        """`text`'s ids (`.input_ids`), with the post-processor's special tokens (e.g. Gemma's
        `<bos>`) unless `add_special_tokens=False`; a list of texts gives a list of id lists."""
        if isinstance(text, str):
            return Encoding(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            encodings = self.backend_tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
            return Encoding([e.ids for e in encodings])
        raise ValueError(f"text input must be a str or a list of str, got {type(text).__name__}")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------- chat template
    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **variables) -> str:
        """The conversation rendered by the chat template, as text (`tokenize=False`: selfspec
        tokenises the text itself, without adding special tokens). `variables` reach the
        template beside the special tokens, which they override."""
        if tokenize:
            raise NotImplementedError("the light tokenizer renders chat templates as text only: pass tokenize=False")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (chat_template is not set)")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("a conversation is a non-empty list of messages")
        messages = [_template_message(m) for m in conversation]
        for name, value in variables.items():  # the sandbox's only inputs are plain data
            if value is not None and type(value) not in (str, int, float, bool):
                raise TypeError(f"template variable {name!r} must be a string, number or boolean, "
                                f"got {type(value).__name__}")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, compile_template(self.chat_template))
        return self._compiled[1].render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens_map, **variables})


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's fields."""
    return token["content"] if isinstance(token, dict) else str(token)


def _template_message(message) -> dict:
    """A message as the template sees it: a fresh dict without None fields, its reasoning (if
    any) under every name a template may read it by. Only string fields: richer content (parts,
    tool calls) is transformers' to flatten, not ours."""
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    out = {k: v for k, v in message.items() if v is not None}
    for k, v in out.items():
        if type(k) is not str or type(v) is not str:
            raise TypeError(f"the light tokenizer renders messages of string fields only; "
                            f"got {k!r}: {type(v).__name__}")
    reasoning = next((out[k] for k in REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def compile_template(source: str):
    """`source` compiled in the chat-template environment (module docstring)."""
    from datetime import datetime

    import jinja2
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.nodes import CallBlock
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < MIN_JINJA:
        raise ImportError(f"chat templates need jinja2 >= {'.'.join(map(str, MIN_JINJA))}, found {jinja2.__version__}")

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
        rendering it is rendering its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class DictFactory:
        """`dict(...)` and `dict.fromkeys(...)` in a template, without handing it the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def public(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template cannot set the underscore attribute {name!r} on a namespace")

    class SafeNamespace(Namespace):
        """jinja2's `namespace` that refuses underscore names (no way to CPython's internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 (jinja2's signature: `self` may be a keyword)
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                public(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            public(name)
            Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictFactory(),
                       namespace=SafeNamespace)
    return env.from_string(source)
