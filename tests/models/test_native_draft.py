"""The precision self-draft of a GGUF-native model (selfspec/models/native_draft.py): its block
quantisers read back by the `gguf` package's dequantisers, the draft of a real Q8_0 model (SmolLM2
re-quantised by scripts/requantize_gguf.py) on Q4_K/Q4_0 copies and int8 activations, lossless
under verification by the file's blocks, and a plain error where no cheaper native form exists."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfspec.models import native_draft
from selfspec.models.native_draft import NoCheaperFormat, quantise_q4_0, quantise_q4_k, quantise_q8_0

needs_kernel = pytest.mark.skipif(native_draft._lib() is None, reason="no C compiler built the kernels")
ROOT = Path(__file__).resolve().parents[2]


def _read_back(blocks: torch.Tensor, fmt: str, rows: int, K: int) -> torch.Tensor:
    import gguf

    return torch.from_numpy(np.array(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[fmt]))
                            ).reshape(rows, K)


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 512, generator=g)
    w[1] += 3  # every sub-block positive: Q4_K's offset is 0 there
    w[2] -= 3  # every one negative
    w[3, :256] = 0  # an all-zero super-block (and its blocks): scales 0, no NaN
    w[4] *= 1e-3
    return w


@pytest.mark.parametrize("fmt,quantise,codes,bound", [("Q4_0", quantise_q4_0, 8, 1.0), ("Q8_0", quantise_q8_0, 127, 0.5)])
def test_block_quantisers_are_read_back_by_gguf(fmt, quantise, codes, bound):
    """Q4_0/Q8_0: every weight within `bound` steps of its value (step = the block's largest
    magnitude over `codes`; Q4_0 clips the side opposite its peak at 7 steps, hence 1; plus the
    f16 scale's rounding), and the bytes those of the gguf package's own quantiser except at
    rounding ties."""
    import gguf

    w = _weights()
    b = quantise(w)
    back = _read_back(b, fmt, *w.shape)
    assert torch.isfinite(back).all() and (back[3, :256] == 0).all()
    step = w.reshape(w.shape[0], -1, 32).abs().amax(dim=2, keepdim=True) / codes
    err = (back - w).reshape(w.shape[0], -1, 32).abs()
    assert (err <= (bound + 0.07) * step + 1e-9).all(), float((err / step.clamp(min=1e-30)).max())
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[fmt])
    assert b.shape == ref.shape and (b.numpy() == ref).mean() > 0.99


def test_q4_k_quantiser_is_read_back_by_gguf():
    """Q4_K (gguf has no quantiser for it): the layout gguf reads gives every weight within one
    code step of its value (sub-block scales are 6-bit, so the step is coarser than ideal), and a
    sub-block's offset puts its minimum on code 0."""
    w = _weights()
    back = _read_back(quantise_q4_k(w), "Q4_K", *w.shape)
    sub = w.reshape(w.shape[0], -1, 32)
    step = (sub.amax(dim=2).clamp(min=0) - sub.amin(dim=2).clamp(max=0)) / 15
    err = (back - w).reshape(w.shape[0], -1, 32).abs().amax(dim=2)
    assert torch.isfinite(back).all() and (back[3, :256] == 0).all()
    assert (err <= 1.05 * step + 1e-7).all(), float((err / step).max())
    # an error as big as the layout's would be: ~the sub-block range, not a fraction of a step
    assert float((back - w).pow(2).mean().sqrt()) < 0.1


@pytest.fixture(scope="module")
def smollm_q8_0(tmp_path_factory):
    """SmolLM2 with every matrix in Q8_0 (its embedding already is), loaded native."""
    from selfspec.models.loading import load_model

    path = tmp_path_factory.mktemp("q8_0") / "smollm2-q8_0.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "requantize_gguf.py"), "smollm2-135m", str(path),
                    "--type", "Q8_0"], check=True, capture_output=True)
    return load_model(str(path), dtype="native", ctx_size=512)


@needs_kernel
def test_draft_of_a_q8_0_model_copies_to_q4_and_stays_lossless(smollm_q8_0):
    from lossless import assert_lossless
    from prompts import PROMPTS
    from selfspec.drafters.auto import AutoDrafter
    from selfspec.drafters.quantized import QuantizedSelfDrafter
    from selfspec.generation import generate

    m = smollm_q8_0
    tr = m.transformer
    drafter = QuantizedSelfDrafter.for_model(m, max_draft=6)  # 4 bits: the default on native blocks
    view = drafter.draft_transformer(tr)
    plan = view.draft_plan
    n = m.config.n_layers
    # q|k|v (3 parts), o and gate|up (2 parts) have K = 576: Q4_0; down has K = 1536: Q4_K
    assert plan["copies"] == {"Q8_0->Q4_0": 6 * n, "Q8_0->Q4_K": n}, plan
    assert view.fused is not None and all(lin.q8 for layer in view.layers
                                          for lin in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    assert {t for layer in view.layers for t in layer.w_down.types} == {"Q4_K"}
    assert view.lm_head.parts[0] is tr.lm_head.parts[0]  # the Q8_0 head is shared, not copied
    assert 0 < plan["extra_bytes"] < 0.6 * sum(lin.nbytes for layer in tr.layers
                                               for lin in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    for prompt in PROMPTS[:2]:
        plain = generate(m, prompt, max_new_tokens=24)
        spec = generate(m, prompt, max_new_tokens=24, drafter=drafter)
        assert_lossless(plain.token_ids, spec.token_ids, f"native Q4 draft on {prompt[:30]!r}")
        assert spec.stats.drafted > 0 and spec.stats.accepted / spec.stats.drafted > 0.5, spec.stats
        assert spec.stats.extras["draft_extra_mb"] == round(plan["extra_bytes"] / 2**20, 1)
        assert spec.stats.extras["draft_copies"] == f"{6 * n} Q8_0->Q4_0, {n} Q8_0->Q4_K"
    assert "quantized" in [a.name for a in AutoDrafter.for_model(m).arms]


@needs_kernel
def test_no_cheaper_native_form_is_a_plain_error(tmp_path):
    """A native-q8 model whose blocks are all Q4_0: a 4-bit draft would compute what it computes.
    `--draft quantized` says so; auto leaves the precision draft out."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_native_memory import write_llama_gguf

    from selfspec.drafters.auto import AutoDrafter
    from selfspec.drafters.quantized import QuantizedSelfDrafter
    from selfspec.models.loading import Model, load_transformer
    from tiny import FakeTokenizer

    path = tmp_path / "q4_0.gguf"
    write_llama_gguf(path, n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, intermediate=128, vocab=96)

    def load(dtype):  # the file has no tokenizer: a fake one, as the tiny models have
        tr = load_transformer(path, native=True, q8=dtype == "native-q8", ctx_size=64)
        return Model(name="q4_0", path=path, config=tr.config, transformer=tr, tokenizer=FakeTokenizer(96),
                     dtype=dtype, ctx_size=64, load_seconds=0.0)

    model = load("native-q8")
    assert all(lin.q8 for lin in (model.transformer.layers[0].wqkv, model.transformer.lm_head))
    with pytest.raises(NoCheaperFormat, match="no cheaper native format.*Q4_0.*native-q8"):
        QuantizedSelfDrafter.for_model(model)
    assert "quantized" not in [a.name for a in AutoDrafter.for_model(model).arms]
    native = load("native")  # fp32 activations: int8 ones are cheaper
    view = QuantizedSelfDrafter.for_model(native).draft_transformer(native.transformer)
    assert view.draft_plan == {"copies": {}, "int8_activations": True, "extra_bytes": 0}
    assert view.layers[0].wqkv.parts[0] is native.transformer.layers[0].wqkv.parts[0]
    # a linear in a format the kernels lack is dequantised at load (native_fallback): the
    # draft shares it as it is
    from selfspec.models.transformer import make_linear

    tr = native.transformer
    dense = make_linear(tr.layers[1].w_down.dequantize())
    tr.layers[1] = dataclasses.replace(tr.layers[1], w_down=dense)
    tr.fused = None
    view = native_draft.draft_view(tr, 4)
    assert view.layers[1].w_down is dense and view.layers[0].w_down.q8


@needs_kernel
def test_draft_copies_are_kept_in_the_weight_cache(smollm_q8_0, monkeypatch, tmp_path):
    """The copies are computed once per file and rule: a second draft maps them from the weight
    cache, byte for byte the same blocks; with the weight cache off nothing is written."""
    from selfspec.models.quant import LINEARS

    tr = smollm_q8_0.transformer
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "off"))
    monkeypatch.setenv("SELFSPEC_WEIGHT_CACHE", "0")
    native_draft.draft_view(tr, 4)
    assert not list((tmp_path / "off").rglob("*.safetensors"))
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "on"))
    monkeypatch.delenv("SELFSPEC_WEIGHT_CACHE")
    assert native_draft._cached_copies(tr, 4) is None
    first = native_draft.draft_view(tr, 4)
    assert native_draft._cached_copies(tr, 4) is not None
    from selfspec import prune
    from selfspec.models import weightcache

    assert prune._weights(tmp_path / "on") == []  # a usable entry, which prune keeps
    # its own code fingerprint: editing the draft's quantisers leaves the model entries valid
    assert weightcache.code_fingerprint("native-draft4") != weightcache.code_fingerprint("fp32")
    assert native_draft._cache_key(tr, 4).fields()["code"] == weightcache.code_fingerprint("native-draft4")
    monkeypatch.setattr(native_draft, "QUANTISERS", {})  # a second build that quantised would fail
    second = native_draft.draft_view(tr, 4)
    for la, lb in zip(first.layers, second.layers):
        for n in LINEARS:
            a, b = getattr(la, n), getattr(lb, n)
            assert [p.type_name for p in a.parts] == [p.type_name for p in b.parts]
            assert all(torch.equal(pa.data, pb.data) for pa, pb in zip(a.parts, b.parts))
    ids = torch.tensor([1, 2, 3, 4])
    assert torch.equal(first.forward(ids, 0, first.new_cache(8)), second.forward(ids, 0, second.new_cache(8)))
