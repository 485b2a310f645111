"""Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the sequence's last
n tokens (n from ngram_max down to ngram_min) and propose the tokens that followed it. No model
cost; pays on input-grounded tasks (summarise, extract, edit code) where output copies the input.
Deterministic: verified as a one-hot q."""
from __future__ import annotations

import torch

from selfspec.drafters.base import EMPTY, Draft, DraftContext
from selfspec.errors import InvalidParameterError


def lookup(tokens: torch.Tensor, ngram_max: int, ngram_min: int, max_tokens: int) -> torch.Tensor:
    """Continuation `[<= max_tokens]` of the latest earlier match of the longest suffix n-gram."""
    return lookup_match(tokens, ngram_max, ngram_min, max_tokens)[0]


def lookup_match(tokens: torch.Tensor, ngram_max: int, ngram_min: int, max_tokens: int) -> tuple[torch.Tensor, int]:
    """`lookup`, and the n of the match (0: none)."""
    length = tokens.shape[0]
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = tokens[length - n:]
        windows = tokens[: length - 1].unfold(0, n, 1)  # [length - n, n]: excludes the suffix itself
        hits = (windows == suffix).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start: start + max_tokens], n
    return EMPTY, 0


def check_ngram_args(ngram_max: int, ngram_min: int, max_draft: int) -> None:
    if ngram_min < 1 or ngram_max < ngram_min:
        raise InvalidParameterError(
            f"need 1 <= --ngram-min <= --ngram-max, got ngram_min={ngram_min}, ngram_max={ngram_max}")
    if max_draft < 1:
        raise InvalidParameterError(f"--max-draft must be >= 1, got {max_draft}")


class CappedDrafter:
    """The draft length of the match-based drafters (this one, anpd.py, retrieval.py): `max_draft`
    caps the proposal; with `adaptive`, the cap follows the acceptance: after a partly rejected
    round it drops to accepted + 1, after a fully accepted one it grows by 2 (verifying a long
    wrong draft is not free on a CPU: 11 tokens cost ~1.3 plain steps). `last_level` is the
    length of the match behind the last proposal (0: none), for `auto`'s acceptance per level."""

    def __init__(self, max_draft: int, adaptive: bool) -> None:
        self.max_draft, self.adaptive = max_draft, adaptive
        self.cap = max_draft
        self.last_level = 0

    def update(self, accepted: int, proposed: int) -> None:
        if self.adaptive and proposed:
            self.cap = min(self.max_draft, self.cap + 2) if accepted == proposed else max(1, accepted + 1)

    def reset(self) -> None:
        self.cap = self.max_draft

    def extra_stats(self) -> dict:
        return {}


class NgramDrafter(CappedDrafter):
    """Prompt lookup (`--ngram-mode lookup`)."""

    name = "ngram"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2, max_draft: int = 8, adaptive: bool = True) -> None:
        check_ngram_args(ngram_max, ngram_min, max_draft)
        super().__init__(max_draft, adaptive)
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        tokens = torch.tensor(ctx.tokens, dtype=torch.long)
        draft, self.last_level = lookup_match(tokens, self.ngram_max, self.ngram_min, min(self.cap, max_tokens))
        return Draft(draft.clone())
