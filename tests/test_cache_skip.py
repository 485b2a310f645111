"""KV-cache rollback and sub-layer skipping on tiny random models.

Rollback must be exact: decoding after a rollback runs the very same computations as decoding the
final sequence from scratch the same way, so the logits are compared bit for bit (torch.equal).
Skipping is checked against HF with the skipped sub-layer's output replaced by zeros (forward
hooks): a zero attention/MLP output, even through Gemma's post-norms (RMSNorm(0) = 0), is exactly
"the residual passes through unchanged". Those comparisons use the parity tolerance (1e-4, see
test_parity_tiny.py).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from selfspec.models.transformer import NO_SKIP, SkipSet
from tiny import one_thread, tiny_pair

ATOL = 1e-4
CTX = 48
ARCHS = ("llama", "gemma3")  # gemma3: sliding + global layers, qk-norm, sandwich norms
SENTINEL = 7.0

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    return tiny_pair(request.param, tmp_path_factory.mktemp(request.param), ctx_size=CTX)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return tiny_pair("mistral", tmp_path_factory.mktemp("mistral"), ctx_size=CTX)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max |ours - ref| = {diff:.3g} > {atol}"


@contextlib.contextmanager
def _hf_zeroed(hf, attention=(), mlp=(), last_only=False):
    """HF with the outputs of the named sub-layers replaced by zeros (all positions, or only the
    last one: a decode step that skips while earlier positions were computed in full)."""

    def zero(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if last_only:
            t[:, -1:] = 0
        else:
            t.zero_()
        return t

    def attn_hook(module, args, out):
        return (zero(out[0]), *out[1:])

    def mlp_hook(module, args, out):
        return zero(out)

    handles = [hf.model.layers[i].self_attn.register_forward_hook(attn_hook) for i in attention]
    handles += [hf.model.layers[i].mlp.register_forward_hook(mlp_hook) for i in mlp]
    try:
        yield hf
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids[None], use_cache=False).logits[0].float()


# ------------------------------------------------------------------------------------ rollback
def _decode_one_by_one(tr, cache, tokens: torch.Tensor, start: int) -> torch.Tensor:
    return torch.cat([tr.forward(tokens[j:j + 1], start + j, cache) for j in range(len(tokens))])


def _rollback_case(model, hf, prompt_len: int, n_decode: int, n_back: int) -> None:
    tr = model.transformer
    prompt, first, second = _ids(prompt_len, 10), _ids(n_decode, 11), _ids(n_back, 12)
    assert not torch.equal(first[-n_back:], second)
    keep = n_decode - n_back

    cache = tr.new_cache(CTX)
    tr.forward(prompt, 0, cache)
    _decode_one_by_one(tr, cache, first, prompt_len)
    assert cache.length == prompt_len + n_decode
    cache.rollback(prompt_len + keep)
    assert cache.length == prompt_len + keep
    after = _decode_one_by_one(tr, cache, second, prompt_len + keep)

    fresh = tr.new_cache(CTX)
    tr.forward(prompt, 0, fresh)
    _decode_one_by_one(tr, fresh, first[:keep], prompt_len)
    expected = _decode_one_by_one(tr, fresh, second, prompt_len + keep)
    assert torch.equal(after, expected)
    assert cache.length == fresh.length == prompt_len + n_decode

    # And both are right: HF over the final sequence.
    final = torch.cat((prompt, first[:keep], second))
    _close(after, _hf_logits(hf, final)[prompt_len + keep:])


def test_rollback_is_exact(pair):
    model, hf = pair
    # positions 0..14 with window 8: the gemma3 local layers slide during the decode.
    _rollback_case(model, hf, prompt_len=5, n_decode=10, n_back=4)


def test_rollback_across_window_mistral(mistral):
    model, hf = mistral
    # Roll back past the point where the window started sliding: positions 14..19 are redone.
    _rollback_case(model, hf, prompt_len=12, n_decode=8, n_back=6)


def test_overwrite_without_rollback_and_chunk_after_rollback(pair):
    """forward(start < cache.length) drops the positions after start; a multi-token chunk after
    a rollback reads no stale KV."""
    model, hf = pair
    tr = model.transformer
    seq = _ids(24, 20)
    stale = _ids(10, 21)
    cache = tr.new_cache(CTX)
    tr.forward(seq[:14], 0, cache)
    tr.forward(stale, 14, cache)  # positions 14..23 hold KV of other tokens
    assert cache.length == 24
    ref = _hf_logits(hf, seq)
    out = tr.forward(seq[14:15], 14, cache)  # no rollback: start < length
    assert cache.length == 15
    _close(out, ref[14:15])
    cache.rollback(15)
    _close(tr.forward(seq[15:24], 15, cache), ref[15:24])


def test_cache_bounds():
    from selfspec.kv_cache import KVCache
    from selfspec.errors import ContextOverflowError

    cache = KVCache(2, 2, 4, 8)
    cache.length = 5
    with pytest.raises(ValueError):
        cache.rollback(6)
    with pytest.raises(ValueError):
        cache.rollback(-1)
    with pytest.raises(ValueError):
        cache.check_room(6, 1)  # a gap after the valid positions
    with pytest.raises(ContextOverflowError):
        cache.check_room(5, 4)
    cache.check_room(5, 3)
    cache.rollback(2)
    assert cache.length == 2
    cache.reset()
    assert cache.length == 0


def test_forward_refuses_a_gap(pair):
    model, _ = pair
    tr = model.transformer
    cache = tr.new_cache(CTX)
    tr.forward(_ids(4, 30), 0, cache)
    with pytest.raises(ValueError):
        tr.forward(_ids(1, 31), 5, cache)


# ------------------------------------------------------------------------------------- skipping
def test_skip_nothing_is_the_full_model(pair):
    model, hf = pair
    tr = model.transformer
    ids = _ids(20, 40)
    full = tr.forward(ids, 0, tr.new_cache(CTX))
    empty = SkipSet.of(attention=[], mlp=[])
    assert len(empty) == 0
    c2 = tr.new_cache(CTX)
    same = tr.forward(ids, 0, c2, skip=empty)
    assert torch.equal(same, full)
    assert torch.equal(tr.forward(ids, 0, tr.new_cache(CTX), skip=NO_SKIP), full)
    _close(full, _hf_logits(hf, ids))
    # ... and it writes every layer's cache.
    assert all(c2.k[i, :, :20].abs().sum() > 0 for i in range(model.config.n_layers))


SKIPS = [
    pytest.param(dict(attention=[1]), id="attn1"),
    pytest.param(dict(mlp=[1]), id="mlp1"),
    pytest.param(dict(attention=[0, 2], mlp=[1, 3]), id="mixed"),
]


@pytest.mark.parametrize("skip", SKIPS)
def test_skip_prefill_matches_hf_with_zeroed_sublayers(pair, skip):
    model, hf = pair
    tr = model.transformer
    ids = _ids(20, 50)
    cache = tr.new_cache(CTX)
    ours = tr.forward(ids, 0, cache, skip=SkipSet.of(**skip))
    with _hf_zeroed(hf, **skip):
        ref = _hf_logits(hf, ids)
    _close(ours, ref)
    # The skip must matter: the full model differs.
    assert (ours - _hf_logits(hf, ids)).abs().max() > 1e-2
    # Skipped attention layers leave their cache untouched (zeros); every other layer writes it
    # (a skipped MLP does not stop its layer's attention from caching).
    skipped = set(skip.get("attention", ()))
    for i in range(model.config.n_layers):
        written = [t[i, :, :20].abs().sum().item() > 0 for t in (cache.k, cache.v)]
        assert written == [i not in skipped] * 2, (i, written)
    assert cache.length == 20


@pytest.mark.parametrize("skip", SKIPS)
def test_skip_decode_step_matches_hf_and_keeps_kv(pair, skip):
    """Full prefill, then one draft step with the skip set: its logits equal HF's with the
    sub-layers zeroed at the last position only; the skipped layers' KV slot is left as it was."""
    model, hf = pair
    tr = model.transformer
    seq = _ids(17, 60)
    P = 16
    cache = tr.new_cache(CTX)
    tr.forward(seq[:P], 0, cache)
    cache.k[:, :, P:] = SENTINEL
    cache.v[:, :, P:] = SENTINEL
    before_k, before_v = cache.k.clone(), cache.v.clone()
    ours = tr.forward(seq[P:], P, cache, skip=SkipSet.of(**skip))
    with _hf_zeroed(hf, last_only=True, **skip):
        ref = _hf_logits(hf, seq)[-1:]
    _close(ours, ref)
    assert cache.length == P + 1
    skipped = set(skip.get("attention", ()))
    for i in range(model.config.n_layers):
        # Positions before P are never touched by the step.
        assert torch.equal(cache.k[i, :, :P], before_k[i, :, :P])
        assert torch.equal(cache.v[i, :, :P], before_v[i, :, :P])
        untouched = torch.equal(cache.k[i, :, P], before_k[i, :, P]) and torch.equal(cache.v[i, :, P], before_v[i, :, P])
        assert untouched == (i in skipped), i
        assert torch.equal(cache.k[i, :, P + 1:], before_k[i, :, P + 1:])


def test_skip_is_an_argument_not_state(pair):
    """A skipping call leaves no trace in the model: the next full call equals HF."""
    model, hf = pair
    tr = model.transformer
    ids = _ids(12, 70)
    tr.forward(ids, 0, tr.new_cache(CTX), skip=SkipSet.of(attention=[0, 1], mlp=[2]))
    _close(tr.forward(ids, 0, tr.new_cache(CTX)), _hf_logits(hf, ids))

