"""DESIGN.md, "Losslessness, precisely": speculative greedy output must equal plain greedy output;
a divergence is allowed only at a near-tie of the plain model's two best logits."""
from __future__ import annotations

import dataclasses

import torch

NEAR_TIE = 1e-3  # logit gap under which batched and single-token kernels may pick different argmaxes


def assert_lossless(model, prompt_ids, plain_ids, spec_ids, label=""):
    if spec_ids == plain_ids:
        return
    j = next((i for i, (a, b) in enumerate(zip(plain_ids, spec_ids)) if a != b), min(len(plain_ids), len(spec_ids)))
    if j == min(len(plain_ids), len(spec_ids)):
        raise AssertionError(f"{label}: lengths differ ({len(plain_ids)} vs {len(spec_ids)}) with equal prefixes")
    cache = model.transformer.new_cache(len(prompt_ids) + j + 1)
    logits = model.transformer.forward(torch.tensor(list(prompt_ids) + plain_ids[:j]), 0, cache, last_only=True)[0]
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, (f"{label}: output differs from plain decoding at token {j} "
                            f"(plain {plain_ids[j]}, speculative {spec_ids[j]}) and the logit gap there is "
                            f"{gap:.4g} >= {NEAR_TIE}: not a near-tie, a bug")


def truncated_copy(model, n_layers: int):
    """The model's first `n_layers` layers + its head, sharing weights: a same-tokenizer draft model."""
    from selfspec.models.transformer import Transformer

    tr = model.transformer
    config = dataclasses.replace(model.config, n_layers=n_layers,
                                 sliding_window=model.config.sliding_window[:n_layers])
    small = Transformer(config, tr.embed, tr.layers[:n_layers], tr.final_norm, tr.lm_head, tr.rope_max)
    return dataclasses.replace(model, name=f"{model.name}-first{n_layers}", config=config, transformer=small,
                               _cache=None)
