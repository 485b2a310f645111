"""The fused native layer (selfspec/kernels/layer.c): one C call per decoder layer instead of
PyTorch operations around each native linear. It must compute the same model as the unfused
native path (it rounds its norms, SiLU/GELU differently in the last bits: logits within 1e-4,
greedy tokens equal), and be row-invariant itself: the exactness of every drafter on `--dtype
native` rests on it now."""
from __future__ import annotations

import pytest
import torch

from nativecheck import greedy
from selfspec import kernels
from selfspec.models import native

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no compiled kernel: {kernels.kernel_status()}")
pytestmark = needs_kernel


@pytest.fixture(scope="module")
def smollm_native(smollm_in):
    return smollm_in("native")


@pytest.fixture(scope="module")
def gemma_native():
    from selfspec.models.loading import load_model

    return load_model("gemma3-270m", dtype="native", ctx_size=1024)


class unfused:
    """The same model with its layers as PyTorch operations (what SELFSPEC_FUSED=0 loads)."""

    def __init__(self, model) -> None:
        self.tr = model.transformer

    def __enter__(self):
        self.saved, self.tr.fused = self.tr.fused, None

    def __exit__(self, *exc):
        self.tr.fused = self.saved


def _matches_unfused(model, prompt: str) -> float:
    assert model.transformer.fused is not None
    ids = model.encode(prompt)
    tok_f, log_f = greedy(model, ids, 32)
    with unfused(model):
        tok_u, log_u = greedy(model, ids, 32)
    delta = (log_f - log_u).abs().max().item()
    print(f"{model.name}: fused vs unfused over 32 greedy steps: max |Δlogit| = {delta:.3g}")
    assert delta <= 1e-4
    assert tok_f == tok_u
    return delta


def _row_invariant(model, ids: torch.Tensor, k: int = 9) -> None:
    tr = model.transformer
    cache = model.fresh_cache()
    start = len(ids) - k
    tr.forward(ids[:start], 0, cache)
    batch = tr.forward(ids[start:], start, cache)
    for i in range(k):
        cache.rollback(start + i)
        one = tr.forward(ids[start + i: start + i + 1], start + i, cache)
        assert torch.equal(one, batch[i: i + 1]), f"row {i}"


def test_smollm_fused_matches_unfused(smollm_native):
    from prompts import PROMPTS

    _matches_unfused(smollm_native, PROMPTS[0])


def test_gemma_fused_matches_unfused_and_is_row_invariant(gemma_native):
    """Gemma-3's q/k norms, post norms, GELU and (past 512 tokens) sliding-window layers."""
    m = gemma_native
    _matches_unfused(m, "The history of the printing press begins")
    window = max(m.config.sliding_window)
    ids = torch.tensor(m.encode("Once upon a time, " * (window // 4))[: window + 24])
    assert len(ids) == window + 24  # the 9 rows' windows start past the first keys: the local layers' limit binds
    _row_invariant(m, ids)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_smollm_native_row_invariant_both_paths(smollm_native, fused):
    m = smollm_native
    ids = torch.tensor(m.encode("The quick brown fox jumps over the lazy dog because"))
    if fused:
        _row_invariant(m, ids)
    else:
        with unfused(m):
            _row_invariant(m, ids)


def test_fused_qkv_bias_matches_unfused(smollm_native):
    """Qwen's q|k|v bias, added in C: a random bias on SmolLM2's layers, fused against unfused."""
    m = smollm_native
    tr = m.transformer
    saved = [layer.wqkv.bias for layer in tr.layers]
    g = torch.Generator().manual_seed(0)
    try:
        for layer in tr.layers:
            layer.wqkv.bias = torch.randn(layer.wqkv.out_features, generator=g) * 0.1
        with_bias = native.fused_layers(tr)
        ids = torch.tensor(m.encode("Name three colours."))
        tr.fused = with_bias
        a = tr.forward(ids, 0, m.fresh_cache())
        with unfused(m):
            b = tr.forward(ids, 0, m.fresh_cache())
        assert (a - b).abs().max().item() <= 1e-4
    finally:
        for layer, bias in zip(tr.layers, saved):
            layer.wqkv.bias = bias
        tr.fused = native.fused_layers(tr)


def test_fused_only_where_it_covers_the_model(smollm_native, monkeypatch):
    tr = smollm_native.transformer
    assert native.fused_layers(tr) is not None
    assert smollm_native.kernel.endswith("+fused-layers")  # what --json's kernel says
    monkeypatch.setenv(native.FUSED_ENV, "0")
    assert native.fused_layers(tr) is None
    monkeypatch.delenv(native.FUSED_ENV)
    layer = tr.layers[3]
    dense = torch.nn.Linear(1, 1)  # any non-native linear (a format the kernel lacks, dequantised)
    monkeypatch.setattr(layer, "wo", dense)
    assert native.fused_layers(tr) is None


def test_tree_drafts_on_the_fused_path_are_lossless(smollm_native):
    """A token tree's pass (its own RoPE positions and visibility) through the fused layers."""
    from lossless import assert_lossless
    from selfspec.drafters.factory import build_drafter
    from selfspec.generation import generate

    m = smollm_native
    assert m.transformer.fused is not None
    prompt = ("Repeat the list exactly twice.\nred apple, green pear, red cherry, green apple, red pear, "
              "green cherry, red grape.\n")
    plain = generate(m, prompt, max_new_tokens=40, ignore_eos=True)
    tr, trees = m.transformer, []
    forward = tr.forward

    def spy(*a, **kw):
        if kw.get("tree") is not None and len(set(kw["tree"].depth.tolist())) < kw["tree"].depth.numel():
            trees.append(kw["tree"])  # a real tree: two nodes at one depth
        return forward(*a, **kw)

    tr.forward = spy
    try:
        spec = generate(m, prompt, max_new_tokens=40, drafter=build_drafter("ngram", m, tree=4, tree_reduce=False),
                        ignore_eos=True)
    finally:
        del tr.forward
    assert_lossless(plain.token_ids, spec.token_ids, "smollm2 native ngram tree=4")
    assert trees, "no branching tree was verified"
