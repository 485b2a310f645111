"""See speculation at work: which characters of the streamed text came from accepted draft tokens
and which from the target, per verify round (`generate --show-drafts`, the server's stream
extension field `selfspec`, the playground at `/`).

A `Chunk` says which of its token ids were accepted drafts, but its text can lag its ids (a
partial multi-byte character, a tail that may grow into a stop string is held back), so text and
tokens are matched here: `DraftView` decodes the ids as they come, records where each token's text
ends, and splits each chunk's released text at those ends. The text itself is always exactly the
chunk's text (stop strings cut it as before); only its attribution is computed. A character whose
bytes span several tokens belongs to the token that completes it: it never shows half-coloured.

Origins of a token: "draft" (a draft token the target accepted), and the target's own tokens:
"correction" (the target's choice where the first rejected draft token was), "bonus" (the extra
token after a fully accepted draft) and "target" (a round without a draft: the first token, a
plain step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

ORIGINS = ("draft", "correction", "bonus", "target")
# Terminal styles (rich): drafts in one colour, the target's tokens in another; a correction is
# the target's colour underlined (where the draft was rejected).
STYLES = {"draft": "green", "correction": "magenta underline", "bonus": "magenta", "target": "magenta"}
# Tokens decoded before a round's first new token when measuring its tokens' text: enough context
# for the decoder to treat the round's text as it does in the whole text (leading-space rules,
# a character split across the window start cancels out), and bounded, so a long generation
# does not decode its whole prefix once per token.
WINDOW = 16


@dataclass(frozen=True)
class Span:
    """A piece of released text and the token that produced it."""

    text: str
    origin: str  # one of ORIGINS

    @property
    def drafted(self) -> bool:
        return self.origin == "draft"

    def to_dict(self) -> dict:
        return {"text": self.text, "drafted": self.drafted, "origin": self.origin}


@dataclass(frozen=True)
class Round:
    """One verify round as a chunk reports it: `tokens` emitted, of which `accepted` were drafts,
    out of `proposed` draft tokens."""

    index: int  # 1 = the first token (prefill)
    tokens: int
    accepted: int
    proposed: int

    def to_dict(self) -> dict:
        return {"round": self.index, "tokens": self.tokens, "accepted": self.accepted, "proposed": self.proposed}


def round_origins(drafted: list[bool], proposed: int) -> list[str]:
    """Origins of one round's tokens from the chunk's `drafted` flags and how many draft tokens
    the round proposed: accepted drafts first, then at most one target token."""
    accepted = sum(drafted)
    target = "correction" if proposed > accepted else "bonus" if proposed else "target"
    return ["draft" if d else target for d in drafted]


def _text_len(tokenizer, ids: list[int]) -> int:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)


@dataclass
class DraftView:
    """Follows one generation chunk by chunk (`push`), from the verify round each chunk carries
    (`Chunk.round`: the draft tokens it proposed, its decode time). `stats` is only for chunks
    without a round: then the draft tokens proposed are read as the growth of `stats.drafted`."""

    tokenizer: object
    stats: object = None
    origins: list[str] = field(default_factory=list)  # per token id so far
    rounds: int = 0
    _ids: list[int] = field(default_factory=list)
    _ends: list[int] = field(default_factory=list)  # characters of text through token i
    _sent: int = 0  # characters released so far
    _next: int = 0  # first token whose text is not wholly released
    _proposed: int = 0  # stats.drafted at the previous round (chunks without a round)
    _pending: list[Round] = field(default_factory=list)  # rounds not yet reported
    _drafted: int = 0  # running numbers of the rounds seen: draft tokens proposed,
    _accepted: int = 0  # accepted,
    _seconds: float = 0.0  # and the decode time at the last one

    def push(self, chunk) -> list[Span]:
        """The spans of `chunk.text`, in order; their texts join to exactly `chunk.text`."""
        if chunk.token_ids:
            self._add_round(list(chunk.token_ids), list(chunk.drafted), chunk.round)
        return self._split(chunk.text)

    def take_rounds(self) -> list[Round]:
        """Rounds finished since the last call."""
        rounds, self._pending = self._pending, []
        return rounds

    def extension(self, spans: list[Span]) -> dict:
        """The stream chunk's extension field `selfspec` (README, "Server"): this chunk's text by
        token, the rounds finished since the last chunk, and running numbers of the generation."""
        new_tokens = len(self._ids)
        # Decode speed counts from the end of prefill: after the first round alone it would be one
        # token over next to no time.
        speed = round(new_tokens / self._seconds, 3) if self.rounds > 1 and self._seconds > 0 else None
        return {"tokens": [sp.to_dict() for sp in spans], "rounds": [r.to_dict() for r in self.take_rounds()],
                "new_tokens": new_tokens, "tau": round(new_tokens / self.rounds if self.rounds else 0.0, 4),
                "acceptance_rate": round(self._accepted / self._drafted if self._drafted else 0.0, 4),
                "tokens_per_s": speed}

    def _add_round(self, ids: list[int], drafted: list[bool], verify_round=None) -> None:
        drafted = (drafted + [False] * len(ids))[: len(ids)]
        if verify_round is not None:
            proposed = verify_round.proposed
            self._seconds = verify_round.seconds
        else:
            proposed = self.stats.drafted - self._proposed if self.stats is not None else sum(drafted)
            self._proposed = self.stats.drafted if self.stats is not None else 0
        self._drafted += proposed
        self._accepted += sum(drafted)
        self.rounds += 1
        self._pending.append(Round(self.rounds, len(ids), sum(drafted), proposed))
        self.origins += round_origins(drafted, proposed)
        start = len(self._ids)
        self._ids += ids
        lo = max(0, start - WINDOW)
        before = self._ends[-1] if self._ends else 0
        base = _text_len(self.tokenizer, self._ids[lo:start]) if start > lo else 0
        for n in range(start + 1, len(self._ids) + 1):
            end = before + _text_len(self.tokenizer, self._ids[lo:n]) - base
            self._ends.append(max(end, self._ends[-1] if self._ends else 0))

    def _split(self, text: str) -> list[Span]:
        spans, pos, hi = [], self._sent, self._sent + len(text)
        while pos < hi and self._next < len(self._ends):
            end = min(self._ends[self._next], hi)
            if end > pos:
                spans.append(Span(text[pos - self._sent: end - self._sent], self.origins[self._next]))
                pos = end
            if self._ends[self._next] <= hi:
                self._next += 1
        if pos < hi:  # text past every token's end: cannot happen with a consistent tokenizer
            spans.append(Span(text[pos - self._sent:], self.origins[-1] if self.origins else "target"))
        self._sent = hi
        return spans


# ----------------------------------------------------------------------------- the terminal
class TerminalPainter:
    """Writes a generation's chunks to `out`: coloured by origin with rich when `colour`, else
    the plain text (a pipe, a file, --json)."""

    def __init__(self, out: TextIO, view: DraftView, colour: bool) -> None:
        self.out, self.view, self.colour = out, view, colour
        self.console = None
        if colour:
            from rich.console import Console

            self.console = Console(file=out, force_terminal=True, highlight=False, soft_wrap=True)

    def write(self, chunk) -> None:
        spans = self.view.push(chunk)
        if self.console is None:
            self.out.write(chunk.text)
            self.out.flush()
            return
        from rich.text import Text

        text = Text()
        for s in spans:
            text.append(s.text, style=STYLES[s.origin])
        self.console.print(text, end="")

    def legend(self) -> None:
        """One line naming the colours (coloured output only)."""
        if self.console is not None:
            self.console.print(legend_text())


def legend_text():
    from rich.text import Text

    return Text.assemble(("accepted draft", STYLES["draft"]), "  ", ("target (bonus, plain step)", STYLES["target"]),
                         "  ", ("target replacing a rejected draft", STYLES["correction"]))


# ------------------------------------------------------------------- summary and cost estimate
def plain_step_seconds(model, drafter=None) -> float | None:
    """This machine's cost of one plain decode step of `model`, without measuring anything: the
    `auto` drafter's cost model (calibrated at load, refined by every round), else a calibration
    cached by an earlier `auto` run with the same model file, dtype, kernel, threads and context;
    None when there is neither."""
    from selfspec.drafters.base import declared

    costs = declared(drafter, "costs")
    if costs is not None and costs.step:
        return float(costs.step)
    from selfspec.drafters.costs import cached_costs

    cached = cached_costs(model)
    return cached.step if cached is not None and cached.step > 0 else None


def estimate(stats, step_seconds: float | None) -> dict:
    """Plain decoding as the cost model estimates it (new tokens x one step) against the measured
    decode time."""
    if not step_seconds or not stats.decode_seconds or not stats.new_tokens:
        return {"estimated_plain_tokens_per_s": None, "estimated_speedup": None}
    return {"estimated_plain_tokens_per_s": 1.0 / step_seconds,
            "estimated_speedup": stats.new_tokens * step_seconds / stats.decode_seconds}


def summary_line(stats, step_seconds: float | None) -> str:
    """`tau 2.41 | 123/180 drafts accepted (68%) | 31.2 tok/s | 1.93x vs plain decoding estimated
    by the cost model (16.2 tok/s)`, or `no estimate of plain decoding (...)`."""
    parts = [f"tau {stats.mean_accepted_tokens:.2f} tokens/round ({stats.rounds} rounds)",
             f"{stats.accepted}/{stats.drafted} drafts accepted ({100 * stats.acceptance_rate:.0f}%)",
             f"{stats.tokens_per_s:.1f} tok/s"]
    est = estimate(stats, step_seconds)
    if est["estimated_speedup"] is None:
        parts.append("no estimate of plain decoding (no cost calibration cached for this model and settings; "
                     "a run with --draft auto makes one)")
    else:
        parts.append(f"{est['estimated_speedup']:.2f}x vs plain decoding estimated by the cost model "
                     f"({est['estimated_plain_tokens_per_s']:.1f} tok/s)")
    return "drafts: " + " | ".join(parts)
