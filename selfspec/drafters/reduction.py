"""Hypothesis reduction in front of tree verification (after SLiM, Lin et al., NAACL 2024): score
every candidate node of a draft tree, then verify only the nodes that maximise expected tokens
per second on this machine (docs/tree-verification.md, "Hypothesis reduction (SLiM)").

On a CPU a verify pass over n nodes costs what a chain of n rows costs, so every node has to earn
its row. A node's score is the probability that the path to it is accepted: the product, along the
path, of each node's acceptance given its parent's. That conditional is learnt online per feature
bucket (the drafter's evidence: match length, agreeing matches, frequency share, depth) from the
verified rounds, forgetting old rounds, and siblings' conditionals are scaled to sum below one (at
most one child is accepted). Every factor is below one, so a child never outranks its parent.

The budget: add nodes in descending path probability (which keeps the set closed under
ancestors) and keep the n that maximises E(n) / verify_cost(n), E(n) = 1 + the kept nodes' path
probabilities, verify_cost from the model's measured `CostModel`. Pruning reads nothing but the
drafter's own evidence and past verdicts, never this round's target logits, and a pruned
deterministic tree is verified as any tree: lossless by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from selfspec.drafters.base import EMPTY, Draft, DraftContext
from selfspec.drafters.costs import CostModel

MAX_FACTOR = 0.99  # no node is certain: a child always scores below its parent


@dataclass
class Rate:
    """Decayed counts of trials (a node whose parent was accepted) and hits (it was accepted too)."""

    hits: float = 0.0
    trials: float = 0.0

    def add(self, hits: int, trials: int, decay: float) -> None:
        self.hits = decay * self.hits + hits
        self.trials = decay * self.trials + trials


@dataclass
class NodeScorer:
    """Per-bucket acceptance of a node given its parent's, learnt from verified rounds. A bucket's
    estimate is shrunk towards the all-buckets rate with `prior_weight` pseudo-trials, and that rate
    starts at auto's prior (0.6, worth two trials), so a new bucket is neither trusted nor ignored.
    Each observation of a bucket first multiplies its counts by `decay`: a change of text moves
    the estimate within a few rounds."""

    decay: float = 0.8
    prior_weight: float = 2.0
    overall: Rate = field(default_factory=lambda: Rate(1.2, 2.0))
    buckets: dict[Hashable, Rate] = field(default_factory=dict)

    def conditional(self, key: Hashable) -> float:
        prior = self.overall.hits / self.overall.trials
        rate = self.buckets.get(key, Rate())
        return min(MAX_FACTOR, (rate.hits + self.prior_weight * prior) / (rate.trials + self.prior_weight))

    def path_probabilities(self, keys: list[Hashable], parents: list[int]) -> list[float]:
        """P(the path to node i is accepted) for every node (parents before children)."""
        cond = [self.conditional(k) for k in keys]
        siblings: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            siblings.setdefault(p, []).append(i)
        for group in siblings.values():  # at most one child of a node is accepted
            total = sum(cond[i] for i in group)
            if total > MAX_FACTOR:
                for i in group:
                    cond[i] *= MAX_FACTOR / total
        probs: list[float] = []
        for i, p in enumerate(parents):
            probs.append(cond[i] * (probs[p] if p >= 0 else 1.0))
        return probs

    def learn(self, keys: list[Hashable], parents: list[int], path: list[int]) -> None:
        """One verified round: `path` the accepted nodes, root's child first. Every node whose
        parent was accepted (or is the pending token) was a trial; the path's nodes were hits."""
        accepted = {-1, *path}
        on_path = set(path)
        tally: dict[Hashable, list[int]] = {}
        for i, p in enumerate(parents):
            if p in accepted:
                t = tally.setdefault(keys[i], [0, 0])
                t[0] += i in on_path
                t[1] += 1
        for key, (hits, trials) in tally.items():
            self.buckets.setdefault(key, Rate()).add(hits, trials, self.decay)
        self.overall.add(sum(t[0] for t in tally.values()), sum(t[1] for t in tally.values()), self.decay)


def verify_cost(costs: CostModel, n: int) -> float:
    """Seconds of a verify forward over 1 + n tokens: measured up to costs.max_k, beyond it
    extrapolated linearly from the last two measurements."""
    if n <= costs.max_k:
        return costs.verify[n]
    last, before = costs.verify[-1], costs.verify[-2]
    return last + (n - costs.max_k) * (last - before)


def select(probs: list[float], costs: CostModel) -> tuple[list[int], float]:
    """The nodes to verify (ascending indices) and their expected tokens E(n): the n most probable
    nodes (ties: the lower index, so a parent before its child) for the n >= 1 with the most
    expected tokens per second. At least one node, so the scores keep learning; switching drafting
    off is `auto`'s job."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    best_n, best_rate, expected, best_expected = 0, 0.0, 1.0, 1.0
    for n, i in enumerate(order, start=1):
        expected += probs[i]
        rate = expected / verify_cost(costs, n)
        if rate > best_rate * (1 + 1e-9):
            best_n, best_rate, best_expected = n, rate, expected
    return sorted(order[:best_n]), best_expected


def depths(parents: list[int]) -> list[int]:
    """Each node's depth (a child of the pending token has depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(out[p] + 1 if p >= 0 else 1)
    return out


def subtree(tokens: list[int], parents: list[int], keep: list[int]) -> Draft:
    """The draft of the kept nodes (closed under ancestors, ascending), parents re-indexed; a
    single path is a chain (no parents)."""
    index = {old: new for new, old in enumerate(keep)}
    kept_parents = [index[parents[i]] if parents[i] >= 0 else -1 for i in keep]
    ids = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device="cpu")
    if kept_parents == list(range(-1, len(keep) - 1)):
        return Draft(ids)
    return Draft(ids, parents=torch.tensor(kept_parents, dtype=torch.long, device="cpu"))


class TreeReducer:
    """The reduction state of one tree drafter: its scorer, the costs, the round awaiting its
    verdict, and the per-generation numbers for `extra_stats`.

    The verdict arrives as `update(accepted, proposed)`, without the accepted path; the path's
    tokens are the first `accepted` tokens the sequence grew by, which the next `reduce` (or
    `learn`) reads from the context, and a trie has one path per token sequence."""

    def __init__(self, costs: CostModel | None = None) -> None:
        self.costs = costs
        self.scorer = NodeScorer()
        self._pending: tuple | None = None  # (tokens, parents, keys, len(ctx.tokens)) of the kept tree
        self._accepted: int | None = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.rounds = 0
        self.proposed = self.verified = 0
        self.expected = 0.0

    def learn(self, context: list[int]) -> None:
        """Learn from the last reduced round if its verdict came; forget it either way."""
        pending, accepted = self._pending, self._accepted
        self._pending = self._accepted = None
        if pending is None or accepted is None:
            return
        tokens, parents, keys, start = pending
        if len(context) < start + accepted:  # not the sequence this round continued
            return
        emitted = context[start: start + accepted]
        path, node = [], -1
        for tok in emitted:
            node = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == tok), None)
            if node is None:  # not this round's tree (a caller replayed another sequence)
                return
            path.append(node)
        self.scorer.learn(keys, parents, path)

    def reduce(self, ctx: DraftContext, tokens: list[int], parents: list[int], keys: list[Hashable]) -> Draft:
        """The best-budget subtree of the candidate tree (parents before children); `keys[i]` is
        node i's feature bucket. Costs are calibrated on first use when none were given (the cached
        measurement `auto` uses, of `ctx.model`)."""
        context = ctx.tokens
        self.learn(context)
        if not tokens:
            return Draft(EMPTY)
        if self.costs is None:
            from selfspec.drafters.costs import calibrate

            self.costs = calibrate(ctx.model)
        keep, expected = select(self.scorer.path_probabilities(keys, parents), self.costs)
        draft = subtree(tokens, parents, keep)
        kept_parents = draft.parents.tolist() if draft.parents is not None else list(range(-1, len(keep) - 1))
        self._pending = (draft.tokens.tolist(), kept_parents, [keys[i] for i in keep], len(context))
        self.rounds += 1
        self.proposed += len(tokens)
        self.verified += len(keep)
        self.expected += expected
        return draft

    def update(self, accepted: int, proposed: int) -> None:
        if self._pending is not None and proposed:
            self._accepted = accepted
        else:
            self._pending = None

    def reset(self) -> None:
        self._pending = self._accepted = None
        self._reset_counts()

    def extra_stats(self) -> dict:
        """Means per reduced round: candidate nodes before reduction, nodes verified (the chosen
        budget) and the expected tokens E(n) of the kept set (to set beside the measured τ)."""
        if not self.rounds:
            return {"tree_reduce": True}
        return {"tree_reduce": True,
                "tree_nodes_proposed": round(self.proposed / self.rounds, 3),
                "tree_nodes_verified": round(self.verified / self.rounds, 3),
                "tree_expected_tokens": round(self.expected / self.rounds, 3)}
