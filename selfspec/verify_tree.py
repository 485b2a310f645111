"""Verifying a token tree (several candidate continuations) in one forward pass.

The target scores every node of the tree at once (selfspec/tree.py: tree positions and mask);
verification then walks down from the pending token, at each node choosing at most one child to
accept, and ends with one token of the target's own, so a round emits the accepted path plus a
correction or bonus token, exactly like a chain (selfspec/verify.py).

Greedy: follow the child whose token equals the target's argmax at the current node, as deep as
possible. The output is plain greedy decoding's, whatever the tree.

Sampled, exact in distribution (multi-round speculative sampling, SpecInfer: Miao et al.,
ASPLOS 2024, Algorithm 2; the same rule underlies SpecTr, Sun et al., NeurIPS 2023, and
Sequoia, Chen et al., 2024). At a node with target distribution p and children c_1..c_m, tried
in index order with p_1 = p:
  * deterministic children (`q_draft` None, e.g. prompt-lookup candidates): accept c_j with
    probability p_j(c_j); on rejection p_{j+1} = p_j with c_j zeroed, renormalised. This is
    sampling from p by elimination: P(emit c_j) = prod_{i<j}(1 - p_i(c_i)) p_j(c_j) = p(c_j), and
    any other token comes from the final residual with total mass 1 - sum_j p(c_j).
  * sampled children (`q_draft[i]` the distribution child i was drawn from, independently of
    its siblings, e.g. i.i.d. with replacement): accept c_j with probability
    min(1, p_j(c_j) / q_j(c_j)); on rejection p_{j+1} = norm(max(0, p_j - q_j)). Each round is
    one speculative-sampling step whose target is the previous round's residual.
If a child is accepted the walk continues below it (the target's row there is the exact
conditional); if all are rejected, or the node is a leaf, the round's last token is drawn from
the current p_j. Children drawn *without* replacement from one q (Medusa's top-k) do not satisfy
the independence assumption: give them as deterministic (q_draft None). Medusa's "typical
acceptance" is not exact and is not offered.

The repetition penalty at a node sees the node's own path (its ancestors and itself), never the
tree's other branches: `tree_presence`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.drafters.base import Draft
from selfspec.errors import InvalidParameterError
from selfspec.sampling import sample
from selfspec.tree import TreeLayout
from selfspec.verify import TargetChoice, Verdict


@dataclass(frozen=True, eq=False)
class TreeVerdict(Verdict):
    """A Verdict plus `path`: the accepted nodes' indices, the root's child first."""

    path: tuple[int, ...] = ()


def _children(layout: TreeLayout) -> list[list[int]]:
    """Child rows of every row, in row order (the order sampled verification tries them)."""
    kids: list[list[int]] = [[] for _ in layout.parent_rows]
    for row, parent in enumerate(layout.parent_rows):
        if parent >= 0:
            kids[parent].append(row)
    return kids


def _verdict(path_rows: list[int], node_tokens: list[int], last: int) -> TreeVerdict:
    tokens = [node_tokens[r - 1] for r in path_rows] + [last]
    return TreeVerdict(len(path_rows), torch.tensor(tokens, dtype=torch.long, device="cpu"), tuple(r - 1 for r in path_rows))


def verify_tree_greedy(layout: TreeLayout, node_tokens: torch.Tensor, target_tokens: torch.Tensor) -> TreeVerdict:
    """node_tokens [n]; target_tokens [n+1], the target's argmax at every row (row 0 = pending)."""
    kids = _children(layout)
    toks, target = node_tokens.tolist(), target_tokens.tolist()
    row, path = 0, []
    while (child := next((c for c in kids[row] if toks[c - 1] == target[row]), None)) is not None:
        path.append(child)
        row = child
    return _verdict(path, toks, target[row])


def verify_tree_sampled(layout: TreeLayout, node_tokens: torch.Tensor, q_draft: torch.Tensor | None,
                        p_target: torch.Tensor, generator: torch.Generator) -> TreeVerdict:
    """The rules of the module docstring. node_tokens [n]; q_draft [n, vocab] or None; p_target
    [n+1, vocab] (row 0 = after the pending token, row i+1 = after node i; rows need not be
    normalised). All randomness comes from `generator`."""
    kids = _children(layout)
    toks = node_tokens.tolist()
    n = len(toks)
    # Every node is tested at most once: n uniforms cover any walk.
    uniforms = torch.rand(max(n, 1), generator=generator, device=generator.device).tolist()
    used, row, path = 0, 0, []
    while True:
        p_row = p_target[row].float()  # [vocab]
        residual, mass = p_row, float(p_row.sum())
        accepted = None
        for child in kids[row]:
            tok = toks[child - 1]
            u = uniforms[used]
            used += 1
            # Accept with probability min(1, p_j(tok) / q(tok)), p_j = residual / mass, written
            # without divisions; q == 0 means tok cannot have come from q: rejected.
            q_tok = 1.0 if q_draft is None else float(q_draft[child - 1, tok])
            if q_tok > 0 and u * q_tok * mass < float(residual[tok]):
                accepted = child
                break
            if q_draft is None:
                residual = residual.clone() if residual is p_row else residual
                residual[tok] = 0.0
            else:
                residual = (residual / mass - q_draft[child - 1].float()).clamp_min(0.0)
            mass = float(residual.sum())
            if mass <= 0.0:  # p_j == q_j up to rounding: the rejection had probability ~0
                residual, mass = p_row, float(p_row.sum())
        if accepted is None:
            last = int(sample(residual.unsqueeze(0), generator)[0])
            return _verdict(path, toks, last)
        path.append(accepted)
        row = accepted


def tree_presence(history: torch.Tensor, node_tokens: torch.Tensor, layout: TreeLayout, vocab: int) -> torch.Tensor:
    """`[n+1, vocab]` bool: the tokens the repetition penalty applies to at each row, the
    history plus the row's own path (as `presence_mask` does for a chain's earlier drafts)."""
    seen = torch.zeros(vocab, dtype=torch.bool, device="cpu")
    seen[history] = True
    mask = seen.unsqueeze(0).repeat(layout.depth.shape[0], 1)
    rows, cols = layout.visible[:, 1:].nonzero(as_tuple=True)
    mask[rows, node_tokens[cols]] = True
    return mask


def check_tree(draft: Draft, vocab: int) -> TreeLayout:
    n = len(draft)
    if draft.parents.shape != (n,):
        raise InvalidParameterError(f"a tree draft needs one parent per token: {n} tokens, parents of shape "
                                    f"{tuple(draft.parents.shape)}")
    if draft.q_draft is not None and draft.q_draft.shape != (n, vocab):
        raise InvalidParameterError(f"q_draft must be [{n}, {vocab}] for a tree of {n} nodes, got "
                                    f"{tuple(draft.q_draft.shape)}")
    return TreeLayout.of(draft.parents)


def verify_tree(layout: TreeLayout, draft: Draft, choice: TargetChoice, generator: torch.Generator) -> TreeVerdict:
    """The verdict on a token tree from the target's choice at its n+1 rows (row 0: the pending
    token, row i+1: node i), greedy or sampled as the choice is."""
    if choice.tokens is not None:
        return verify_tree_greedy(layout, draft.tokens, choice.tokens)
    return verify_tree_sampled(layout, draft.tokens, draft.q_draft, choice.p, generator)
