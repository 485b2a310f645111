"""Retrieval drafts (after REST, He et al., NAACL 2024): continue the context with what followed its
longest suffix in a token datastore built from the user's corpus (`selfspec datastore build`,
selfspec/datastore.py). No model cost; pays where the output repeats the corpus (code against a
library, answers from docs). Deterministic: verified as a one-hot q.

`propose` returns a chain (the most frequent continuation). With `tree=True` it returns REST's
candidate trie (`Draft.parents`), which only a loop with tree verification can check.
"""
from __future__ import annotations

import torch

from selfspec.datastore import Datastore
from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.ngram import check_ngram_args, next_cap


class RetrievalDrafter:
    """`last_level` is the length of the last match (0: none), for `auto`'s per-level acceptance."""

    name = "retrieval"

    def __init__(self, store: Datastore, max_draft: int = 8, max_len: int = 16, min_len: int = 2,
                 adaptive: bool = True, tree: bool = False, tree_nodes: int = 16) -> None:
        check_ngram_args(max_len, min_len, max_draft)
        self.store, self.max_draft, self.max_len, self.min_len = store, max_draft, max_len, min_len
        self.adaptive, self.tree, self.tree_nodes = adaptive, tree, tree_nodes
        self.cap = max_draft
        self.last_level = 0

    @classmethod
    def for_model(cls, model, datastore: str, **kwargs) -> "RetrievalDrafter":
        store = Datastore.load(datastore)
        store.check_tokenizer(model.tokenizer, model.name)
        return cls(store, **kwargs)

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        if self.tree:
            return self.propose_tree(ctx, max_tokens)
        tokens, self.last_level = self.store.chain(ctx.tokens, min(self.cap, max_tokens), self.max_len, self.min_len)
        return Draft(torch.tensor(tokens, dtype=torch.long))

    def propose_tree(self, ctx: DraftContext, max_tokens: int) -> Draft:
        """Up to `tree_nodes` nodes (at most `max_tokens` deep) of the continuation trie."""
        tokens, parents, self.last_level = self.store.trie(ctx.tokens, min(self.cap, max_tokens), self.tree_nodes,
                                                           self.max_len, self.min_len)
        return Draft(torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))

    def update(self, accepted: int, proposed: int) -> None:
        if self.adaptive and proposed:
            self.cap = next_cap(self.cap, self.max_draft, accepted, proposed)

    def reset(self) -> None:
        self.cap = self.max_draft

    def extra_stats(self) -> dict:
        return {}
