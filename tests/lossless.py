"""DESIGN.md, "Losslessness, precisely": greedy speculative output equals plain greedy output bit
for bit, in every dtype and kernel, with no exception (the forward pass is row-invariant:
tests/test_row_invariance.py). Token ids are compared with `==`, nothing else."""
from __future__ import annotations

import dataclasses


def assert_lossless(plain_ids, spec_ids, label=""):
    """`spec_ids == plain_ids`; otherwise fail naming the first differing index and both tokens."""
    plain_ids, spec_ids = list(plain_ids), list(spec_ids)
    if spec_ids == plain_ids:
        return
    n = min(len(plain_ids), len(spec_ids))
    j = next((i for i in range(n) if plain_ids[i] != spec_ids[i]), n)
    if j == n:
        raise AssertionError(f"{label}: lengths differ (plain {len(plain_ids)} tokens, speculative "
                             f"{len(spec_ids)}) with equal first {n} tokens")
    raise AssertionError(f"{label}: speculative output differs from plain greedy decoding at new token {j}: "
                         f"plain {plain_ids[j]}, speculative {spec_ids[j]} (after {plain_ids[max(0, j - 5): j]})")


def truncated_copy(model, n_layers: int):
    """The model's first `n_layers` layers + its head, sharing weights: a same-tokenizer draft model."""
    from selfspec.models.transformer import Transformer

    tr = model.transformer
    config = dataclasses.replace(model.config, n_layers=n_layers,
                                 sliding_window=model.config.sliding_window[:n_layers])
    small = Transformer(config, tr.embed, tr.layers[:n_layers], tr.final_norm, tr.lm_head, tr.rope_max)
    return dataclasses.replace(model, name=f"{model.name}-first{n_layers}", config=config, transformer=small,
                               _cache=None)
