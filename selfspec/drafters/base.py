"""The one protocol every drafter follows (DESIGN.md, "Core interfaces")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from selfspec.sampling import SamplingParams, greedy_tokens, presence_mask, probs_from_logits, sample

if TYPE_CHECKING:
    from selfspec.kv_cache import KVCache
    from selfspec.models.loading import Model

EMPTY = torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class Draft:
    tokens: torch.Tensor  # [k] proposed token ids
    q_draft: torch.Tensor | None = None  # [k, vocab] draft probabilities; None = deterministic drafter
    # A token tree instead of a chain: parents[i] is the index of node i's parent (< i), -1 for
    # children of the pending token. None = a chain (parents[i] = i - 1). Verified by tree
    # verification (several candidate continuations in one forward pass).
    parents: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class DraftContext:
    """What a drafter may look at. `tokens` is the whole sequence (prompt + output); its last token
    is pending: its KV is not in `cache` yet (cache.length == len(tokens) - 1)."""

    model: "Model"
    cache: "KVCache"
    tokens: list[int]
    sampling: SamplingParams
    generator: torch.Generator
    # For a drafter that `wants_hidden` (draft heads, drafters/heads.py): the target's final hidden
    # state `[hidden]` of the row that produced the pending token, and len(tokens) when it was
    # kept (it belongs to this sequence only while hidden_for == len(tokens)).
    hidden: torch.Tensor | None = None
    hidden_for: int = -1

    def choose(self, logits: torch.Tensor, drafts: list[int]) -> tuple[int, torch.Tensor | None]:
        """Pick the next draft token from draft logits `[1, vocab]` with the same transform the
        target uses (repetition penalty sees the earlier drafts of this round). Returns the token and,
        under sampling, its distribution q `[vocab]`."""
        params = self.sampling
        presence = None
        if params.repetition_penalty != 1.0:
            hist = torch.tensor(self.tokens + drafts, dtype=torch.long, device=logits.device)
            presence = presence_mask(hist, EMPTY, logits.shape[-1])
        if params.greedy:
            return int(greedy_tokens(logits, params, presence)[0]), None
        q = probs_from_logits(logits, params, presence)  # [1, vocab]
        return int(sample(q, self.generator)[0]), q[0]


@runtime_checkable
class Drafter(Protocol):
    """Built-in drafters subclass it (and so inherit the optional members' defaults); any object
    with the four methods and a `name` is a drafter too: `declared` reads its optional members."""

    name: str
    # Optional members, with their defaults:
    wants_hidden: bool = False  # the decode loop keeps DraftContext.hidden up to date for it
    last_level: int | None = None  # grounded drafters: the match length behind the last proposal
    costs: object | None = None  # a cost model (drafters/costs.py CostModel) of this machine, if it has one

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        """Up to `max_tokens` draft tokens continuing `ctx.tokens`."""
        ...

    def update(self, accepted: int, proposed: int) -> None:
        """Learn from the verify result of the last proposal."""
        ...

    def reset(self) -> None:
        """Forget per-sequence state before a new sequence."""
        ...

    def extra_stats(self) -> dict:
        """Drafter-specific numbers for SpecStats (e.g. the final gamma)."""
        ...


OPTIONAL = ("wants_hidden", "last_level", "costs")


def declared(drafter, member: str):
    """An optional member of the Drafter protocol: the drafter's own value, else the protocol's
    default (a drafter that does not subclass Drafter need not define them)."""
    if member not in OPTIONAL:
        raise AttributeError(f"{member!r} is not an optional member of the Drafter protocol")
    return getattr(drafter, member, getattr(Drafter, member))


def stack_draft(tokens: list[int], q_rows: list[torch.Tensor | None]) -> Draft:
    # Draft ids stay on the CPU (they are Python ints already); q rows are on the model's device.
    ids = torch.tensor(tokens, dtype=torch.long, device="cpu")
    if not tokens or q_rows[0] is None:
        return Draft(ids, None)
    return Draft(ids, torch.stack(q_rows))
