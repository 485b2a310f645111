"""The OpenAI wire format the server speaks (`selfspec serve`): request schemas, their validation
into a prompt + `SamplingParams`, response and stream-chunk bodies, and the error object.

Parameters follow OpenAI's API; `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are
extensions (as in vLLM), and so is `selfspec` (`{"draft": NAME}`: the drafter of this request).
Unknown parameters are accepted and ignored; a known OpenAI parameter that we cannot honour
(n > 1, logprobs, presence_penalty != 0, ...) is refused with a 400 naming it, because ignoring it
would silently answer a different question.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfspec.sampling import SamplingParams


class ApiError(Exception):
    """An answer with OpenAI's error object `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    # strict: "5" is not a number and 1 is not a bool (OpenAI refuses both); extra: unknown
    # parameters are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SelfspecOptions(_Strict):
    """The request extension field `selfspec` (other OpenAI-compatible servers ignore it)."""

    draft: str | None = None  # the drafter for this request; GET /v1/models lists the choices ("drafts")


class _GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # decode past end-of-text up to max_tokens (fixed-length benchmarks)
    selfspec: SelfspecOptions | None = None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """The request's sampling parameters; those it omits come from the server's flags."""
        pick = {name: getattr(self, name) if getattr(self, name) is not None else getattr(defaults, name)
                for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")}
        return SamplingParams(**pick)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    def text_or_ids(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if len(p) == 1 and isinstance(p[0], (str, list)):
            return p[0]
        if p and all(isinstance(x, int) for x in p):
            return list(p)
        if not p:
            raise ApiError(400, "prompt is an empty list; give a string or a list of token ids", param="prompt")
        raise ApiError(400, f"batched prompts ({len(p)} prompts) are not supported; send one prompt per request",
                       param="prompt")


# OpenAI parameters we accept only at their neutral value(s).
_NEUTRAL = {
    "n": ((None, 1), "n must be 1: the server returns one choice per request; send several requests instead"),
    "best_of": ((None, 1), "best_of must be 1"),
    "echo": ((None, False), "echo is not supported"),
    "logprobs": ((None, False), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "top_logprobs are not supported"),
    "presence_penalty": ((None, 0), "presence_penalty is not supported (only 0); use repetition_penalty"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported (only 0); use repetition_penalty"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "tools": ((None, []), "tools are not supported"),
    "functions": ((None, []), "functions are not supported"),
    "response_format": ((None, {"type": "text"}), "only response_format {\"type\": \"text\"} is supported"),
}


def parse_request(cls: type[_GenerationRequest], body: object) -> _GenerationRequest:
    """Validate a decoded JSON body; every problem is a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name, (neutral, message) in _NEUTRAL.items():
        value = body.get(name)
        # bool is an int: `n: true` or `echo: 0` are mistakes, not the neutral value
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            raise ApiError(400, f"{message} (got {name}={_short(value)})", param=name, code="unsupported_parameter")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = list(err["loc"])
        # Pydantic names the member of a union that failed ("str", "list[int]"); we name the
        # parameter and every shape it may take.
        tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)), None)
        param = ".".join(str(p) for p in loc[:tag]) or None
        got = f" (got {_short(err['input'])})" if "input" in err else ""
        if err["type"] == "missing":
            raise ApiError(400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
        if tag is not None and loc[tag - 1] in _SHAPES:
            raise ApiError(400, f"invalid {param}: must be {_SHAPES[loc[tag - 1]]}{got}", param=param,
                           code="invalid_value") from None
        raise ApiError(400, f"invalid {param}: {err['msg']}{got}", param=param, code="invalid_value") from None


_TYPE_TAGS = {"str", "int", "float", "bool"}
_SHAPES = {
    "prompt": "a string, a list of token ids, or a list holding one string or one list of token ids",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of text parts {"type": "text", "text": "..."}',
}


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------ responses
class Reply:
    """The id, timestamps and body shapes of one answer, for /v1/completions or /v1/chat/completions."""

    def __init__(self, chat: bool, model_id: str) -> None:
        self.chat = chat
        self.model_id = model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model_id}

    def full(self, text: str, finish_reason: str, usage: dict, stats: dict) -> dict:
        """The non-streaming body, with speculation stats in the extra field `selfspec`."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage, "selfspec": stats}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk: a text delta, or (finish_reason set) the last one."""
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage}


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
