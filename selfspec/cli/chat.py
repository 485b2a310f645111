"""`selfspec chat`: a multi-turn conversation in the terminal, streamed, that keeps the KV of the
conversation between turns (selfspec/prefix.py), so each turn processes only the new message.

Each turn renders the whole conversation through the chat template and tokenises it; the ids
of the earlier turns are those the cache already holds wherever the template renders earlier
turns the same way (SmolLM2's and Qwen's do), and wherever they differ (an answer whose text
tokenises differently than it was generated) the longest common prefix is still reused: reuse
never depends on it for correctness. A model without a chat template (Gemma-3 270M is a base
model) chats in raw text: the conversation is one growing text that the model continues, each
message on a new line after the last answer.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Iterator, Optional, TextIO

import typer

from selfspec.cli.options import DRAFTER, MODEL, SAMPLING, command, load, sampling_params, split_drafter
from selfspec.errors import ContextOverflowError, SelfspecError

if TYPE_CHECKING:  # torch: imported when a session starts, not for `--help`
    from selfspec.generation import Generation, SpecStats
    from selfspec.sampling import SamplingParams

HELP = "/reset starts over, /stats shows the last turn's numbers, /exit or Ctrl-D quits; Ctrl-C stops an answer."


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
        x = s.extras
        cached, processed = x.get("cached_prompt_tokens", 0), x.get("prefill_tokens", s.prompt_tokens)
        line = (f"last turn: {s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s (decode), draft {s.drafter}")
        if s.drafter != "none":
            line += f", tau {s.mean_accepted_tokens:.2f}, accepted {100 * s.acceptance_rate:.0f}%"
        line += (f"; prompt {s.prompt_tokens} tokens: {cached} reused, {processed} processed in "
                 f"{s.prefill_seconds:.3f} s (time to first token)")
        return line


def run(session: ChatSession, out: TextIO = sys.stdout) -> int:
    """The terminal loop: `> ` prompts, streamed answers, commands; returns the exit status."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    mode = "chat template" if session.templated else "raw text: this model has no chat template"
    print(f"chatting with {session.model.name} ({mode}, draft {getattr(session.drafter, 'name', 'none')}). {HELP}",
          file=out, flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            print(file=out)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if text == "/stats":
            print(session.stats_line(), file=out, flush=True)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, file=out, flush=True)
            continue
        answer = session.ask(line)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            answer.close()
            out.write(" [stopped]")
        except SelfspecError as e:
            out.write(f"error: {e}")
        out.write("\n")
        out.flush()


@command(interrupted="interrupted")
def chat(
    model=MODEL,
    system: Annotated[Optional[str], typer.Option(help="System message (none unless given).")] = None,
    chat_template: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Use the model's chat template (default: when it has one; a model without one chats in raw text, continuing the conversation's text).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer.")] = 512,
    sampling=SAMPLING,
    drafter=DRAFTER,
) -> None:
    """Chat in the terminal: multi-turn, streamed; each turn processes only the new message (the
    conversation's KV is kept). /reset, /stats, /exit; Ctrl-D quits, Ctrl-C stops an answer."""
    from selfspec.drafters.factory import build_drafter

    sampling = sampling_params(sampling)
    draft, options = split_drafter(drafter, model.model)
    if max_new_tokens < 1:
        raise SelfspecError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    m = load(model)
    drafter = build_drafter(draft, m, dtype=model.dtype, threads=model.threads, **options)
    session = ChatSession(m, drafter, sampling, max_new_tokens=max_new_tokens, system=system, chat=chat_template)
    raise typer.Exit(run(session))
