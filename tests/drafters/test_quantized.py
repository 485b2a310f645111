"""Precision self-draft (`--draft quantized`): the model's own layers with int8/int4 weights draft,
the model as loaded verifies. Lossless greedy and sampled, the draft's logits close to the full
model's, its memory overhead within the stated bound, and clear errors for nonsense settings."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lossless import assert_lossless
from selfspec.drafters.auto import AutoDrafter
from selfspec.drafters.layerskip import AdaptiveExit, SkipConfig
from selfspec.drafters.quantized import QuantizedSelfDrafter
from selfspec.errors import InvalidParameterError, SkipConfigError
from selfspec.generation import generate
from selfspec.drafters.factory import build_drafter, parse_method
from selfspec.models.quant import LINEARS, draft_view, extra_weight_bytes, quantize_transformer, weight_bits
from selfspec.models.rows import make_row_invariant
from distributions import (N_SAMPLES, PROMPT, SAMPLING_CASES, exact_second_token, noise_floor,
                              second_token_samples, total_variation)
from tiny import one_thread, tiny_model

N_NEW = 40


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    return tiny_model(request.param, tmp_path_factory.mktemp(request.param), ctx_size=128)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("skip", [(), (1,)])
def test_greedy_output_equals_plain_decoding(tiny, bits, skip):
    plain = generate(tiny, PROMPT, max_new_tokens=N_NEW)
    config = SkipConfig(model=tiny.name, n_layers=tiny.config.n_layers, attention=skip)
    drafter = QuantizedSelfDrafter.for_model(tiny, config, bits=bits, max_draft=6,
                                             exit=AdaptiveExit(gamma=0.0, adaptive=False))
    spec = generate(tiny, PROMPT, max_new_tokens=N_NEW, drafter=drafter)
    assert_lossless(plain.token_ids, spec.token_ids, f"quantized int{bits} skip {skip}")
    assert spec.stats.drafted > 0 and spec.stats.rounds < N_NEW  # it really drafted, and it paid off
    extras = spec.stats.extras
    assert extras["draft_bits"] == bits and extras["draft_extra_mb"] > 0
    assert weight_bits(drafter.draft_transformer(tiny.transformer)) == bits


def test_draft_logits_close_to_the_full_model(tiny, capsys):
    """The draft is a different function of the context (that is allowed), but a close one:
    its logits stay within a few percent of the logit range, and int8 closer than int4. (Random
    Gaussian weights are the hard case for 4 bits; the real SmolLM2 is checked in
    test_lossless_real.py.)"""
    tr = tiny.transformer
    ids = torch.tensor(PROMPT * 3)
    full = tr.forward(ids, 0, tr.new_cache(64))
    span = float(full.max() - full.min())
    diffs = {}
    for bits in (8, 4):
        draft = draft_view(tr, bits).forward(ids, 0, tr.new_cache(64))
        diffs[bits] = float((draft - full).abs().max())
        agree = float((draft.argmax(-1) == full.argmax(-1)).float().mean())
        print(f"{tiny.name} int{bits} draft: max |logit diff| {diffs[bits]:.4f} "
              f"({diffs[bits] / span:.2%} of the logit range), greedy agreement {agree:.0%}")
        assert agree >= (0.8 if bits == 8 else 0.4)
    assert diffs[8] < 0.03 * span and diffs[4] < 0.25 * span
    assert diffs[8] < diffs[4]


def test_memory_overhead_within_the_stated_bound(tiny):
    """int8 ~ +25% of the fp32 weights, int4 ~ +12.5% (+ its group scales) for the layers; the LM
    head is int8 in both (+25% of its fp32 bytes)."""
    tr = tiny.transformer
    head = tr.lm_head.nbytes
    layers = sum(getattr(layer, n).nbytes for layer in tr.layers for n in LINEARS)
    for bits, layer_share in ((8, 0.25), (4, 0.125 + 4 / 32)):  # int4: bf16 scale + zero per 32 weights
        extra = extra_weight_bytes(draft_view(tr, bits), tr)
        bound = layer_share * layers + 0.25 * head
        bound *= 1.05  # per-channel int8 scales (bf16) and biases
        assert 0 < extra <= bound, f"int{bits}: {extra} bytes > bound {bound:.0f}"
    assert extra_weight_bytes(tr, tr) == 0


def test_sampling_with_a_quantized_draft_keeps_the_target_distribution(tmp_path_factory):
    """int4 weights and one attention sub-layer skipped (precision + depth): the draft's q differs
    from p, and the second token (the first drafted one) must still follow p."""
    peaky = tiny_model("llama", tmp_path_factory.mktemp("peaky"), ctx_size=64)
    params = SAMPLING_CASES["top-k"]
    prompt = PROMPT[:5]
    p = exact_second_token(peaky, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    config = SkipConfig(model=peaky.name, n_layers=peaky.config.n_layers, attention=(1,))
    drafter = QuantizedSelfDrafter.for_model(peaky, config, bits=4, max_draft=2,
                                             exit=AdaptiveExit(gamma=0.0, adaptive=False))
    counts = second_token_samples(peaky, prompt, params, drafter, N_SAMPLES, memo_drafts=True)
    tv = total_variation(counts, p)
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


def test_lossless_on_a_model_loaded_as_int8(tiny):
    """--dtype int8 --draft quantized --draft-bits 4: verification by the int8 model as loaded."""
    tr = quantize_transformer(tiny.transformer, 8)
    make_row_invariant(tr)  # new linears: their row policies, as load_model sets them
    q8 = dataclasses.replace(tiny, transformer=tr, dtype="int8", kernel=tr.kernel, _cache=None)
    plain = generate(q8, PROMPT, max_new_tokens=N_NEW)
    drafter = QuantizedSelfDrafter.for_model(q8, bits=4, exit=AdaptiveExit(gamma=0.0, adaptive=False))
    spec = generate(q8, PROMPT, max_new_tokens=N_NEW, drafter=drafter)
    assert_lossless(plain.token_ids, spec.token_ids, "int4 draft of an int8 model")
    with pytest.raises(InvalidParameterError, match="loaded as int8.*--draft-bits 4"):
        QuantizedSelfDrafter.for_model(q8, bits=8)


def test_bad_settings_are_clear_errors(tiny):
    with pytest.raises(InvalidParameterError, match="--draft-bits must be 8 or 4"):
        QuantizedSelfDrafter.for_model(tiny, bits=5)
    with pytest.raises(InvalidParameterError, match="--draft-bits is for --draft quantized"):
        build_drafter("ngram", tiny, draft_bits=4)
    other = SkipConfig(model="someone-else", n_layers=tiny.config.n_layers + 1)
    with pytest.raises(SkipConfigError, match="layers"):
        QuantizedSelfDrafter.for_model(tiny, other)
    with pytest.raises(InvalidParameterError, match="must be a number"):
        parse_method("quantized:bits=x")


def test_method_spec_and_build_drafter(tiny):
    spec = parse_method("quantized:bits=4")
    assert spec.kind == "quantized" and spec.options == {"draft_bits": 4}
    drafter = build_drafter("quantized", tiny, **spec.options)
    assert drafter.name == "quantized" and drafter.config.draft_bits == 4
    assert build_drafter("quantized", tiny).config.draft_bits == 8  # the default


def test_auto_has_a_precision_arm(tiny):
    auto = AutoDrafter.for_model(tiny)
    names = [a.name for a in auto.arms]
    assert "quantized" in names
    arm = auto.arms[names.index("quantized")]
    assert arm.drafter.config.draft_bits == 8
    # its own draft-exit state, not shared with another arm
    assert all(a.drafter.exit is not arm.drafter.exit for a in auto.arms if a is not arm and hasattr(a.drafter, "exit"))
    tr = quantize_transformer(tiny.transformer, 4)
    q4 = dataclasses.replace(tiny, transformer=tr, dtype="int4", kernel=tr.kernel, _cache=None)
    assert "quantized" not in [a.name for a in AutoDrafter.for_model(q4).arms]  # nothing cheaper to draft with
