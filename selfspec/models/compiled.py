"""`--compile`: the decoder's forward through `torch.compile` (inductor, C++ on CPU).

Decode, draft and verify each run a forward over a few tokens; each distinct token count would be
its own graph, so counts up to `MAX_BUCKET` are padded up to a power of two (1, 2, 4, 8, 16).
Padding goes after the real tokens: causal attention keeps it from touching their logits, and
its KV entries land at positions >= the new cache length, which are garbage by contract
(cache.py). Longer inputs (prefill) and inputs without room for the padding run eagerly. The
start position is a dynamic integer, so moving through the sequence does not recompile; each
skip set (a draft configuration) is its own graph.

Compiled code is cached by PyTorch under selfspec's cache folder (`inductor/`), so a second
process compiles faster. Where compiling fails (no C++ compiler, an op inductor cannot lower),
the model falls back to the eager forward and says so in its kernel string.
"""
from __future__ import annotations

import os
import time

import torch

from selfspec.kv_cache import KVCache
from selfspec.models.transformer import NO_SKIP, Linear, SkipSet, Transformer

MAX_BUCKET = 16


def bucket(n: int) -> int:
    """The padded token count of an n-token forward (n <= MAX_BUCKET)."""
    b = 1
    while b < n:
        b *= 2
    return b


def _use_selfspec_cache() -> None:
    from selfspec.paths import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


class CompiledTransformer:
    """Wraps a `Transformer`: same attributes, `forward` through torch.compile for short inputs.

    `compile_seconds` sums the time of the calls that compiled a new graph (first use of a bucket
    or skip set); `compile_status` is "compiled", or "compile-failed: <reason>" /
    "compile-skipped: <reason>" (then everything runs eagerly)."""

    def __init__(self, tr: Transformer) -> None:
        _use_selfspec_cache()
        self.eager = tr
        self.compile_status = "compiled"
        self.compile_seconds = 0.0
        self.graphs: set[tuple] = set()
        self._compiled = torch.compile(self._forward, dynamic=True, fullgraph=False)
        if tr.device.type == "cpu":
            # Each token-count bucket is its own inductor graph with its own generated reductions
            # (norms, rope, the linears' lowering), so the row of a k-token pass is not guaranteed
            # to be the bits of the 1-token pass; the eager forward is (selfspec/models/rows.py).
            self.compile_status = ("compile-skipped: compiled CPU graphs are not row-invariant, so greedy output "
                                   "could differ from plain decoding; running eagerly")
        elif tr.layers[0].wqkv.kernel == "onednn-prepacked":
            # Inductor cannot lower mkldnn._linear_pointwise on our prepacked weights (a
            # LoweringException after minutes of tracing, measured with torch 2.13).
            self.compile_status = "compile-skipped: fp32 oneDNN-prepacked linears have no inductor lowering; running eagerly"

    def __getattr__(self, name):
        return getattr(self.eager, name)

    def _forward(self, tokens, start, cache, skip, last_only, head):
        # The undecorated forward: inference_mode inside a compiled region breaks dispatch, so the
        # caller holds no_grad instead.
        return Transformer.forward.__wrapped__(self.eager, tokens, start, cache, skip=skip,
                                               last_only=last_only, head=head)

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, skip: SkipSet = NO_SKIP,
                last_only: bool = False, head: Linear | None = None, argmax: bool = False, **extra) -> torch.Tensor:
        if argmax and self.compile_status != "compiled":  # the eager decoder's own argmax (its greedy head)
            return self.eager.forward(tokens, start, cache, skip=skip, last_only=last_only, head=head, argmax=True,
                                      **extra)
        out = self._logits(tokens, start, cache, skip, last_only, head, **extra)
        if not argmax:
            return out
        if isinstance(out, tuple):  # return_hidden: (logits, hidden)
            return out[0].argmax(-1), out[1]
        return out.argmax(-1)

    def _logits(self, tokens, start, cache, skip, last_only, head, **extra) -> torch.Tensor:
        T = tokens.shape[0]
        padded = bucket(T) if T <= MAX_BUCKET else T
        if any(extra.values()) or extra.get("exit_layer") is not None:  # trained-drafter hooks: eager
            return self.eager.forward(tokens, start, cache, skip=skip, last_only=last_only, head=head, **extra)
        if self.compile_status != "compiled" or T > MAX_BUCKET or start + padded > cache.max_len:
            return self.eager.forward(tokens, start, cache, skip=skip, last_only=last_only, head=head)
        # A fresh tensor either way: a view's storage offset would be one more thing to guard on.
        tokens = torch.cat((tokens, tokens.new_zeros(padded - T))) if padded != T else tokens.clone()
        key = (padded, skip, last_only, head is None)
        fresh = key not in self.graphs
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                logits = self._compiled(tokens, start, cache, skip, last_only and padded == T, head)
        except Exception as e:  # an inductor/C++ failure: say so and stay correct
            self.compile_status = f"compile-failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            cache.rollback(min(cache.length, start))
            return self.eager.forward(tokens[:T], start, cache, skip=skip, last_only=last_only, head=head)
        if fresh:
            self.graphs.add(key)
            self.compile_seconds += time.perf_counter() - t0
        cache.wrote(start, T)  # the padding's KV is past the end: garbage by contract
        if padded != T:
            logits = logits[T - 1: T] if last_only else logits[:T]
        return logits


def compile_transformer(tr: Transformer) -> CompiledTransformer:
    return CompiledTransformer(tr)
