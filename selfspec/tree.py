"""Token trees: several candidate continuations verified in one forward pass (docs/tree-verification.md).

A draft tree has n nodes; `parents[i] < i` is node i's parent, -1 for a child of the pending token
(the last token of the sequence, whose KV is not in the cache yet). The verify forward runs over
T = n + 1 tokens, the pending token first: row 0 is the root, row i + 1 is node i. Each row sits
at cache slot start + row but at position start + depth (the root has depth 0), and attends to the
cached keys before `start` plus itself and its ancestors (SpecInfer, Miao et al., ASPLOS 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.errors import InvalidParameterError


@dataclass(frozen=True, eq=False)
class TreeLayout:
    """The verify forward's view of a tree over T = n + 1 rows (row 0 = the pending token).

    depth: [T] each row's distance from the root (its rope position is start + depth).
    visible: [T, T] bool, visible[r, c] = row c is row r or one of its ancestors.
    parent_rows: the parent row of every row (-1 for the root)."""

    depth: torch.Tensor
    visible: torch.Tensor
    parent_rows: tuple[int, ...]

    @classmethod
    def of(cls, parents: torch.Tensor | list[int]) -> "TreeLayout":
        rows = [-1] + [int(p) + 1 for p in (parents.tolist() if torch.is_tensor(parents) else parents)]
        T = len(rows)
        lines = [[0]]  # lines[r]: row r and its ancestors; Python lists, then one scatter
        for r in range(1, T):
            p = rows[r]
            if not 0 <= p < r:
                raise InvalidParameterError(
                    f"tree parents must satisfy -1 <= parents[i] < i; node {r - 1} has parent {p - 1}")
            lines.append(lines[p] + [r])
        visible = torch.zeros(T, T, dtype=torch.bool, device="cpu")
        visible[[r for r, line in enumerate(lines) for _ in line], [c for line in lines for c in line]] = True
        depth = torch.tensor([len(line) - 1 for line in lines], dtype=torch.long, device="cpu")
        return cls(depth, visible, tuple(rows))

    def path(self, row: int) -> list[int]:
        """Rows from the root's first child down to `row` (empty for the root)."""
        out = []
        while row > 0:
            out.append(row)
            row = self.parent_rows[row]
        return out[::-1]


def tree_from_chains(candidates: list[list[int]], max_nodes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge candidate continuations into a trie: `(tokens [n], parents [n])`, shared prefixes
    stored once. Nodes are numbered in insertion order, so the first candidate is nodes 0..len-1
    (accepting it needs no KV compaction) and siblings keep the candidates' order (the order
    sampled verification tries them in). `max_nodes` stops adding nodes once reached."""
    tokens, parents, _ = trie_members(candidates, max_nodes)
    return torch.tensor(tokens, dtype=torch.long, device="cpu"), torch.tensor(parents, dtype=torch.long, device="cpu")


def trie_members(candidates: list[list[int]],
                 max_nodes: int | None = None) -> tuple[list[int], list[int], list[list[int]]]:
    """`tree_from_chains` as lists, plus each node's members: the indices of the candidates whose
    prefix it is (how many matches agree on it, the evidence hypothesis reduction scores)."""
    tokens: list[int] = []
    parents: list[int] = []
    members: list[list[int]] = []
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for c, chain in enumerate(candidates):
        parent = -1
        for tok in chain:
            node = children.get((parent, int(tok)))
            if node is None:
                if max_nodes is not None and len(tokens) >= max_nodes:
                    break
                node = len(tokens)
                tokens.append(int(tok))
                parents.append(parent)
                members.append([])
                children[(parent, int(tok))] = node
            members[node].append(c)
            parent = node
    return tokens, parents, members


def tree_mask(layout: TreeLayout, start: int, first: int, window: int) -> torch.Tensor:
    """Additive attention mask `[T, L]` of a tree's rows over keys at slots first..start+T-1:
    the cached keys before `start` (positions = slots) and the rows' own ancestors. A sliding
    window is measured in positions: a row at depth d sees cached key j when start + d - j <
    window and an ancestor when their depths differ by less than window."""
    q_pos = start + layout.depth.unsqueeze(1)  # [T, 1]
    cached = torch.arange(first, start, device="cpu").unsqueeze(0)  # [1, start - first]
    allowed_cached = (q_pos - cached < window) if window else torch.ones(q_pos.shape[0], start - first, dtype=torch.bool, device="cpu")
    allowed_new = layout.visible.clone()
    if window:
        allowed_new &= (layout.depth.unsqueeze(1) - layout.depth.unsqueeze(0)) < window
    allowed = torch.cat((allowed_cached.expand(q_pos.shape[0], -1), allowed_new), dim=1)
    return torch.zeros(allowed.shape, device="cpu").masked_fill_(~allowed, float("-inf"))
