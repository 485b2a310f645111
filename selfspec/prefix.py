"""Prompt-prefix KV reuse: a sequence that starts with tokens whose keys and values are already
computed processes only the rest of its prompt (a chat's next turn, a server request sharing a
system prompt or an earlier conversation, a repeated benchmark prompt).

`PrefixCache` manages a model's one KV cache across generations. It knows which tokens the cache
holds (the live sequence: after a generation, exactly the positions whose KV is valid, i.e. the
prompt and the output except its last token, which is pending) and, within a memory budget,
keeps copies of earlier sequences' KV, least recently used dropped first. For a new prompt it picks
the longest common prefix among them, copies a stored one in when it beats the live one, and sets
the cache's length there: the decode loop prefills only the remainder, always at least the
prompt's last token (its logits give the first new token).

Why this is exact: the KV at position p depends only on tokens[0..p] (causal attention, absolute
positions, sliding windows masked by position), so the KV of a shared prefix is the KV a cold
prefill would compute; only the summation order of a chunked prefill differs, as between any two
chunkings. Speculation cannot spoil it: drafts and rejected positions live at or beyond the pending
token, never inside the prefix, and the loop reports only the positions it verified.

A copy is taken lazily, when a prompt diverges from the live sequence and would overwrite it, so a
single conversation never copies anything. Anyone else resetting the model's cache
(`Model.fresh_cache()`) clears its owner: the live sequence is then forgotten, never trusted.
Not thread-safe: one generation at a time, as the model itself.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from selfspec.kv_cache import KVCache


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Stored:
    tokens: list[int]
    k: torch.Tensor  # [layers, kv_heads, len(tokens), head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PrefixCache:
    """Reuse of KV across the generations of one model; see the module docstring.
    `budget_bytes` bounds the stored copies (the live cache is preallocated anyway); 0 keeps no
    copies and reuses only the live sequence."""

    def __init__(self, model, budget_bytes: int = 0) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.model = model
        self.budget = budget_bytes
        self.tokens: list[int] = []  # the live sequence: the cache's KV is valid for exactly these
        self.stored: OrderedDict[int, _Stored] = OrderedDict()  # least recently used first
        self._next_id = 0

    @property
    def stored_bytes(self) -> int:
        return sum(e.nbytes for e in self.stored.values())

    def begin(self, prompt_ids: Sequence[int]) -> tuple[KVCache, int]:
        """The model's KV cache, holding the longest known prefix of `prompt_ids` (at most all but
        its last token), and that prefix's length; the caller prefills from there."""
        cache = self.model.kv_cache()
        if cache.owner is not self:  # another user reset or wrote the cache since our last sequence
            self.tokens = []
        prompt = list(prompt_ids)
        limit = len(prompt) - 1
        n = common_prefix(self.tokens, prompt, limit)
        best = None
        for key, entry in self.stored.items():
            m = common_prefix(entry.tokens, prompt, limit)
            if m > n:
                best, n = key, m
        entry = None
        if best is not None:  # used now: the most recently used (and we hold its tensors)
            entry = self.stored[best]
            self.stored.move_to_end(best)
        # The live sequence survives only if all of it is a prefix of the new one (re-prefilling
        # the prompt's last token writes the KV that was there); otherwise keep a copy first.
        if common_prefix(self.tokens, prompt) < len(self.tokens):
            self._store_live(cache)
        if entry is not None:  # positions below `same` already hold its KV
            cache.restore(n, entry.k, entry.v, start=common_prefix(self.tokens, entry.tokens, n))
        else:
            cache.rollback(n)
        cache.owner = self
        self.tokens = prompt[:n]
        return cache, n

    def finish(self, tokens: Sequence[int]) -> None:
        """After a generation: the cache holds valid KV for exactly `tokens` (positions 0..len-1)."""
        self.tokens = list(tokens)
        cache = self.model.kv_cache()
        cache.owner = self

    def clear(self) -> None:
        self.tokens = []
        self.stored.clear()

    def _store_live(self, cache: KVCache) -> None:
        """Keep a copy of the live sequence's KV before it is overwritten, within the budget."""
        tokens = self.tokens
        n = len(tokens)
        if not self.budget or n == 0 or cache.owner is not self:
            return
        for key, entry in list(self.stored.items()):
            if common_prefix(entry.tokens, tokens) == n:  # already stored, whole (a longer copy)
                self.stored.move_to_end(key)
                return
        per_token = 2 * cache.k[:, :, :1].numel() * cache.k.element_size()
        if n * per_token > self.budget:
            return  # one sequence larger than the whole budget: not worth evicting everything for
        for key, entry in list(self.stored.items()):
            if common_prefix(entry.tokens, tokens) == len(entry.tokens):  # a prefix of this one
                del self.stored[key]
        while self.stored and self.stored_bytes + n * per_token > self.budget:
            self.stored.popitem(last=False)
        self.stored[self._next_id] = _Stored(list(tokens), cache.k[:, :, :n].clone(), cache.v[:, :, :n].clone())
        self._next_id += 1
