"""Adaptive n-gram drafting (after ANPD, Ou et al., NAACL 2024): an n-gram model of the sequence
itself (prompt + output), built online as tokens arrive, drafts token by token. Each step looks up
the last n tokens (context + drafts so far), longest n first (multi-level), and proposes the most
frequent token that followed them (ties: the latest); drafting stops once the product of those
tokens' shares of their n-gram's continuations falls below `min_confidence` (propose only when the
match is confident), and the draft length follows the acceptance as in prompt lookup.

Unlike prompt lookup (`ngram.lookup`, which scans the whole sequence every round), the index is
updated incrementally: O(levels) dict updates per new token and O(levels) lookups per draft token.
Deterministic: verified as a one-hot q.
"""
from __future__ import annotations

import torch

from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.ngram import CappedDrafter, check_ngram_args


class NgramIndex:
    """For every n-gram (ngram_min <= n <= ngram_max) of one sequence: the counts of the tokens that
    followed it, in order of their latest occurrence (the latest last)."""

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2) -> None:
        self.levels = tuple(range(ngram_max, ngram_min - 1, -1))  # longest first
        self.clear()

    def clear(self) -> None:
        self.tokens: list[int] = []
        self.tables: dict[int, dict[tuple, dict[int, int]]] = {n: {} for n in self.levels}

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        toks = self.tokens
        for n in self.levels:
            if len(toks) >= n:
                follow = self.tables[n].setdefault(tuple(toks[-n:]), {})
                follow[token] = follow.pop(token, 0) + 1  # re-inserted: now the latest
        toks.append(token)

    def sync(self, tokens: list[int]) -> None:
        """Index `tokens`, a continuation of what is indexed (only the new tail costs); a
        different sequence is indexed from scratch."""
        have = len(self.tokens)
        if have > len(tokens) or (have and tokens[have - 1] != self.tokens[-1]):
            self.clear()
            have = 0
        for t in tokens[have:]:
            self.append(t)

    def predict(self, context: list[int]) -> tuple[int, int, float] | None:
        """(token, n, share) for the longest n-gram ending `context` that has been followed by
        something: its most frequent follower (ties: the latest) and that follower's share."""
        for n in self.levels:
            if len(context) < n:
                continue
            follow = self.tables[n].get(tuple(context[-n:]))
            if follow:
                best, count, total = -1, 0, 0
                for tok, c in follow.items():  # later entries are more recent: >= keeps the latest
                    total += c
                    if c >= count:
                        best, count = tok, c
                return best, n, count / total
        return None


class AdaptiveNgramDrafter(CappedDrafter):
    """`--draft ngram --ngram-mode adaptive`. `last_level` is the n of the first drafted token's
    match."""

    name = "ngram-adaptive"

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2, max_draft: int = 8, adaptive: bool = True,
                 min_confidence: float = 0.3) -> None:
        check_ngram_args(ngram_max, ngram_min, max_draft)
        super().__init__(max_draft, adaptive)
        self.index = NgramIndex(ngram_max, ngram_min)
        self.min_confidence = min_confidence

    def draft_tokens(self, tokens: list[int], max_tokens: int) -> list[int]:
        self.index.sync(tokens)
        context, out, confidence = tokens[-self.index.levels[0]:], [], 1.0
        self.last_level = 0
        while len(out) < max_tokens:
            hit = self.index.predict(context)
            if hit is None:
                break
            tok, n, share = hit
            confidence *= share
            if confidence < self.min_confidence:
                break
            if not out:
                self.last_level = n
            out.append(tok)
            context = context[1:] + [tok] if len(context) >= self.index.levels[0] else context + [tok]
        return out

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        return Draft(torch.tensor(self.draft_tokens(ctx.tokens, min(self.cap, max_tokens)), dtype=torch.long, device="cpu"))

    def reset(self) -> None:
        super().reset()
        self.index.clear()
