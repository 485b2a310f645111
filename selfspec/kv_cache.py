"""Preallocated KV cache with O(1) rollback.

One tensor per layer for keys and one for values, `[n_kv_heads, max_len, head_dim]`, indexed by
absolute position. `length` counts the positions whose entries are valid; rollback only moves that
integer, so entries at positions >= length are garbage by contract and are overwritten by the next
forward pass that covers them. Nothing is allocated while decoding.

`length` is written here only: `wrote` (a forward pass), `rollback`, `compact` (a tree verify),
`restore` (a prefix cache) and `snapshot` (a pass whose writes are undone), `reset`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from selfspec.errors import ContextOverflowError


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        # Who may trust the entries below `length` across generations: a `PrefixCache`
        # (selfspec/prefix.py) that set itself here. Any reset (a new sequence by anyone else) clears it.
        self.owner: object | None = None

    def check_room(self, start: int, n_tokens: int) -> None:
        if start < 0 or start > self.length:
            raise ValueError(f"cannot write at position {start}: the cache holds {self.length} positions")
        if start + n_tokens > self.max_len:
            raise ContextOverflowError(
                f"{start + n_tokens} positions do not fit the KV cache of {self.max_len} (--ctx-size)"
            )

    def wrote(self, start: int, n_tokens: int) -> None:
        """A forward pass wrote the KV of positions [start, start + n_tokens): they are the end."""
        self.check_room(start, n_tokens)
        self.length = start + n_tokens

    def restore(self, length: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                start: int = 0) -> None:
        """Make [0, length) the valid positions, after copying positions [start, length) of `k`
        and `v` (a stored copy of a sequence's first positions) in; positions below `start`
        already hold them. Without `k`, `length` must not exceed the valid positions."""
        if k is None:
            self.rollback(length)
            return
        if not 0 <= start <= length <= min(self.max_len, k.shape[2]) or start > self.length:
            raise ValueError(f"cannot restore positions [{start}, {length}): the cache holds {self.length}")
        self.k[:, :, start:length] = k[:, :, start:length]
        self.v[:, :, start:length] = v[:, :, start:length]
        self.length = length

    @contextmanager
    def snapshot(self, start: int, end: int) -> Iterator["KVCache"]:
        """Undo, on exit, every write to positions [start, end) and any move of `length` made
        inside: the slice is restored bit for bit (a scoring pass over positions that hold
        verified KV)."""
        k, v, length = self.k[:, :, start:end].clone(), self.v[:, :, start:end].clone(), self.length
        try:
            yield self
        finally:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            self.length = length

    def rollback(self, length: int) -> None:
        """Forget every position >= `length`. O(1): no memory is touched."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} positions")
        self.length = length

    def compact(self, dest: int, slots: list[int]) -> None:
        """Move the KV at `slots` (increasing, each >= its destination) to dest, dest+1, ... and
        make dest + len(slots) the length: after a tree verify, the accepted path's nodes become
        contiguous positions (their keys were rotated for exactly those positions). One gather per
        tensor, nothing for the part of the path already in place."""
        n = len(slots)
        m = next((j for j, s in enumerate(slots) if s != dest + j), n)  # entries before m are in place
        if m < n:
            index = torch.tensor(slots[m:], dtype=torch.long, device=self.k.device)
            self.k[:, :, dest + m: dest + n] = self.k[:, :, index]
            self.v[:, :, dest + m: dest + n] = self.v[:, :, index]
        self.rollback(dest + n)

    def reset(self) -> None:
        self.length = 0
        self.owner = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
