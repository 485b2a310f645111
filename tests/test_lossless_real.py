"""Every drafter's greedy output equals plain greedy decoding on the real embedded models."""
from __future__ import annotations

import pytest

from lossless import assert_lossless, truncated_copy
from prompts import PROMPTS
from selfspec.drafters.auto import AutoDrafter
from selfspec.drafters.draft_model import DraftModelDrafter
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig, shipped_config
from selfspec.drafters.ngram import NgramDrafter
from selfspec.drafters.quantized import QuantizedSelfDrafter
from selfspec.generation import generate

N_NEW = 20


def drafters(model):
    yield AutoDrafter.for_model(model)  # calibrated on this machine
    yield NgramDrafter()
    yield LayerSkipDrafter.for_model(model)  # the shipped config
    n = model.config.n_layers
    yield LayerSkipDrafter(SkipConfig(model=model.name, n_layers=n, attention=tuple(range(2, n - 1, 2)),
                                      mlp=tuple(range(3, n - 1, 3))), max_draft=4)
    yield DraftModelDrafter(truncated_copy(model, n // 2), max_draft=3, target=model)
    # precision + depth: int4 weights and one attention sub-layer skipped
    yield QuantizedSelfDrafter.for_model(model, SkipConfig(model=model.name, n_layers=n, attention=(n // 2,)),
                                         bits=4, max_draft=6)


def check_model(model, prompts, n_new=N_NEW):
    built = list(drafters(model))  # once: each keeps what it learnt across prompts, as in a server
    for prompt in prompts:
        plain = generate(model, prompt, max_new_tokens=n_new)
        for d in built:
            spec = generate(model, prompt, max_new_tokens=n_new, drafter=d)
            assert_lossless(plain.token_ids, spec.token_ids, f"{d.name} on {prompt[:30]!r}")
            s = spec.stats
            assert s.new_tokens == len(spec.token_ids) and s.accepted <= s.drafted


@pytest.mark.parametrize("half", [0, 1])
def test_smollm_every_drafter_lossless(smollm, half):
    """Ten prompts in two halves of five, each with its own drafters (learning across its
    prompts): the suite's longest test as two, so the test workers share it."""
    assert shipped_config("smollm2-135m") is not None
    check_model(smollm, PROMPTS[5 * half: 5 * half + 5])


@pytest.mark.slow
def test_gemma_every_drafter_lossless(gemma):
    check_model(gemma, PROMPTS, n_new=40)


def test_precision_self_draft_is_close_and_lossless(smollm):
    """int8 copies of SmolLM2's own weights draft; fp32 verifies. Teacher-forced over the plain
    output, the draft's greedy token agrees with the fp32 model almost everywhere (98.6% in the
    issue's probe) and its logits stay close; the output equals plain decoding."""
    import torch

    drafter = QuantizedSelfDrafter.for_model(smollm)
    assert drafter.config.draft_bits == 8 and len(drafter.skip) == 0
    prompt = PROMPTS[2]
    plain = generate(smollm, prompt, max_new_tokens=24)
    spec = generate(smollm, prompt, max_new_tokens=24, drafter=drafter)
    assert_lossless(plain.token_ids, spec.token_ids, "quantized int8")
    assert spec.stats.acceptance_rate > 0.8
    ids = torch.tensor(plain.prompt_ids + plain.token_ids)
    tr = smollm.transformer
    full = tr.forward(ids, 0, tr.new_cache(len(ids)))[len(plain.prompt_ids) - 1:]
    draft = drafter.draft_transformer(tr).forward(ids, 0, tr.new_cache(len(ids)))[len(plain.prompt_ids) - 1:]
    agree = float((draft.argmax(-1) == full.argmax(-1)).float().mean())
    diff = float((draft - full).abs().max())
    print(f"smollm2 int8 draft vs fp32: greedy agreement {agree:.1%}, max |logit diff| {diff:.3f}")
    assert agree >= 0.9 and diff < 0.05 * float(full.max() - full.min())
    assert LayerSkipDrafter.for_model(smollm, "int8").config.draft_bits == 8  # the shipped variant still loads
