"""Retrieval drafts (after REST, He et al., NAACL 2024): continue the context with what followed its
longest suffix in a token datastore built from the user's corpus (`selfspec datastore build`,
selfspec/drafters/datastore.py). No model cost; pays where the output repeats the corpus (code against a
library, answers from docs). Deterministic: verified as a one-hot q.

`propose` returns a chain (the most frequent continuation). With `tree=True` it returns REST's
candidate trie (`Draft.parents`), which only a loop with tree verification can check, reduced by
default to the nodes that pay (`tree_reduce`, drafters/reduction.py).
"""
from __future__ import annotations

import torch

from selfspec.drafters.costs import CostModel
from selfspec.drafters.datastore import Datastore
from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.ngram import CappedDrafter, check_ngram_args
from selfspec.drafters.reduction import TreeReducer, depths


class RetrievalDrafter(CappedDrafter):
    """`last_level` is the length of the context suffix that matched."""

    name = "retrieval"

    def __init__(self, store: Datastore, max_draft: int = 8, max_len: int = 16, min_len: int = 2,
                 adaptive: bool = True, tree: bool = False, tree_nodes: int = 16, tree_reduce: bool = True,
                 costs: CostModel | None = None) -> None:
        check_ngram_args(max_len, min_len, max_draft)
        super().__init__(max_draft, adaptive, TreeReducer(costs) if tree and tree_reduce else None)
        self.store, self.max_len, self.min_len = store, max_len, min_len
        self.tree, self.tree_nodes = tree, tree_nodes

    @classmethod
    def for_model(cls, model, datastore: str, **kwargs) -> "RetrievalDrafter":
        store = Datastore.load(datastore)
        store.check_tokenizer(model.tokenizer, model.name)
        return cls(store, **kwargs)

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        if self.tree:
            return self.propose_tree(ctx, max_tokens)
        tokens, self.last_level = self.store.chain(ctx.tokens, min(self.cap, max_tokens), self.max_len, self.min_len)
        return Draft(torch.tensor(tokens, dtype=torch.long, device="cpu"))

    def propose_tree(self, ctx: DraftContext, max_tokens: int) -> Draft:
        """Up to `tree_nodes` nodes (at most `max_tokens` deep) of the continuation trie; with the
        reducer, those that pay, node i's bucket being (its share of its parent's count in
        quarters, depth, match length on a log scale)."""
        trie = self.store.trie(ctx.tokens, min(self.cap, max_tokens), self.tree_nodes, self.max_len, self.min_len)
        self.last_level = trie.length
        if self.reducer is not None:
            keys = [(min(4, int(4 * count / (trie.counts[p] if p >= 0 else trie.rows))), min(d, 3),
                     min(trie.length.bit_length(), 4))
                    for count, p, d in zip(trie.counts, trie.parents, depths(trie.parents))]
            return self.reduced(ctx, trie.tokens, trie.parents, keys)
        return Draft(torch.tensor(trie.tokens, dtype=torch.long, device="cpu"),
                     parents=torch.tensor(trie.parents, dtype=torch.long, device="cpu"))
