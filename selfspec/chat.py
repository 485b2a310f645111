"""A multi-turn conversation that keeps the KV of the conversation between turns
(selfspec/prefix.py), so each turn processes only the new message; `selfspec chat` is its terminal.

Each turn renders the whole conversation through the chat template and tokenises it; the ids
of the earlier turns are those the cache already holds wherever the template renders earlier
turns the same way (SmolLM2's and Qwen's do), and wherever they differ (an answer whose text
tokenises differently than it was generated) the longest common prefix is still reused: reuse
never depends on it for correctness. A model without a chat template (Gemma-3 270M is a base
model) chats in raw text: the conversation is one growing text that the model continues, each
message on a new line after the last answer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from selfspec.errors import ContextOverflowError, SelfspecError

if TYPE_CHECKING:
    from selfspec.generation import Generation, SpecStats
    from selfspec.sampling import SamplingParams


class ChatSession:
    """The conversation so far and the KV it left in the model's cache."""

    def __init__(self, model, drafter=None, sampling: SamplingParams | None = None, max_new_tokens: int = 512,
                 system: str | None = None, chat: bool | None = None) -> None:
        from selfspec.prefix import PrefixCache
        from selfspec.sampling import SamplingParams

        self.model = model
        self.drafter = drafter
        self.sampling = sampling or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.templated = model.has_chat_template if chat is None else chat
        if self.templated and not model.has_chat_template:
            raise SelfspecError(f"model {model.name!r} has no chat template; chat in raw text (--no-chat)")
        self.prefix = PrefixCache(model)
        self.last: SpecStats | None = None  # stats of the last turn
        self.reset()

    def reset(self) -> None:
        system = [{"role": "system", "content": self.system}] if self.system and self.templated else []
        self.messages: list[dict] = system
        self.transcript = self.system + "\n" if self.system and not self.templated else ""
        self.prefix.clear()
        self.last = None

    def prompt_ids(self, message: str) -> list[int]:
        if self.templated:
            return self.model.encode_messages(self.messages + [{"role": "user", "content": message}])
        return self.model.encode(self._raw_text(message), chat=False)

    def _raw_text(self, message: str) -> str:
        return f"{self.transcript}\n{message}\n" if self.transcript else f"{message}\n"

    def ask(self, message: str) -> Iterator[str]:
        """Stream the answer to `message`. The conversation keeps what was streamed, also when
        the caller stops early (close the iterator, or Ctrl-C inside it)."""
        from selfspec.generation import stream

        ids = self.prompt_ids(message)
        room = self.model.ctx_size - len(ids)
        if room < 1:
            raise ContextOverflowError(f"the conversation ({len(ids)} tokens) fills the context of "
                                       f"{self.model.ctx_size} tokens; /reset to start over (or raise --ctx-size)")
        gen: Generation = stream(self.model, ids, drafter=self.drafter, sampling=self.sampling,
                                 max_new_tokens=min(self.max_new_tokens, room), prefix=self.prefix)
        parts: list[str] = []
        try:
            for chunk in gen:
                if chunk.text:
                    parts.append(chunk.text)
                    yield chunk.text
        finally:
            gen.close()  # at once: the prefix cache learns what the cache holds now
            answer = "".join(parts)
            if self.templated:
                self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
            else:
                self.transcript = self._raw_text(message) + answer
            self.last = gen.stats

    def stats_line(self) -> str:
        s = self.last
        if s is None:
            return "no turn yet"
        cached, processed = s.extras.get("cached_prompt_tokens", 0), s.extras.get("prefill_tokens", s.prompt_tokens)
        return (f"last turn: {s.summary()}; prompt {s.prompt_tokens} tokens: {cached} reused, {processed} processed "
                f"in {s.prefill_seconds:.3f} s (time to first token)")
