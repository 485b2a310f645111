"""Retrieval drafts (after REST, He et al., NAACL 2024): continue the context with what followed its
longest suffix in a token datastore built from the user's corpus (`selfspec datastore build`,
selfspec/drafters/datastore.py). No model cost; pays where the output repeats the corpus (code against a
library, answers from docs). Deterministic: verified as a one-hot q.

`propose` returns a chain (the most frequent continuation). With `tree=True` it returns REST's
candidate trie (`Draft.parents`), which only a loop with tree verification can check.
"""
from __future__ import annotations

import torch

from selfspec.drafters.datastore import Datastore
from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.ngram import CappedDrafter, check_ngram_args


class RetrievalDrafter(CappedDrafter):
    """`last_level` is the length of the context suffix that matched."""

    name = "retrieval"

    def __init__(self, store: Datastore, max_draft: int = 8, max_len: int = 16, min_len: int = 2,
                 adaptive: bool = True, tree: bool = False, tree_nodes: int = 16) -> None:
        check_ngram_args(max_len, min_len, max_draft)
        super().__init__(max_draft, adaptive)
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
        """Up to `tree_nodes` nodes (at most `max_tokens` deep) of the continuation trie."""
        tokens, parents, self.last_level = self.store.trie(ctx.tokens, min(self.cap, max_tokens), self.tree_nodes,
                                                           self.max_len, self.min_len)
        return Draft(torch.tensor(tokens, dtype=torch.long, device="cpu"),
                     parents=torch.tensor(parents, dtype=torch.long, device="cpu"))
