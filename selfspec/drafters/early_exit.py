"""Early-exit drafting with a trained adapter (Kangaroo, Liu et al. 2024).

The draft model is the target's first L layers, then a small trained adapter (one attention block
and a small MLP), then the target's own final norm and LM head. Drafting stops when the draft's
top probability falls below gamma (Kangaroo's "second early exit"; the same rule and adaptation
as layer-skip's `AdaptiveExit`). Only the adapter is trained (selfspec/train/).

KV sharing: layers 0..L-1 of the draft are the target's layers, so the KV they write for a token
is the target's KV for those layers; the draft writes it into the target's cache at draft
positions (verification overwrites them as usual). The adapter keeps its own one-layer KV cache.
Its entries for the pending token and the accepted drafts stay valid after verification; only
positions whose layer-L state was never computed (the last accepted draft, the bonus token) are
caught up at the next proposal, and the target's verified KV at those positions is restored
bit for bit afterwards, so verification never reads a value the draft computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfspec.drafters.base import Draft, DraftContext, Drafter, stack_draft
from selfspec.drafters.layerskip import AdaptiveExit
from selfspec.errors import InvalidParameterError
from selfspec.models.transformer import rope_tables


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [..., T, heads, hd], cos/sin [T, 1, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Adapter(nn.Module):
    """Pre-norm attention block (+ optional gated MLP) on the layer-L residual stream, fp32.
    The output projections start at zero: the untrained adapter is the identity, i.e. the plain
    early exit (layer-L state straight into the final norm and LM head), and training improves on it."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float,
                 mlp: int = 0, eps: float = 1e-6, max_len: int = 4096) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, head_dim, eps
        self.attn_norm = nn.Parameter(torch.ones(hidden))
        self.wq = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(hidden, 2 * n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, hidden, bias=False)
        nn.init.zeros_(self.wo.weight)
        self.mlp = mlp
        if mlp:
            self.mlp_norm = nn.Parameter(torch.ones(hidden))
            self.w_gate_up = nn.Linear(hidden, 2 * mlp, bias=False)
            self.w_down = nn.Linear(mlp, hidden, bias=False)
            nn.init.zeros_(self.w_down.weight)
        cos, sin = rope_tables(rope_theta, head_dim, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0, kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x [B, T, hidden] at positions start..start+T-1 -> [B, T, hidden]. With `kv` (B = 1,
        tensors [n_kv, max_len, hd]) the new keys/values are written there and the queries also
        see positions 0..start-1; without, attention is causal within the T positions."""
        B, T, _ = x.shape
        end = start + T
        h = F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps)
        q = self.wq(h).view(B, T, self.n_heads, self.head_dim)
        k, v = self.wkv(h).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        cos, sin = self.cos[start:end].unsqueeze(1), self.sin[start:end].unsqueeze(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if kv is not None:
            kv[0][:, start:end] = k[0]
            kv[1][:, start:end] = v[0]
            k, v = kv[0][:, :end].unsqueeze(0), kv[1][:, :end].unsqueeze(0)
        mask = None
        if T > 1:  # query i (position start+i) sees keys at positions <= start+i
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, heads, T, hd]
        x = x + self.wo(out.transpose(1, 2).reshape(B, T, -1))
        if self.mlp:
            gate, up = self.w_gate_up(F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps)).chunk(2, dim=-1)
            x = x + self.w_down(F.silu(gate) * up)
        return x


def build_adapter(config, mlp: int, max_len: int) -> Adapter:
    c = config
    return Adapter(c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta, mlp, c.rms_eps, max_len)


def draft_chain(ctx: DraftContext, limit: int, gamma: float, logits_at) -> tuple[Draft, bool]:
    """Up to `limit` draft tokens, draft i chosen from `logits_at(i, drafts so far)` `[1, vocab]`
    as the target would choose; stops after the first whose top probability is below gamma.
    Returns the draft and whether it stopped that way."""
    tokens: list[int] = []
    q_rows: list[torch.Tensor | None] = []
    for i in range(limit):
        logits = logits_at(i, tokens)
        tok, q = ctx.choose(logits, tokens)
        tokens.append(tok)
        q_rows.append(q)
        top = float(q.max()) if q is not None else float(torch.softmax(logits[0], -1).max())
        if top < gamma:
            return stack_draft(tokens, q_rows), True
    return stack_draft(tokens, q_rows), False


def default_exit_layer(n_layers: int) -> int:
    """Kangaroo's shallow sub-network: about a sixth of the layers (5 of SmolLM2's 30), at least 1."""
    return max(1, round(n_layers / 6))


class ExitChainDrafter(Drafter):
    """What the early-exit drafters (Kangaroo's adapter, LITE's tuned exits) share: a chain drafted
    from the state after the target's first `exit_layer` layers, cut by the draft-exit rule (stop
    after the first token whose top probability is below gamma) and gamma adapted after each verify."""

    def __init__(self, exit_layer: int, max_draft: int = 8, exit: AdaptiveExit | None = None) -> None:
        if max_draft < 1:
            raise InvalidParameterError(f"--max-draft must be >= 1, got {max_draft}")
        self.exit_layer = exit_layer
        self.max_draft = max_draft
        self.exit = exit or AdaptiveExit()
        self._hit_max = False

    def reset(self) -> None:
        self._hit_max = False

    def _chain(self, ctx: DraftContext, max_tokens: int, logits_at) -> Draft:
        draft, stopped = draft_chain(ctx, min(self.max_draft, max_tokens), self.exit.gamma, logits_at)
        self._hit_max = not stopped  # a draft cut at the length limit says nothing about gamma
        return draft

    def update(self, accepted: int, proposed: int) -> None:
        self.exit.update(accepted, proposed, self._hit_max)

    def extra_stats(self) -> dict:
        return {"gamma": self.exit.gamma, "exit_layer": self.exit_layer}


class EarlyExitDrafter(ExitChainDrafter):
    name = "early-exit"

    def __init__(self, adapter: Adapter, exit_layer: int, max_draft: int = 8, exit: AdaptiveExit | None = None) -> None:
        super().__init__(exit_layer, max_draft, exit)
        self.adapter = adapter.eval()
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._valid = 0  # adapter KV holds positions [0, _valid) of the current sequence
        self._pending = 0

    def reset(self) -> None:
        super().reset()
        self._valid = 0

    def _adapter_kv(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.adapter
        if self._kv is None or self._kv[0].shape[1] < max_len:
            shape = (a.n_kv_heads, max_len, a.head_dim)
            dev = a.attn_norm.device
            self._kv = (torch.zeros(shape, device=dev), torch.zeros(shape, device=dev))
        return self._kv

    @torch.inference_mode()
    def _step(self, ctx: DraftContext, tokens: list[int], start: int) -> torch.Tensor:
        """Draft logits `[1, vocab]` after `tokens` at positions start..: the first L layers (their
        KV into the shared cache), the adapter (its own KV), the target's norm and head."""
        tr = ctx.model.transformer
        x = tr.forward(torch.tensor(tokens, device=tr.device), start, ctx.cache, exit_layer=self.exit_layer)  # [T, hidden]
        y = self.adapter(x.float().unsqueeze(0), start, self._adapter_kv(ctx.cache.max_len))[0, -1:]
        return tr.logits(tr.final_hidden(y.to(tr.dtype)))

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        cache, L = ctx.cache, self.exit_layer
        p = len(ctx.tokens) - 1  # the pending token's position; cache.length == p
        a = min(self._valid, p)
        # Catch-up positions a..p-1 hold verified target KV: keep layers < L of it exactly.
        saved = (cache.k[:L, :, a:p].clone(), cache.v[:L, :, a:p].clone()) if a < p else None
        cache.rollback(a)
        logits = self._step(ctx, ctx.tokens[a:], a)
        if saved is not None:
            cache.k[:L, :, a:p] = saved[0]
            cache.v[:L, :, a:p] = saved[1]
        self._pending = p

        def logits_at(i: int, drafts: list[int]) -> torch.Tensor:
            return logits if i == 0 else self._step(ctx, drafts[-1:], p + i)

        draft = self._chain(ctx, max_tokens, logits_at)
        self._valid = p + len(draft)  # pending + every draft but the last went through the adapter
        return draft

    def update(self, accepted: int, proposed: int) -> None:
        # Adapter KV beyond the pending token and the accepted drafts belongs to rejected drafts.
        self._valid = min(self._valid, self._pending + 1 + accepted)
        super().update(accepted, proposed)
