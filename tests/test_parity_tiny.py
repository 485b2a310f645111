"""Our decoder vs Hugging Face transformers on tiny random models of all five architectures.

Tolerance: fp32 logits must agree within ATOL = 1e-4 (absolute, rtol 0). Logits here are O(10)
(|logit| up to ~35 before Gemma-2's cap), so 1e-4 is ~1e-5 relative: room for the different
summation order of our fused QKV / grouped-query matmuls against HF's (measured differences are
0 to ~1e-6 on these models), but ~1000x smaller than what any real mistake does (a wrong RoPE base,
a missing "+1", a window off by one or a missing soft-cap changes logits by 1e-2 to 1).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from selfspec.generation import generate
from selfspec.models.loading import load_transformer
from tiny import ARCHS, WINDOW, build_tiny, one_thread, tiny_pair

ATOL = 1e-4
CTX = 64
PROMPT_LEN = 20  # > WINDOW: sliding windows are exercised


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(our Model, HF model) for one arch, built once per module."""
    return tiny_pair(request.param, tmp_path_factory.mktemp(request.param), ctx_size=CTX)


def _ids(n: int, seed: int = 0, vocab: int = 160) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids[None], use_cache=False).logits[0].float()


def _close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max |ours - HF| = {diff:.3g} > {atol}"


def test_tiny_model_shape_and_no_eos(pair):
    model, hf = pair
    c = model.config
    assert model.eos_token_ids == set(), "tiny models must have no eos: generations run to the limit"
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == (4, 64, 4, 2, 16)
    assert c.vocab_size == hf.config.vocab_size
    assert model.ctx_size == CTX
    if model.name in ("mistral", "gemma2", "gemma3"):
        assert WINDOW in c.sliding_window
    if model.name in ("gemma2", "gemma3"):
        assert 0 in c.sliding_window, "Gemma tiny models need global layers too"


def test_prompt_logits_match_hf(pair):
    model, hf = pair
    ids = _ids(PROMPT_LEN)
    ours = model.transformer.forward(ids, 0, model.transformer.new_cache(CTX))
    assert ours.dtype == torch.float32
    ref = _hf_logits(hf, ids)
    _close(ours, ref)
    last = model.transformer.forward(ids, 0, model.transformer.new_cache(CTX), last_only=True)
    assert last.shape == (1, model.config.vocab_size)
    _close(last, ref[-1:])


@torch.no_grad()
def test_hidden_states_match_hf(pair):
    """The trained drafters' hooks: an early exit after L layers gives HF's hidden state L, and
    return_hidden gives the final-normed state the LM head reads."""
    model, hf = pair
    tr = model.transformer
    ids = _ids(PROMPT_LEN, seed=3)
    ref = hf(ids[None], use_cache=False, output_hidden_states=True).hidden_states
    for layer in (1, 3):
        _close(tr.forward(ids, 0, tr.new_cache(CTX), exit_layer=layer), ref[layer][0])
    logits, hidden = tr.forward(ids, 0, tr.new_cache(CTX), return_hidden=True)
    _close(hidden, ref[-1][0])
    _close(tr.logits(hidden), logits, atol=0)
    _close(tr.logits(tr.final_hidden(tr.forward(ids, 0, tr.new_cache(CTX), exit_layer=4))), logits, atol=1e-5)


def test_incremental_decode_matches_hf(pair):
    """Prefill, then 8 single-token steps, then a T=3 chunk: each step's logits equal HF's logits
    at those positions of the full sequence."""
    model, hf = pair
    tr = model.transformer
    seq = _ids(PROMPT_LEN + 8 + 3, seed=1)
    ref = _hf_logits(hf, seq)
    cache = tr.new_cache(CTX)
    _close(tr.forward(seq[:PROMPT_LEN], 0, cache), ref[:PROMPT_LEN])
    assert cache.length == PROMPT_LEN
    for pos in range(PROMPT_LEN, PROMPT_LEN + 8):
        out = tr.forward(seq[pos:pos + 1], pos, cache)
        assert cache.length == pos + 1
        _close(out, ref[pos:pos + 1])
    start = PROMPT_LEN + 8
    _close(tr.forward(seq[start:start + 3], start, cache), ref[start:start + 3])
    assert cache.length == start + 3


def test_chunked_prefill_matches_hf(pair):
    """Uneven chunks, one longer than the window and starting mid-sequence (mask with offset)."""
    model, hf = pair
    tr = model.transformer
    seq = _ids(PROMPT_LEN + 4, seed=2)
    ref = _hf_logits(hf, seq)
    cache = tr.new_cache(CTX)
    for a, b in ((0, 5), (5, 5 + WINDOW + 5), (5 + WINDOW + 5, PROMPT_LEN + 4)):
        _close(tr.forward(seq[a:b], a, cache), ref[a:b])


def test_greedy_generation_matches_hf_generate(pair):
    model, hf = pair
    prompt = _ids(PROMPT_LEN, seed=3)
    result = generate(model, prompt.tolist(), max_new_tokens=32)
    with torch.no_grad():
        out = hf.generate(prompt[None], attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, PROMPT_LEN:].tolist()
    assert len(expected) == 32
    assert result.token_ids == expected
    assert result.finish_reason == "length"
    assert result.text == " ".join(f"t{i}" for i in expected)


def test_bf16_load_is_close_to_fp32(pair):
    """Sanity only: bf16 weights (8-bit mantissa) drift by a few hundredths over 4 layers."""
    model, hf = pair
    tr16 = load_transformer(model.path, torch.bfloat16, CTX)
    assert tr16.embed.dtype == torch.bfloat16
    assert tr16.layers[0].wqkv.weight.dtype == torch.bfloat16
    ids = _ids(PROMPT_LEN, seed=4)
    ours16 = tr16.forward(ids, 0, tr16.new_cache(CTX))
    assert ours16.dtype == torch.float32
    ref = _hf_logits(hf, ids)
    err = (ours16 - ref).abs()
    scale = ref.std().item()
    assert err.max().item() < 0.15 * scale, (err.max().item(), scale)
    assert err.mean().item() < 0.02 * scale, (err.mean().item(), scale)
    # The top token mostly survives bf16 rounding.
    agree = (ours16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.8


# ------------------------------------------------------------------------- config variants
def _prompt_and_decode_parity(tr, hf, n: int = PROMPT_LEN) -> None:
    seq = _ids(n + 4, seed=5)
    ref = _hf_logits(hf, seq)
    cache = tr.new_cache(CTX)
    _close(tr.forward(seq[:n], 0, cache), ref[:n])
    for pos in (n, n + 1):
        _close(tr.forward(seq[pos:pos + 1], pos, cache), ref[pos:pos + 1])
    _close(tr.forward(seq[n + 2:], n + 2, cache), ref[n + 2:])


VARIANTS = [
    pytest.param("llama", dict(num_key_value_heads=1), id="llama-mqa"),
    pytest.param("llama", dict(num_key_value_heads=4), id="llama-mha"),
    # Real Gemma/Qwen checkpoints have n_heads * head_dim != hidden (Gemma-2 2B: 8 x 256 vs 2304).
    pytest.param("gemma2", dict(head_dim=24), id="gemma2-head_dim24"),
    pytest.param("gemma3", dict(head_dim=24), id="gemma3-head_dim24"),
    pytest.param("qwen2", dict(head_dim=24, tie_word_embeddings=False), id="qwen2-head_dim24-untied"),
    pytest.param("mistral", dict(sliding_window=None), id="mistral-no-window"),
]


@pytest.mark.parametrize("arch, overrides", VARIANTS)
def test_config_variants_match_hf(arch, overrides, tmp_path):
    hf, folder = build_tiny(arch, tmp_path, **overrides)
    tr = load_transformer(folder, torch.float32, CTX)
    _prompt_and_decode_parity(tr, hf)


def _as_transformers4_config(folder) -> None:
    """Rewrite config.json the way transformers 4.x saved it (many hub checkpoints): `rope_theta`
    (+ Gemma-3's `rope_local_base_freq`) instead of `rope_parameters`; no `layer_types` (Gemma-3:
    `sliding_window_pattern`; Gemma-2: the implicit even-layers-slide pattern)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    if "full_attention" in rope:
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
        cfg["sliding_window_pattern"] = 2
    else:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg.pop("layer_types", None)
    path.write_text(json.dumps(cfg))


def test_transformers4_style_config_matches_hf(pair, tmp_path):
    model, hf = pair
    folder = tmp_path / "v4"
    shutil.copytree(model.path, folder)
    _as_transformers4_config(folder)
    tr = load_transformer(folder, torch.float32, CTX)
    assert tr.config == model.config
    _prompt_and_decode_parity(tr, hf)


# ------------------------------------------- optional biases (Llama attention_bias / mlp_bias)
def _parity_with_biases(arch: str, tmp_path, **overrides) -> None:
    """Biases on the output projection and the MLP are loaded, not silently dropped."""
    hf, folder = build_tiny(arch, tmp_path, **overrides)
    tr = load_transformer(folder, torch.float32, CTX)
    _prompt_and_decode_parity(tr, hf)


def test_llama_attention_bias_loaded(tmp_path):
    _parity_with_biases("llama", tmp_path, attention_bias=True)


def test_llama_mlp_bias_loaded(tmp_path):
    _parity_with_biases("llama", tmp_path, mlp_bias=True)
