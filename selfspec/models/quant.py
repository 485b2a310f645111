"""Weight-only int8 and int4 linears on PyTorch's own CPU kernels.

Two uses. `--dtype int8|int4` loads the whole model this way (`quantize_transformer`): a decode
step reads 1/4 or ~1/7 of the fp32 bytes. And a precision self-draft (`draft_view`) drafts with
int8 copies of an fp32 model's linears; the draft may be any function of the context without
breaking losslessness, because verification runs the model as loaded. An int8 copy per output
channel agreed with fp32 SmolLM2 on 98.6% of greedy positions in a probe.

Embeddings, norms, RoPE and attention stay in float; only the matmuls with weights change.
Both kernels take bf16 activations (their fast path on AVX2 and AVX-512 alike) and return fp32
here, so the rest of the decoder sees the dtype it always sees.
"""
from __future__ import annotations

import dataclasses

import torch

from selfspec.errors import InvalidParameterError
from selfspec.models.transformer import Linear, Transformer

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")
INT4_GROUP_SIZES = (32, 64, 128, 256)
# 32: the block size of the GGUF 4-bit formats our models ship in (Q4_1, Q4_K sub-blocks), so int4
# with groups of 32 re-quantises those blocks almost exactly; larger groups were not faster here
# (docs/benchmarks.md).
DEFAULT_INT4_GROUP = 32
# The LM head is int8 under --dtype int4 too: its weights come from 8-bit GGUF tensors (the tied
# Q8_0 embedding of both embedded models), which 4 bits would really re-quantise. On SmolLM2 an
# int4 head cut greedy agreement with fp32 from 95% to 87% (docs/benchmarks.md).
HEAD_BITS = 8
# PyTorch's int8 weight-only kernel segfaults on AVX-512 when its weight does not start at a
# multiple of 64 bytes and M >= 4 (torch 2.13; seen with weights memory-mapped from the weight
# cache). Every tensor a quantised kernel reads is kept at this alignment, however it was made.
ALIGN = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its CPU data starts at a multiple of ALIGN bytes, else a contiguous copy
    (PyTorch's CPU allocator returns 64-byte aligned memory). Other devices: `t` as it is."""
    if t.device.type != "cpu" or t.data_ptr() % ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def dense_weight(linear: Linear) -> torch.Tensor:
    """The plain fp32-or-float `[out, in]` weight of any of our linears (prepacked and quantised
    ones included; a quantised weight comes back dequantised, and quantising it again with the
    same scheme gives the same integer values)."""
    if linear.weight is not None:
        return linear.weight
    if isinstance(linear, (Int8Linear, Int4Linear)) or hasattr(linear, "parts"):  # parts: NativeLinear
        return linear.dequantize()
    return linear.packed.to_dense()


class Int8Linear(Linear):
    """Symmetric per-output-channel int8 weights; activations go through bf16, which is what
    PyTorch's CPU int8 weight-only kernel (`aten._weight_int8pack_mm`) is fast for.
    Invariant: `q` and `scale` are 64-byte aligned (`aligned`), whichever constructor made them."""

    kernel = "int8-weight-only"
    bits = 8

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
        self.weight = None
        self.q = aligned(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous())
        self.scale = aligned(scale.to(torch.bfloat16))
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.nbytes = self.q.nbytes + self.scale.nbytes + (bias.nbytes if bias is not None else 0)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors this linear is rebuilt from (`from_state`), as the weight cache stores them."""
        return _with_bias({"q": self.q, "scale": self.scale}, self.bias)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Int8Linear":
        """The linear whose `state()` this is, without quantising again (a misaligned tensor,
        e.g. one memory-mapped from a file, is copied: see `ALIGN`)."""
        self = cls.__new__(cls)
        self.weight, self.bias = None, state.get("bias")
        self.q, self.scale = aligned(state["q"]), aligned(state["scale"])
        self.out_features, self.in_features = self.q.shape
        self.nbytes = sum(t.nbytes for t in state.values())
        return self


def int4_group(in_features: int, group_size: int) -> int:
    """The group size used for a weight with `in_features` columns: `group_size`, halved until it
    divides in_features (SmolLM2's 576 columns take 64 where 128 was asked). Never below 32."""
    g = group_size
    while in_features % g and g > 32:
        g //= 2
    if in_features % g:
        raise InvalidParameterError(f"int4 needs in_features divisible by 32; this weight has {in_features}")
    return g


class Int4Linear(Linear):
    """Asymmetric int4 weights in groups of `group_size` input columns (scale and zero point per
    group and output channel), packed once for `aten._weight_int4pack_mm_for_cpu`.
    Dequantised weight: (q - 8) * scale + zero, q in 0..15 (the convention of that kernel).
    Invariant: `packed` and `scales_zeros` are 64-byte aligned (`aligned`), like Int8Linear's
    weights (only the int8 kernel was seen to crash on misaligned ones; this one gets the same
    guarantee rather than a probe per PyTorch version)."""

    bits = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = DEFAULT_INT4_GROUP) -> None:
        if group_size not in INT4_GROUP_SIZES:
            raise InvalidParameterError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        w = weight.float()
        out, inn = w.shape
        g = int4_group(inn, group_size)
        groups = w.reshape(out, inn // g, g)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, n_groups]
        scale = ((hi - lo) / 15).clamp_min(1e-6)
        zero = lo + 8 * scale
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp_(0, 15)
        q = q.to(torch.int32).reshape(out, inn)
        self.packed = aligned(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [n_groups, out, 2]: the layout the kernel reads; bf16, the activation dtype it requires.
        self.scales_zeros = aligned(torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.group_size = g
        self.kernel = f"int4-weight-only-g{g}"
        self.weight = None
        self.bias = bias
        self.out_features, self.in_features = out, inn
        self.nbytes = self.packed.nbytes + self.scales_zeros.nbytes + (bias.nbytes if bias is not None else 0)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size,
                                                       self.scales_zeros).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        # The kernel applied to the identity (fp32 activations: exact, one nonzero term per sum).
        eye = torch.eye(self.in_features)
        cols = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size,
                                                          self.scales_zeros.float())  # [in, out]
        return cols.t().contiguous()

    def state(self) -> dict[str, torch.Tensor]:
        """The packed weight as the kernel reads it (a plain uint8 tensor `[out, in/2]`) and its
        scales and zero points; the group size follows from their shapes."""
        return _with_bias({"packed": self.packed, "scales_zeros": self.scales_zeros}, self.bias)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Int4Linear":
        self = cls.__new__(cls)
        self.weight, self.bias = None, state.get("bias")
        self.packed, self.scales_zeros = aligned(state["packed"]), aligned(state["scales_zeros"])
        self.out_features, self.in_features = self.packed.shape[0], 2 * self.packed.shape[1]
        self.group_size = self.in_features // self.scales_zeros.shape[0]
        self.kernel = f"int4-weight-only-g{self.group_size}"
        self.nbytes = sum(t.nbytes for t in state.values())
        return self


def _with_bias(state: dict[str, torch.Tensor], bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return state if bias is None else {**state, "bias": bias}


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     bits: int, group_size: int = DEFAULT_INT4_GROUP) -> Linear:
    """`make_linear` for a quantised model (a tied embedding keeps its float copy for the lookup)."""
    return Int8Linear(weight, bias) if bits == 8 else Int4Linear(weight, bias, group_size)


def quantize_linear(linear: Linear, bits: int, group_size: int = DEFAULT_INT4_GROUP) -> Linear:
    w = dense_weight(linear)
    return Int8Linear(w, linear.bias) if bits == 8 else Int4Linear(w, linear.bias, group_size)


def quantize_transformer(tr: Transformer, bits: int, group_size: int = DEFAULT_INT4_GROUP,
                         head_bits: int | None = HEAD_BITS) -> Transformer:
    """A decoder whose linears are int8 or int4 and whose LM head is `head_bits` (None: kept as
    it is), over the same embedding, norms, RoPE tables and KV-cache layout as `tr`. A tied
    embedding stays float for the lookup; the head becomes its own quantised copy."""
    if bits not in (8, 4):
        raise InvalidParameterError(f"weight bits must be 8 or 4, got {bits}")
    from selfspec.progress import Bar

    layers = []
    with Bar(f"quantising a copy of the weights to int{bits} (layers)", len(tr.layers), delay=1.0) as bar:
        for layer in tr.layers:
            layers.append(dataclasses.replace(layer, **{n: quantize_linear(getattr(layer, n), bits, group_size)
                                                        for n in LINEARS}))
            bar.advance()
    lm_head = tr.lm_head if head_bits is None else quantize_linear(tr.lm_head, head_bits, group_size)
    return Transformer(tr.config, tr.embed, layers, tr.final_norm, lm_head, tr.rope_max)


def weight_bits(tr: Transformer) -> int | None:
    """Bits of the layers' weights when they are quantised, else None (a float model)."""
    return getattr(tr.layers[0].wqkv, "bits", None)


DRAFT_BITS = (8, 4)


def draft_view(tr: Transformer, bits: int) -> Transformer:
    """The decoder a precision self-draft runs: `tr`'s layers with `bits`-bit weights (int4 in
    groups of 32) and an int8 LM head, over the same embedding, norms, RoPE and KV-cache layout.
    A `tr` already quantised to `bits` or fewer is returned as it is."""
    if bits not in DRAFT_BITS:
        raise InvalidParameterError(f"draft bits must be 8 or 4, got {bits}")
    from selfspec.models import native_draft

    if native_draft.is_native(tr):  # cheaper GGUF blocks and int8 activations, not PyTorch's int8/int4
        return native_draft.draft_view(tr, bits)
    have = weight_bits(tr)
    if have is not None and have <= bits:
        return tr
    return quantize_transformer(tr, bits, head_bits=HEAD_BITS)


def extra_weight_bytes(view: Transformer, tr: Transformer) -> int:
    """Bytes the view holds beyond `tr`: its linears and head when they are its own copies (a
    native draft's new linears share the blocks they do not copy: its plan counts the copies)."""
    if getattr(view, "draft_plan", None) is not None:
        return view.draft_plan["extra_bytes"]
    own = [(a, b) for la, lb in zip(view.layers, tr.layers) for a, b in
           ((getattr(la, n), getattr(lb, n)) for n in LINEARS)] + [(view.lm_head, tr.lm_head)]
    return sum(a.nbytes for a, b in own if a is not b)

