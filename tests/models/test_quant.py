"""Weight-only int8/int4 models: the kernels against their own dequantised weights, quantised
models against fp32 (logit bounds, greedy agreement), and the speculative core's losslessness
relative to the quantised model as loaded (draft and verify share its weights)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lossless import assert_lossless
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import NgramDrafter
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.hardware import resolve_dtype
from selfspec.models.compiled import bucket
from selfspec.models.loading import load_transformer
from selfspec.models.quant import (Int4Linear, Int8Linear, dense_weight, int4_group,
                                   quantize_transformer, weight_bits)
from selfspec.models.rows import make_row_invariant
from distributions import ScriptedDrafter
from tiny import build_tiny, one_thread, tiny_model

PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8, 5, 17, 33]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def _quantized(model, bits: int, group_size: int = 32):
    tr = quantize_transformer(model.transformer, bits, group_size)
    make_row_invariant(tr)  # new linears: their row policies, as load_model sets them
    return dataclasses.replace(model, transformer=tr, dtype=f"int{bits}", kernel=tr.kernel, _cache=None)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    return tiny_model(request.param, tmp_path_factory.mktemp(request.param), ctx_size=128)


# ------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_computes_with_its_dequantised_weight(group_size):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=gen) / 16
    bias = torch.randn(96, generator=gen)
    lin = Int4Linear(w, bias, group_size)
    dq = dense_weight(lin)
    # Asymmetric 4-bit: each weight within half a step of its group's range / 15 (+ bf16 rounding).
    step = (w.reshape(96, -1, group_size).amax(-1) - w.reshape(96, -1, group_size).amin(-1)) / 15
    err = (dq - w).abs().reshape(96, -1, group_size).amax(-1)
    assert (err <= 0.5 * step * 1.02 + 1e-3).all()
    x = torch.randn(5, 256, generator=gen)
    ref = x.bfloat16().float() @ dq.t() + bias  # the kernel rounds activations to bf16
    torch.testing.assert_close(lin(x), ref, atol=2e-2, rtol=1e-2)
    again = Int4Linear(dq, bias, group_size)  # re-quantising the dequantised weight is exact
    assert torch.equal(dense_weight(again), dq)


def test_int4_groups_of_32_reproduce_4bit_gguf_blocks():
    """A Q4_1-style weight (q * d + m per block of 32, q in 0..15 with both ends used) comes back
    up to the bf16 rounding of scale and zero: what the fp32 dequant of a 4-bit GGUF holds."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 128), generator=gen).float()
    q[:, ::32], q[:, 1::32] = 0.0, 15.0
    d = torch.rand(64, 4, 1, generator=gen) * 0.01 + 0.001
    m = -torch.rand(64, 4, 1, generator=gen) * 0.1
    w = (q.reshape(64, 4, 32) * d + m).reshape(64, 128)
    dq = dense_weight(Int4Linear(w, None, 32))
    err = (dq - w).abs().reshape(64, 4, 32).amax(-1, keepdim=True)  # [64, 4, 1]
    # Only the kernel's bf16 scale and zero point (unit roundoff 2^-8 each) stand between
    # the two: |q - 8| <= 8 steps of the scale's error plus the zero point's.
    bound = 2.0 ** -8 * (8 * d + (m + 8 * d).abs()) * 1.01
    assert (err <= bound).all(), (err - bound).max()


def test_int4_group_falls_back_to_a_divisor():
    assert int4_group(576, 128) == 64 and int4_group(1536, 128) == 128 and int4_group(576, 32) == 32
    with pytest.raises(InvalidParameterError):
        int4_group(100, 32)
    with pytest.raises(InvalidParameterError):
        Int4Linear(torch.randn(8, 64), None, 48)


def test_resolve_dtype_names_the_weight_only_dtypes():
    assert resolve_dtype("int8") == (torch.float32, "int8")
    assert resolve_dtype("int4") == (torch.float32, "int4")
    with pytest.raises(InvalidParameterError, match="int4"):
        resolve_dtype("int3")


def test_verify_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]


# ------------------------------------------------------------------------------ tiny models
def test_load_with_weight_bits_quantises_every_linear(tmp_path):
    _, folder = build_tiny("qwen2", tmp_path)  # tied head and qkv biases
    for bits, cls in ((8, Int8Linear), (4, Int4Linear)):
        tr = load_transformer(folder, torch.float32, 64, weight_bits=bits)
        assert weight_bits(tr) == bits
        for layer in tr.layers:
            assert all(isinstance(getattr(layer, n), cls) for n in ("wqkv", "wo", "w_gate_up", "w_down"))
            assert layer.wqkv.bias is not None
        assert isinstance(tr.lm_head, Int8Linear) and tr.embed.dtype == torch.float32  # int8 head under int4 too
        assert tr.kernel.startswith("int8-weight-only" if bits == 8 else "int4-weight-only-g32")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_tiny_model_stays_close_to_fp32(tiny, bits):
    q = _quantized(tiny, bits)
    seq = torch.tensor(PROMPT + generate(tiny, PROMPT, max_new_tokens=24).token_ids)
    ref = tiny.transformer.forward(seq, 0, tiny.transformer.new_cache(len(seq)))
    got = q.transformer.forward(seq, 0, q.transformer.new_cache(len(seq)))
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # Random weights are harder on 4 bits than trained ones (no outliers to spare); bounds from
    # a measurement with margin: int8 rel <= ~0.02, int4 <= ~0.25.
    assert rel < (0.05 if bits == 8 else 0.4), rel
    assert agree >= (0.9 if bits == 8 else 0.6), agree
    assert not torch.equal(got, ref)  # really quantised


@pytest.mark.parametrize("bits", [8, 4])
def test_speculation_is_lossless_on_quantised_weights(tiny, bits):
    q = _quantized(tiny, bits)
    plain = generate(q, PROMPT, max_new_tokens=30)
    assert plain.stats.rounds == 30
    for drafter in (ScriptedDrafter(len(PROMPT), plain.token_ids, 4),
                    ScriptedDrafter(len(PROMPT), plain.token_ids, 4, corrupt=True),
                    ScriptedDrafter(len(PROMPT), plain.token_ids, 3, corrupt=None),
                    NgramDrafter(max_draft=5),
                    _layer_skip(q, attention=[1], mlp=[2]),
                    _layer_skip(q, attention=[], mlp=[], draft_bits=8)):
        spec = generate(q, PROMPT, max_new_tokens=30, drafter=drafter)
        assert_lossless(plain.token_ids, spec.token_ids, label=f"int{bits} {drafter.name}")
        assert spec.stats.drafted > 0 or drafter.name == "ngram"


def _layer_skip(model, attention, mlp, draft_bits=None):
    config = SkipConfig(model=model.name, n_layers=model.config.n_layers, attention=tuple(attention),
                        mlp=tuple(mlp), draft_bits=draft_bits)
    return LayerSkipDrafter(config, max_draft=4)


def test_precision_self_draft_is_a_no_op_on_an_int8_model(tiny):
    q = _quantized(tiny, 8)
    drafter = _layer_skip(q, [], [], draft_bits=8)
    assert drafter.draft_transformer(q.transformer) is q.transformer
    assert drafter.draft_transformer(_quantized(tiny, 4).transformer) is not None
    fp32_draft = drafter.draft_transformer(tiny.transformer)
    assert weight_bits(fp32_draft) == 8  # on a float model it still drafts in int8


# ------------------------------------------------------------------------------- SmolLM2
@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_smollm_agrees_with_fp32(smollm, bits):
    """Teacher-forced over fp32 greedy continuations of 3 prompts: argmax agreement and the
    median over positions of the largest logit difference."""
    from prompts import PROMPTS

    q = _quantized(smollm, bits)
    agree, diffs = [], []
    for prompt in PROMPTS[:3]:
        ids = smollm.encode(prompt)
        seq = torch.tensor(ids + generate(smollm, ids, max_new_tokens=32, ignore_eos=True).token_ids)
        ref = smollm.transformer.forward(seq, 0, smollm.transformer.new_cache(len(seq)))[len(ids) - 1: -1]
        got = q.transformer.forward(seq, 0, q.transformer.new_cache(len(seq)))[len(ids) - 1: -1]
        agree.append((got.argmax(-1) == ref.argmax(-1)).float().mean().item())
        diffs.append((got - ref).abs().amax(-1).median().item())
    # Measured over 8 prompts x 48 tokens: int8 95.6% (median diff 0.94), int4 97.4% (0.58); an
    # int4 LM head would give 86.7% (3.2), groups of 64 80.7% (6.6): both fail here.
    assert sum(agree) / len(agree) >= 0.9, agree
    assert max(diffs) < (2.0 if bits == 8 else 1.5), diffs
    # Speculation on the quantised model is lossless relative to it.
    ids = smollm.encode(PROMPTS[2])
    plain = generate(q, ids, max_new_tokens=24, ignore_eos=True)
    spec = generate(q, ids, max_new_tokens=24, ignore_eos=True, drafter=NgramDrafter())
    assert_lossless(plain.token_ids, spec.token_ids, label=f"smollm int{bits} ngram")
