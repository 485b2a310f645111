"""The greedy token of a native LM head without computing every logit exactly.

Greedy decoding needs only the argmax of each row's logits, and the LM head is the largest
linear of a small model (the Qwen 0.5B's 145 MB Q8_0 head is 37% of the bytes a step reads,
Gemma-3's 178 MB 70%). `ExactArgmax` finds the argmax of the head's exact (`--dtype native`)
logits E in three steps:

1. A = the same head on activations rounded to int8 (the `native-q8` kernel: 1.5-1.8x faster
   per row on these heads, measured with scripts/native_gemv.py).
2. A bound with |E_r - A_r| <= B_r for every vocabulary row r, from Cauchy-Schwarz:
   B_r = ||w_r|| * (D + rel * (||x|| + D)), where ||w_r|| is the row's L2 norm (computed once,
   on first use, from the file's weights), D >= ||x_q8 - x|| (the int8 rounding moves each value
   of an activation block by at most half its step, amax / 254) and rel = (K + 256) 2^-20 covers the
   floating-point rounding of both kernels (each within a few times (K / 8 + 8) 2^-24 of
   Σ|w||x| <= ||w_r|| ||x||, bounds in the comments below, so rel holds them 16 times over).
3. L = max_r (A_r - B_r) is at most the largest exact logit, so every row with A_r + B_r < L
   has E_r < L: it cannot be the argmax, nor tie with it. The few rows left (on the registry
   models' quick suite: a median of 1-3, at most ~3000 of 151936 on the 1.5B's Q6_K head) are
   computed exactly by the same kernel that computes the full head (which rows share a call
   never changes an output's bits), and the first of their maxima is the token: the row the full
   head's argmax would have returned, ties to the lowest id included.

Rows whose activations or approximate logits are not finite take the full head. Only a head of
one part in an int8-capable format, without bias and without logit soft-capping (a monotone map
that may merge distinct logits into a tie), gets this path; the decoder falls back to the full
logits otherwise (`Transformer.greedy`)."""
from __future__ import annotations

import torch

from selfspec.models.native import Q8_FORMATS, NativeLinear, _lib

_CHUNK_ROWS = 8192  # rows dequantised at a time for the norms (K = 1536: 48 MB)
_STEP = 0.5 / 127 * (1 + 2 ** -10)  # int8 rounding: |x_q8 - x| <= amax / 254, with room for the float steps


def eligible(head, softcap: float | None) -> bool:
    return (isinstance(head, NativeLinear) and not head.q8 and head.bias is None and not softcap
            and len(head.parts) == 1 and head.types[0] in Q8_FORMATS)


def row_norms(head: NativeLinear) -> torch.Tensor:
    """An upper bound of each output row's L2 norm `[out]` (fp32), from the file's weights as the
    kernel dequantises them (selfspec_dequant_rows): the fp32 sum of squares is within
    (K + 2) 2^-24 of its value in any order, so the norm is scaled up by (1 + (K + 4) 2^-23)."""
    from selfspec import kernels

    part, m = head.parts[0], head.maps[0]
    lib = kernels.library()
    K = head.in_features
    out = torch.empty(head.out_features, dtype=torch.float32)
    buf = torch.empty(min(_CHUNK_ROWS, head.out_features), K, dtype=torch.float32)
    for r0 in range(0, head.out_features, _CHUNK_ROWS):
        n = min(_CHUNK_ROWS, head.out_features - r0)
        ids = (torch.arange(r0, r0 + n, dtype=torch.int64) if m is None else m[r0: r0 + n].to(torch.int64)).contiguous()
        if lib.selfspec_dequant_rows(part.fmt, part.data.data_ptr(), K, ids.data_ptr(), n, buf.data_ptr()) != 0:
            raise RuntimeError(f"the native kernel cannot read {part.type_name} rows")
        torch.linalg.vector_norm(buf[:n], dim=1, out=out[r0: r0 + n])
    return out.mul_(1 + (K + 4) * 2 ** -23)


class ExactArgmax:
    """`argmax(x)` = the full head's `(x @ W^T).argmax(-1)` bit for bit (module docstring)."""

    def __init__(self, head: NativeLinear) -> None:
        import ctypes

        self.head = head
        self.approx = NativeLinear(head.parts, None, head.maps, q8=True)
        # the activation blocks the int8 kernel quantises by (qgemm.c, quantise_rows)
        self.block = 256 if head.types[0] in ("Q4_K", "Q6_K") else 32
        self._norms: torch.Tensor | None = None  # row_norms, on the first call (norms)
        # the kernels' rounding against Σ|w||x|: the fp32 kernel's lane chains are K / 8 long plus
        # a tree of 3, and its K-quant path rounds activations to 24 bits (each value within
        # 1.004 2^-23 of its block's amax: <= 16.1 2^-23 ||w|| ||x|| over blocks of 256); the int8
        # kernel's chains are K / 32 long with two roundings per step. Terms that split a weight
        # (Q4_K's and Q4_1's offsets) are each at most three times the block's largest weight: all
        # of it stays well inside (K + 256) 2^-20.
        self.rel = (self.head.in_features + 256) * 2 ** -20
        # the exact pass: the head's kernel call on the candidate rows, read through a row map
        part = head.parts[0]
        self._ids = torch.empty(head.out_features, dtype=torch.int32)
        self._rows = (ctypes.c_int64 * 1)(0)
        self._args = ((ctypes.c_int * 1)(part.fmt), (ctypes.c_void_p * 1)(part.data.data_ptr()), self._rows,
                      (ctypes.c_void_p * 1)(self._ids.data_ptr()))
        self._composed = head.maps[0] is not None  # candidates through the head's own row map
        self.last_candidates = 0  # rows computed exactly by the last call (tests, profiling)
        # since load: calls that found the argmax here, their rows computed exactly, and calls
        # left to the full head (a non-finite or tiny row); `--json` reports a generation's share
        self.calls = self.exact_rows = self.full_head = 0

    @property
    def norms(self) -> torch.Tensor:
        """Each row's L2 norm, bounded above (row_norms): one pass over the head (16-78 ms on the
        registry models), made on first use, so a load that never decodes greedily skips it."""
        if self._norms is None:
            self._norms = row_norms(self.head)
        return self._norms

    def tally(self) -> tuple[int, int, int]:
        return self.calls, self.exact_rows, self.full_head

    def since(self, before: tuple[int, int, int]) -> dict:
        """What the calls since `tally()` returned `before` did (`--json`'s `greedy_head`)."""
        calls, rows, full = (now - then for now, then in zip(self.tally(), before))
        return {"passes": calls, "exact_rows_per_pass": round(rows / max(calls, 1), 1), "full_head_passes": full}

    def radius(self, x: torch.Tensor) -> torch.Tensor | None:
        """`[T]`: |exact - approx| <= norms[r] * radius[t] for rows x `[T, K]` (fp32, contiguous);
        None when a value is not finite or too small for the int8 kernel (qgemm.c)."""
        T, K = x.shape
        radius = torch.empty(T, dtype=torch.float32)
        if _lib().selfspec_argmax_radius(x.data_ptr(), T, K, self.block, _STEP, self.rel, radius.data_ptr()) != 0:
            return None
        return radius

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """[T] token ids for final-normed hidden states x `[T, K]`; None when a row is not finite
        (the caller computes the full logits)."""
        x = x.reshape(-1, self.head.in_features).to(device="cpu", dtype=torch.float32).contiguous()
        T, K = x.shape
        radius = self.radius(x)
        if radius is None:
            self.full_head += 1
            return None
        a = self.approx._apply(x)  # [T, vocab]
        lib = _lib()
        n = lib.selfspec_argmax_candidates(a.data_ptr(), self.norms.data_ptr(), radius.data_ptr(), T, a.shape[1],
                                           self._ids.data_ptr())
        if n <= 0:  # an approximate logit or its bound overflowed (0: impossible, the floor's row is kept)
            self.full_head += 1
            return None
        self.last_candidates = n
        self.calls += 1
        self.exact_rows += n
        ids = self._ids[:n].long()  # ascending: the rows that may hold some row's argmax
        # the full head's values at those rows, bit for bit (which rows share a call never
        # changes an output). Each row's argmax over them is its argmax over the vocabulary:
        # they include every row that may hold it (and other rows' candidates, rows of the
        # vocabulary too, which changes nothing)
        if self._composed:
            exact = self.head.select_rows(ids)._apply(x)
        else:
            exact = torch.empty(T, n, dtype=torch.float32)
            self._rows[0] = n
            if lib.selfspec_qgemm(1, *self._args, K, x.data_ptr(), T, exact.data_ptr()) != 0:
                raise RuntimeError(f"the native kernel rejected {self.head.types} weights")
        return ids[exact.argmax(-1)]
