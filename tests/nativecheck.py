"""`--dtype native` is the GGUF model itself: against the same file dequantised to fp32 it differs
only in summation order and, on Q4_K/Q6_K, in rounding activations to 24-bit fixed point per block
of 256 (docs/kernels.md). Shared by the native tests of every registry model."""
from __future__ import annotations

import torch

N_GREEDY = 32


def greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after `ids`, one forward per token, and the logits each step saw."""
    tr, cache = model.transformer, model.fresh_cache()
    logits = [tr.forward(torch.tensor(ids), 0, cache)[-1:]]
    toks = [int(logits[-1].argmax())]
    for i in range(n - 1):
        logits.append(tr.forward(torch.tensor(toks[-1:]), len(ids) + i, cache))
        toks.append(int(logits[-1].argmax()))
    return toks, torch.cat(logits)


def assert_native_matches_fp32(native, fp32, prompt: str, label: str) -> None:
    """Every tensor native (no fallback); over N_GREEDY greedy steps the logits within 1e-3 of the
    fp32 load's and the tokens equal."""
    assert native.load_info["native_fallback"] == []
    ids = fp32.encode(prompt)
    tok_n, log_n = greedy(native, ids, N_GREEDY)
    tok_f, log_f = greedy(fp32, ids, N_GREEDY)
    delta = (log_n - log_f).abs().max().item()
    print(f"{label} native vs fp32 over {N_GREEDY} greedy steps: max |Δlogit| = {delta:.3g}")
    assert delta <= 1e-3
    assert tok_n == tok_f
