"""Draft heads on the target's final hidden state: Medusa (Cai et al. 2024) and Hydra (Ankner et
al. 2024). Head i reads the final-normed hidden state h_t of the token that produced the pending
token x_{t+1} and predicts x_{t+i+2}; Hydra's heads also read the embeddings of x_{t+1}.. x_{t+i+1}
(the pending token and the drafts before), the sequential dependency Medusa lacks.

Every head ends in the target's own frozen LM head: a vocabulary projection per head would be
larger than SmolLM2 itself. Only the heads train (selfspec/train/).

Cost: the decode loop hands the drafter the hidden state its last forward computed anyway
(`wants_hidden`, DraftContext.hidden), so a Medusa round costs the K heads and one
LM-head matmul over K rows; Hydra pays one LM-head row per draft token (each needs the last).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfspec.drafters.base import EMPTY, Draft, DraftContext, Drafter
from selfspec.drafters.early_exit import draft_chain
from selfspec.drafters.layerskip import AdaptiveExit
from selfspec.errors import InvalidParameterError


class ResBlock(nn.Module):
    """x + SiLU(W x): Medusa's head block. W starts at zero, so an untrained head repeats the LM
    head's own prediction."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return base + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(hidden, hidden) for _ in range(heads))

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., hidden] -> every head's state [..., K, hidden] (what the LM head reads)."""
        return torch.stack([b(h, h) for b in self.blocks], dim=-2)


class HydraHeads(nn.Module):
    """Head i reads [h_t, e(x_{t+1}), .., e(x_{t+i+1})] (concatenated, embeddings RMS-normed)."""

    def __init__(self, hidden: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.emb_norm = nn.Parameter(torch.ones(hidden))
        self.blocks = nn.ModuleList(ResBlock((i + 2) * hidden, hidden) for i in range(heads))

    def __len__(self) -> int:
        return len(self.blocks)

    def head(self, i: int, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h [..., hidden], emb [..., >= i+1, hidden] (embeddings of x_{t+1}..) -> state [..., hidden]."""
        e = F.rms_norm(emb[..., : i + 1, :], (emb.shape[-1],), self.emb_norm, self.eps)
        return self.blocks[i](torch.cat((h, e.flatten(-2)), dim=-1), h)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Teacher-forced training: h [..., hidden], emb [..., K, hidden] -> [..., K, hidden]."""
        return torch.stack([self.head(i, h, emb) for i in range(len(self.blocks))], dim=-2)


def embed(tr, tokens: torch.Tensor) -> torch.Tensor:
    """The target's input embeddings of `tokens` (scaled as its forward scales them), fp32."""
    x = tr.embed_tokens(tokens).float()
    return x * tr.config.embed_scale if tr.config.embed_scale != 1.0 else x


class HeadsDrafter(Drafter):
    """Proposes a chain: head i's choice for x_{t+i+2}, stopping after the first head whose top
    probability is below gamma (the same adaptive rule as layer-skip)."""

    wants_hidden = True

    def __init__(self, heads: MedusaHeads | HydraHeads, max_draft: int | None = None,
                 exit: AdaptiveExit | None = None) -> None:
        if max_draft is not None and max_draft < 1:
            raise InvalidParameterError(f"--max-draft must be >= 1, got {max_draft}")
        self.heads = heads.eval()
        self.name = "hydra" if isinstance(heads, HydraHeads) else "medusa"
        self.max_draft = len(heads) if max_draft is None else min(max_draft, len(heads))
        self.exit = exit or AdaptiveExit()
        self._hit_max = False
        self.missing_hidden = 0

    def reset(self) -> None:
        self._hit_max = False

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        hidden = ctx.hidden
        if hidden is None or ctx.hidden_for != len(ctx.tokens):
            self.missing_hidden += 1  # a loop that does not hand over the hidden state: plain step
            return Draft(EMPTY)
        tr = ctx.model.transformer
        h = hidden.float().reshape(-1)  # [hidden]
        limit = min(self.max_draft, max_tokens)
        if isinstance(self.heads, MedusaHeads):
            all_logits = tr.logits(self.heads(h)[:limit].to(tr.dtype))  # [limit, vocab]: one head matmul

            def logits_at(i: int, drafts: list[int]) -> torch.Tensor:
                return all_logits[i: i + 1]
        else:
            def logits_at(i: int, drafts: list[int]) -> torch.Tensor:
                emb = embed(tr, torch.tensor(ctx.tokens[-1:] + drafts, device=tr.device))  # e(x_{t+1}) and the drafts'
                return tr.logits(self.heads.head(i, h, emb).unsqueeze(0).to(tr.dtype))

        draft, stopped = draft_chain(ctx, limit, self.exit.gamma, logits_at)
        self._hit_max = not stopped
        return draft

    def update(self, accepted: int, proposed: int) -> None:
        self.exit.update(accepted, proposed, self._hit_max)

    def extra_stats(self) -> dict:
        return {"gamma": self.exit.gamma, "heads": len(self.heads)}
