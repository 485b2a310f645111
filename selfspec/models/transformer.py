"""Our decoder: one file, read top to bottom.

Llama (incl. Mistral), Qwen2 and Gemma-2/3 share this code; `ModelConfig` flags switch the few
differences (qkv bias, qk-norm, sandwich norms, soft-capping, sliding windows, dual RoPE bases).
Batch size is 1: `tokens` is a 1-D tensor of T new tokens at positions start..start+T-1.

Self-speculation: `skip` names attention and MLP sub-layers to bypass. A skipped sub-layer passes
the residual through unchanged and does not touch its layer's KV cache (Draft & Verify, Zhang et
al., ACL 2024). The skip set is an argument, never state of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from selfspec import kernels
from selfspec.kv_cache import KVCache
from selfspec.models.config import ModelConfig
from selfspec.tree import TreeLayout, tree_mask

# Longer inputs (prefill) run in chunks of this many tokens: the linears' row invariance is
# probed up to this row count (selfspec/models/rows.py), so a prompt prefilled at once and one
# prefilled in parts (prefix reuse) write the same KV bit for bit.
CHUNK = 64


@dataclass(frozen=True)
class SkipSet:
    """Sub-layers bypassed by the draft pass (0-based layer ids)."""

    attention: frozenset[int] = field(default_factory=frozenset)
    mlp: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, attention=(), mlp=()) -> "SkipSet":
        return cls(frozenset(int(i) for i in attention), frozenset(int(i) for i in mlp))

    def __len__(self) -> int:
        return len(self.attention) + len(self.mlp)


NO_SKIP = SkipSet()


class Linear:
    """y = x W^T (+ b) with PyTorch's default kernel (MKL/oneDNN chosen per call).

    `rows` is how a call keeps every output row independent of the other rows (the forward pass
    must be row-invariant, so verification equals plain decoding); `selfspec.models.rows` sets it
    per machine by a probe at load: "direct" (the kernel already is), "pad1" (the kernel takes
    another code path for a single row, so one row is computed as two identical rows) or
    "rowwise" (every row alone, padded: exact whatever the kernel does, and slow)."""

    kernel = "F.linear"
    rows = "direct"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.nbytes + (bias.nbytes if bias is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows == "direct" or x.dim() != 2:
            return self._apply(x)
        if x.shape[0] == 1:
            return self._apply(x.expand(2, -1).contiguous())[:1]
        if self.rows == "pad1":
            return self._apply(x)
        return torch.cat([self._apply(x[r: r + 1].expand(2, -1).contiguous())[:1] for r in range(x.shape[0])])

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PrepackedLinear(Linear):
    """fp32 weights reordered once into oneDNN's blocked layout. On our AVX2 machines this is the
    cheapest kernel for verification: 8 tokens cost ~1.5 single-token steps of the whole model,
    against ~2.2 with F.linear (whose M=2..8 matmuls are slow), and one token costs ~20% less.
    The plain weight is dropped after packing (no second copy), unless `keep_weight`."""

    kernel = "onednn-prepacked"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_weight: bool = False) -> None:
        super().__init__(weight, bias)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        if not keep_weight:
            self.weight = None

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, keep_weight: bool = False) -> Linear:
    """The kernel for this dtype on this machine (see `PrepackedLinear`; CPU weights only)."""
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"):
        return PrepackedLinear(weight, bias, keep_weight)
    return Linear(weight, bias)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    wqkv: Linear  # q, k and v projections fused: one matmul instead of three
    wo: Linear
    ffn_norm: torch.Tensor
    w_gate_up: Linear  # gate and up fused
    w_down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


def rope_tables(theta: float, head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, `[max_len, head_dim]`, in the rotate-half layout of HF checkpoints."""
    # Computed on the CPU in fp32 whatever the model's device: the same tables everywhere.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device="cpu"), inv_freq)  # [max_len, hd/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x*cos + cat(-x2, x1)*sin, as x*cos + roll(x)*signed_sin with
    signed_sin = cat(-sin1, sin2): the same products bit for bit (a sign flip is exact), 4 ops
    instead of 6 per call. x [T, heads, hd]; cos/signed_sin [T, 1, hd]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class Transformer:
    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[Layer],
                 final_norm: torch.Tensor, lm_head: Linear, max_len: int) -> None:
        self.config = config
        self.embed = embed  # [vocab, hidden]: a tensor, or selfspec.models.native.NativeEmbedding
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.device = embed.device  # every tensor of a forward is made here (selfspec/hardware.py)
        c = config
        self.q_size = c.n_heads * c.head_dim
        self.kv_size = c.n_kv_heads * c.head_dim
        self.group = c.n_heads // c.n_kv_heads
        self.rope_max = max_len
        cos, sin = rope_tables(c.rope_theta, c.head_dim, max_len)
        self.rope_global = (cos.to(self.device, self.dtype), _signed(sin).to(self.device, self.dtype))
        if c.rope_theta_local is not None:
            cos, sin = rope_tables(c.rope_theta_local, c.head_dim, max_len)
            self.rope_local = (cos.to(self.device, self.dtype), _signed(sin).to(self.device, self.dtype))
        else:
            self.rope_local = self.rope_global
        self.embed_scale = torch.tensor(c.embed_scale, dtype=self.dtype, device=self.device)
        # Native weights of a Llama-family model: each layer as one C call (models/native.py,
        # fused_layers), set by the native build; None: the PyTorch operations below.
        self.fused = None
        # The GGUF file a native build computes on (models/native.py); None otherwise. Keys the
        # weight-cache entry of its precision draft's copies (models/native_draft.py).
        self.source = None
        # Greedy tokens without every exact logit (models/greedy_head.py), set by the native
        # build where its LM head allows; None: the argmax of the full logits.
        self.argmax_head = None

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `tokens` (a tensor, or the file's blocks under --dtype native)."""
        if isinstance(self.embed, torch.Tensor):
            return F.embedding(tokens, self.embed)
        return self.embed.lookup(tokens)

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, min(max_len, self.rope_max), self.dtype,
                       self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # RMSNorm in fp32 as both reference implementations do; Gemma's "1 + w" is folded into w at load.
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.config.rms_eps).to(x.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache,
                skip: SkipSet = NO_SKIP, last_only: bool = False, head: Linear | None = None,
                exit_layer: int | None = None, return_hidden: bool = False, tree: TreeLayout | None = None,
                argmax: bool = False):
        """Logits `[T, vocab]` (fp32) for the T tokens at positions start..start+T-1, or `[1, vocab]`
        for the last one if `last_only`. Writes their KV into `cache`; `cache.length` becomes
        start + T (positions after that, e.g. rejected drafts, are dropped). `head` replaces the LM
        head (a drafter's head over part of the vocabulary: its logits are over that part).

        For trained drafters: `exit_layer=L` runs layers 0..L-1 only and returns their output, the
        raw residual stream `[T, hidden]` (no norm, no head; only those layers' KV is written);
        `return_hidden` returns `(logits, hidden)`, hidden being the final-normed state `[T or 1,
        hidden]` the LM head reads.

        `argmax` returns the greedy tokens `[T or 1]` instead of the logits: their argmax, ties to
        the lowest id, bit for bit (`greedy`).

        `tree` makes the T tokens a token tree (selfspec/tree.py): token r still goes to cache slot
        start + r, but sits at position start + depth[r] and attends to the cached keys before
        `start` plus its own ancestors only."""
        c = self.config
        T = tokens.shape[0]
        cache.check_room(start, T)
        if T > CHUNK and tree is None:
            return self._chunked(tokens, start, cache, skip, last_only, head, exit_layer, return_hidden, argmax)
        end = start + T
        x = self.embed_tokens(tokens)  # [T, hidden]
        if c.embed_scale != 1.0:
            x = x * self.embed_scale
        rows = slice(start, end) if tree is None else start + tree.depth  # rope positions
        ropes = {
            False: tuple(t[rows].unsqueeze(1) for t in self.rope_global),
            True: tuple(t[rows].unsqueeze(1) for t in self.rope_local),
        }
        masks: dict[int, object] = {}
        for i, layer in enumerate(self.layers if exit_layer is None else self.layers[:exit_layer]):
            window = c.sliding_window[i]
            attn = i not in skip.attention
            if attn and window not in masks:
                masks[window] = self._visibility(start, T, window, tree)
            if self.fused is not None:
                self.fused(i, x, start, cache, ropes[window > 0], masks.get(window), attn, i not in skip.mlp)
                continue
            if attn:
                h = self._attention(i, layer, self._norm(x, layer.attn_norm), start, cache,
                                    ropes[window > 0], window, masks[window])
                if layer.post_attn_norm is not None:
                    h = self._norm(h, layer.post_attn_norm)
                x = x + h
            if i not in skip.mlp:
                h = self._mlp(layer, self._norm(x, layer.ffn_norm))
                if layer.post_ffn_norm is not None:
                    h = self._norm(h, layer.post_ffn_norm)
                x = x + h
        cache.wrote(start, T)
        if last_only:
            x = x[-1:]
        if exit_layer is not None:
            return x
        hidden = self._norm(x, self.final_norm)
        out = self.greedy(hidden, head) if argmax else self.logits(hidden, head)
        return (out, hidden) if return_hidden else out

    def greedy(self, hidden: torch.Tensor, head: Linear | None = None) -> torch.Tensor:
        """`[T]` argmax of the logits of final-normed hidden states (ties: the lowest id), through
        the exact-argmax head where the native build made one: the same tokens, most logits never
        computed exactly (models/greedy_head.py)."""
        if head is None and self.argmax_head is not None:
            ids = self.argmax_head.argmax(hidden)
            if ids is not None:
                return ids.to(hidden.device)
        return self.logits(hidden, head).argmax(-1)

    def logits(self, hidden: torch.Tensor, head: Linear | None = None) -> torch.Tensor:
        """fp32 logits from final-normed hidden states `[T, hidden]` (LM head, then soft-capping)."""
        logits = (head or self.lm_head)(hidden).float()
        c = self.config
        if c.final_softcap:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm applied to a raw residual stream (e.g. an early exit's output)."""
        return self._norm(x, self.final_norm)

    def _chunked(self, tokens, start, cache, skip, last_only, head, exit_layer, return_hidden, argmax=False):
        """A long input as consecutive forwards of at most CHUNK tokens (see CHUNK)."""
        T = tokens.shape[0]
        parts = []
        for c0 in range(0, T, CHUNK):
            final = c0 + CHUNK >= T
            # An earlier chunk whose output is dropped runs every layer (its KV is needed) but no head.
            skip_head = last_only and not final and exit_layer is None
            out = self.forward(tokens[c0: c0 + CHUNK], start + c0, cache, skip=skip, last_only=last_only,
                               head=head, exit_layer=len(self.layers) if skip_head else exit_layer,
                               return_hidden=return_hidden, argmax=argmax)
            if final or not last_only:
                parts.append(out)
        if last_only:
            return parts[-1]
        if return_hidden:
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.cat(parts)

    def _first_key(self, start: int, window: int) -> int:
        # Keys older than the window can never be attended to by the queries at >= start.
        return max(0, start - window + 1) if window else 0

    def _visibility(self, start: int, T: int, window: int, tree: TreeLayout | None):
        """Which keys each of the T new rows attends to. On the CPU: `(lo [T] int32, visible [T, T]
        uint8)` for the fixed-order kernel (row t sees cache slots lo[t]..start-1 and the new rows s
        with visible[t, s]); elsewhere an additive mask `[T, L]` over keys first_key..start+T-1."""
        if self.device.type != "cpu":
            if tree is not None:
                return tree_mask(tree, start, self._first_key(start, window), window).to(self.device)
            return self._mask(start, T, window)
        if tree is None:
            pos = torch.arange(start, start + T, dtype=torch.int32, device="cpu")
            rel = torch.arange(T, device="cpu").unsqueeze(1) - torch.arange(T, device="cpu").unsqueeze(0)  # row - column
            visible = rel >= 0
        else:
            pos = (start + tree.depth).to(torch.int32)
            rel = tree.depth.unsqueeze(1) - tree.depth.unsqueeze(0)
            visible = tree.visible.clone()
        if window:
            visible &= rel < window
            lo = (pos - window + 1).clamp_min(0)
        else:
            lo = torch.zeros(T, dtype=torch.int32, device="cpu")
        return lo.to(torch.int32).contiguous(), visible.to(torch.uint8).contiguous()

    def _mask(self, start: int, T: int, window: int) -> torch.Tensor | None:
        """Additive mask `[T, L]` over keys first_key..start+T-1, or None where nothing is masked."""
        first = self._first_key(start, window)
        if T == 1:
            return None  # the single query sees all keys in range: causality and window hold by slicing
        q_pos = torch.arange(start, start + T, device=self.device).unsqueeze(1)
        k_pos = torch.arange(first, start + T, device=self.device).unsqueeze(0)
        allowed = k_pos <= q_pos
        if window:
            allowed &= (q_pos - k_pos) < window
        return torch.zeros(allowed.shape, device=self.device).masked_fill_(~allowed, float("-inf"))

    def _attention(self, i: int, layer: Layer, x: torch.Tensor, start: int, cache: KVCache,
                   rope: tuple[torch.Tensor, torch.Tensor], window: int, visibility) -> torch.Tensor:
        c = self.config
        T = x.shape[0]
        end = start + T
        qkv = layer.wqkv(x)  # [T, q + 2 kv]
        v = qkv[:, self.q_size + self.kv_size:].view(T, c.n_kv_heads, c.head_dim)
        cos, sin = rope
        if layer.q_norm is not None:
            q = qkv[:, : self.q_size].view(T, c.n_heads, c.head_dim)
            k = qkv[:, self.q_size: self.q_size + self.kv_size].view(T, c.n_kv_heads, c.head_dim)
            q = apply_rope(self._norm(q, layer.q_norm), cos, sin)
            k = apply_rope(self._norm(k, layer.k_norm), cos, sin)
        else:  # q and k heads rotated in one pass (fewer kernel launches)
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(T, c.n_heads + c.n_kv_heads, c.head_dim), cos, sin)
            q, k = qk[:, : c.n_heads], qk[:, c.n_heads:]
        cache.k[i, :, start:end] = k.transpose(0, 1)
        cache.v[i, :, start:end] = v.transpose(0, 1)
        if self.device.type == "cpu":
            # Fixed-order attention: each row's result depends on its query and keys only, so a
            # k-token pass repeats the 1-token passes bit for bit (selfspec/kernels/attention.c).
            lo, visible = visibility
            out = kernels.attention(q, cache.k[i], cache.v[i], lo, start, visible, c.query_scale,
                                    float(c.attn_softcap or 0.0))
            return layer.wo(out.to(x.dtype).reshape(T, self.q_size))
        first = self._first_key(start, window)
        keys = cache.k[i, :, first:end]  # [kv, L, hd]
        values = cache.v[i, :, first:end]
        # Grouped-query attention without repeating K/V: the query heads sharing one KV head
        # become extra rows of that head's query matrix.
        q = q.reshape(T, c.n_kv_heads, self.group, c.head_dim).permute(1, 2, 0, 3)
        q = q.reshape(c.n_kv_heads, self.group * T, c.head_dim)
        scores = torch.matmul(q, keys.transpose(1, 2)).float() * c.query_scale  # [kv, g*T, L]
        if c.attn_softcap:
            scores = torch.tanh(scores / c.attn_softcap) * c.attn_softcap
        if visibility is not None:
            scores = (scores.view(c.n_kv_heads, self.group, T, -1) + visibility).view_as(scores)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [kv, g*T, hd]
        out = out.view(c.n_kv_heads, self.group, T, c.head_dim).permute(2, 0, 1, 3)
        return layer.wo(out.reshape(T, self.q_size))

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        gate_up = layer.w_gate_up(x)
        gate, up = gate_up.chunk(2, dim=-1)
        if self.config.activation == "silu":
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh")
        return layer.w_down(gate * up)

    @property
    def kernel(self) -> str:
        """The layers' linear kernel, and the LM head's where it differs."""
        layers, head = self.layers[0].wqkv.kernel, self.lm_head.kernel
        return layers if head == layers else f"{layers}, head {head}"

    @property
    def nbytes(self) -> int:
        """Bytes of weights read by one full forward step (embedding row lookups not counted)."""
        total = self.lm_head.nbytes
        for layer in self.layers:
            total += sum(getattr(layer, n).nbytes for n in ("wqkv", "wo", "w_gate_up", "w_down"))
        return total
