"""LITE: drafting from a tuned intermediate layer (Varshney et al., "Accelerating LLaMA Inference
by Enabling Intermediate Layer Decoding via Instruction Tuning with LITE", NAACL 2024).

LITE tunes the model so that the hidden states of a few intermediate layers already give good
next-token predictions through the shared LM head, then drafts with an early exit at one of
them. Ours is the self-distillation setting without touching the verifier: the model's weights
stay as shipped (verification is the model itself), and per tuned exit layer L only a small
module trains on the layer-L residual stream h:

    exit_L(h) = RMSNorm(h + B_L A_L h; w_L)   then the target's own frozen LM head

with rank-r matrices A_L [r, hidden], B_L [hidden, r] (B starting at zero) and a norm weight w_L
starting at the model's final norm: untrained, every exit is exactly the plain early exit at its
layer. Several exits train jointly (the loss is the mean over exits); the drafter uses one.

KV: the draft runs the target's first L layers, so the KV it writes for a token at layers < L is
the target's own; verification overwrites the draft positions as for every drafter. LITE adds no
attention layer, so unlike Kangaroo's adapter there is no KV of its own to catch up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.early_exit import ExitChainDrafter

DEFAULT_RANK = 16
EXIT_FRACTIONS = (1 / 10, 1 / 6, 1 / 4, 2 / 5)  # of the layers: 3, 5, 8, 12 of SmolLM2's 30


def default_exit_layers(n_layers: int) -> list[int]:
    """Four shallow-to-middle exits: LITE tunes several intermediate layers at once; deeper ones
    cost nearly a full step per draft token on a small model and cannot pay."""
    return sorted({min(n_layers - 1, max(1, round(n_layers * f))) for f in EXIT_FRACTIONS})


class LiteExits(nn.Module):
    """The tuned exits, stacked: exit e has norm[e] [hidden], down[e] = A [rank, hidden] and
    up[e] = B [hidden, rank]; fp32."""

    def __init__(self, final_norm: torch.Tensor, n_exits: int, rank: int, eps: float) -> None:
        super().__init__()
        hidden = final_norm.shape[0]
        self.eps = eps
        self.norm = nn.Parameter(final_norm.detach().float().repeat(n_exits, 1))
        self.down = nn.Parameter(torch.randn(n_exits, rank, hidden) / hidden ** 0.5)
        self.up = nn.Parameter(torch.zeros(n_exits, hidden, rank))  # zero: the untrained exit is the plain one

    def forward(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """h [..., hidden]: exit e's layer's residual stream (fp32) -> the normed state the LM head reads."""
        h = h + (h @ self.down[e].T) @ self.up[e].T
        return F.rms_norm(h, (h.shape[-1],), self.norm[e], self.eps)


def chain_value(agreement: float, exit_layer: int, config, max_draft: int = 8) -> float:
    """Tokens per unit of cost a draft chain from `exit_layer` can expect, the proxy that picks
    the drafter's exit at the end of training: a draft token is accepted with probability
    `agreement` (independently), costs the weights it reads relative to a full step (decoding is
    memory-bound: L layers + LM head over n layers + LM head), and a verify costs one step; the
    best draft length up to `max_draft` counts."""
    c = config
    layer = c.hidden * (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.hidden * c.intermediate
    head = c.vocab_size * c.hidden
    draft_cost = (exit_layer * layer + head) / (c.n_layers * layer + head)
    return max(sum(agreement ** i for i in range(k + 1)) / (1 + k * draft_cost) for k in range(1, max_draft + 1))


class LiteDrafter(ExitChainDrafter):
    """Drafts a chain from exit `index` (at layer `exit_layer`) of trained LiteExits, cut by the
    draft-exit rule (gamma) like the other early exits."""

    name = "lite"

    def __init__(self, exits: LiteExits, index: int, exit_layer: int, max_draft: int = 8, exit=None) -> None:
        super().__init__(exit_layer, max_draft, exit)
        self.exits = exits.eval()
        self.index = index

    @torch.inference_mode()
    def logits(self, ctx: DraftContext, token: int, position: int) -> torch.Tensor:
        """Draft logits `[1, vocab]` for `token` at `position`: the target's first L layers (their KV
        into the shared cache), the tuned exit, the target's LM head."""
        tr = ctx.model.transformer
        x = tr.forward(torch.tensor([token], device=tr.device), position, ctx.cache, exit_layer=self.exit_layer)
        return tr.logits(self.exits(x.float(), self.index).to(tr.dtype))

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        p = len(ctx.tokens) - 1  # the pending token's position; the cache holds verified KV before it

        def logits_at(i: int, drafts: list[int]) -> torch.Tensor:
            return self.logits(ctx, drafts[-1] if i else ctx.tokens[-1], p + i)

        return self._chain(ctx, max_tokens, logits_at)
