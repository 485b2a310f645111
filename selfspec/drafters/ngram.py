"""Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the sequence's last
n tokens (n from ngram_max down to ngram_min) and propose the tokens that followed it. No model
cost; pays on input-grounded tasks (summarise, extract, edit code) where output copies the input.
Deterministic: verified as a one-hot q."""
from __future__ import annotations

import torch

from selfspec.drafters.base import EMPTY, Draft, DraftContext, Drafter
from selfspec.drafters.costs import CostModel
from selfspec.drafters.reduction import TreeReducer, depths
from selfspec.errors import InvalidParameterError
from selfspec.tree import tree_from_chains, trie_members


def _hits(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Start indices of the earlier occurrences of the last n tokens, oldest first."""
    length = tokens.shape[0]
    windows = tokens[: length - 1].unfold(0, n, 1)  # [length - n, n]: excludes the suffix itself
    return (windows == tokens[length - n:]).all(dim=1).nonzero().flatten()


def lookup_match(tokens: torch.Tensor, ngram_max: int, ngram_min: int, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Continuation `[<= max_tokens]` of the latest earlier match of the longest suffix n-gram,
    and the n of the match (0: none)."""
    for n in range(min(ngram_max, tokens.shape[0] - 1), ngram_min - 1, -1):
        hits = _hits(tokens, n)
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start: start + max_tokens], n
    return EMPTY, 0


def lookup_candidates(tokens: torch.Tensor, ngram_max: int, ngram_min: int, max_tokens: int,
                      count: int) -> list[list[int]]:
    """Up to `count` distinct continuations: longest n-gram first, latest match first within one
    n (so the first is `lookup_match`'s)."""
    return [cont for cont, _ in lookup_matches(tokens, ngram_max, ngram_min, max_tokens, count)]


def lookup_matches(tokens: torch.Tensor, ngram_max: int, ngram_min: int, max_tokens: int,
                   count: int) -> list[tuple[list[int], int]]:
    """`lookup_candidates` with the n of the match behind each continuation."""
    found: list[tuple[list[int], int]] = []
    for n in range(min(ngram_max, tokens.shape[0] - 1), ngram_min - 1, -1):
        for hit in reversed(_hits(tokens, n).tolist()):
            cont = tokens[hit + n: hit + n + max_tokens].tolist()
            if cont and all(cont != c for c, _ in found):
                found.append((cont, n))
                if len(found) == count:
                    return found
    return found


def check_ngram_args(ngram_max: int, ngram_min: int, max_draft: int) -> None:
    if ngram_min < 1 or ngram_max < ngram_min:
        raise InvalidParameterError(
            f"need 1 <= --ngram-min <= --ngram-max, got ngram_min={ngram_min}, ngram_max={ngram_max}")
    if max_draft < 1:
        raise InvalidParameterError(f"--max-draft must be >= 1, got {max_draft}")


class CappedDrafter(Drafter):
    """The draft length of the match-based drafters (this one, anpd.py, retrieval.py): `max_draft`
    caps the proposal; with `adaptive`, the cap follows the acceptance: after a partly rejected
    round it drops to accepted + 1, after a fully accepted one it grows by 2 (verifying a long
    wrong draft is not free on a CPU: 11 tokens cost ~1.3 plain steps). `last_level` is the
    length of the match behind the last proposal (0: none), for `auto`'s acceptance per level.
    A tree round counts as fully accepted when its accepted path is as long as its deepest
    candidate (`_depth`). A tree drafter with a `reducer` verifies only the nodes that pay
    (hypothesis reduction, drafters/reduction.py)."""

    def __init__(self, max_draft: int, adaptive: bool, reducer: TreeReducer | None = None) -> None:
        self.max_draft, self.adaptive = max_draft, adaptive
        self.cap = max_draft
        self.last_level = 0
        self._depth = 0  # the deepest node of the last tree; 0 after a chain
        self.reducer = reducer

    @property
    def costs(self) -> CostModel | None:
        """The cost model the reduction budgets with (the Drafter protocol's optional member)."""
        return self.reducer.costs if self.reducer is not None else None

    def reduced(self, ctx: DraftContext, tokens: list[int], parents: list[int], keys: list) -> Draft:
        """The reducer's choice among the candidate nodes (`keys[i]`: node i's feature bucket)."""
        draft = self.reducer.reduce(ctx, tokens, parents, keys)
        self._depth = max(depths(draft.parents.tolist())) if draft.parents is not None else 0
        return draft

    def update(self, accepted: int, proposed: int) -> None:
        if self.reducer is not None:
            self.reducer.update(accepted, proposed)
        if self.adaptive and proposed:
            full = accepted >= self._depth if self._depth else accepted == proposed
            self.cap = min(self.max_draft, self.cap + 2) if full else max(1, accepted + 1)

    def reset(self) -> None:
        self.cap = self.max_draft
        if self.reducer is not None:
            self.reducer.reset()

    def extra_stats(self) -> dict:
        return self.reducer.extra_stats() if self.reducer is not None else {}


class NgramDrafter(CappedDrafter):
    """Prompt lookup (`--ngram-mode lookup`). `tree=N` (N >= 2) proposes a token tree of the
    continuations of the N most recent distinct matches (docs/tree-verification.md), `max_draft`
    deep, as many nodes as the round has room for; a round with one candidate stays a chain.
    Default 1: a chain. With `tree_reduce` (the default for trees) only the nodes that pay are
    verified, scored by the match length behind them, how many matches agree on them, the
    recency of the latest of those and their depth; `costs` is the model's measured CostModel
    (calibrated on first use when None)."""

    name = "ngram"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2, max_draft: int = 8, adaptive: bool = True,
                 tree: int = 1, tree_reduce: bool = True, costs: CostModel | None = None) -> None:
        check_ngram_args(ngram_max, ngram_min, max_draft)
        if isinstance(tree, bool) or not isinstance(tree, int) or tree < 1:
            raise InvalidParameterError(f"--tree must be an integer >= 1 (candidates per round), got {tree!r}")
        super().__init__(max_draft, adaptive, TreeReducer(costs) if tree > 1 and tree_reduce else None)
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.tree = tree

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        tokens = torch.tensor(ctx.tokens, dtype=torch.long, device="cpu")  # ids only: the lookup runs on the CPU
        depth = min(self.cap, max_tokens)
        if self.tree > 1:
            matches = lookup_matches(tokens, self.ngram_max, self.ngram_min, depth, self.tree)
            if self.reducer is not None:
                return self._reduce(ctx, matches, max_tokens)
            if len(matches) > 1:
                self._depth = max(len(c) for c, _ in matches)
                self.last_level = 0
                ids, parents = tree_from_chains([c for c, _ in matches], max_nodes=max_tokens)
                return Draft(ids, parents=parents)
        self._depth = 0
        draft, self.last_level = lookup_match(tokens, self.ngram_max, self.ngram_min, depth)
        return Draft(draft.clone())

    def _reduce(self, ctx: DraftContext, matches: list[tuple[list[int], int]], max_tokens: int) -> Draft:
        """Every round's candidates, one or several, go through the reducer: node i's bucket is
        (n of the longest match behind it, matches agreeing on it, the rank of the latest of
        them, depth), each capped so that the buckets fill with evidence within a few rounds."""
        ids, parents, members = trie_members([c for c, _ in matches], max_nodes=max_tokens)
        keys = [(min(matches[m[0]][1], 4), min(len(m), 3), min(m[0], 2), min(d, 3))
                for m, d in zip(members, depths(parents))]
        self.last_level = 0
        return self.reduced(ctx, ids, parents, keys)

    def extra_stats(self) -> dict:
        return {"tree": self.tree, **super().extra_stats()} if self.tree > 1 else {}
