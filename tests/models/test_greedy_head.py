"""The greedy head (selfspec/models/greedy_head.py): the argmax of a native LM head's exact logits
from an int8-activation pass, a Cauchy-Schwarz bound and the exact values of the few rows left.
It must give the full head's argmax bit for bit, ties to the lowest id included."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfspec.models import greedy_head, native
from test_native import linear_of, needs_kernel, random_blocks

ROWS, K = 300, 512


def _head(tname: str, seed: int = 0, copy: tuple[int, int] = (200, 7)):
    raw, t = random_blocks(tname, ROWS, K, np.random.default_rng(seed))
    raw = raw.copy()
    raw[copy[0]] = raw[copy[1]]  # identical rows: identical logits, a tie the lower id wins
    return linear_of(raw, t, ROWS, K)


def _activations(head, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = head.dequantize()
    x = torch.randn(12, K, generator=g)
    x[0] = (w[7] - w[7].mean()) * 3  # peaked near the tied rows 7 and 200
    x[1] = w[3] - w[3].mean()
    x[2] *= 1e-30  # tiny, and huge values
    x[3] *= 1e20
    x[4, 5] = 1e4  # one outlier: its block's int8 step is coarse
    x[5] = w[40] + 1e-3 * x[5]  # near-ties: a row and its neighbours in the direction of one row
    x[6] = w[40] + w[41]
    x[7] = 0.0  # every logit 0: the lowest id
    # the int8 rounding at its worst against row 5: a step of 1 (amax 127 in every block) and
    # every value 0.49 off an integer, towards row 5's sign: the error is ~0.8 of the bound
    x[8] = torch.randint(-100, 100, (K,), generator=g).float() + 0.49 * torch.sign(w[5])
    x[8, ::32] = 127.0
    return x


@needs_kernel
@pytest.mark.parametrize("tname", native.Q8_FORMATS)
def test_bound_holds_and_argmax_is_the_full_heads(tname):
    head = _head(tname)
    g = greedy_head.ExactArgmax(head)
    x = _activations(head)
    exact = head(x)
    assert torch.equal(g.argmax(x), exact.argmax(-1))
    assert int(g.argmax(x[7:8])) == 0  # every logit 0
    # an exact tie at the top: the row above copied below it, and the lower id wins
    top = int(exact[1].argmax())
    tied = _head(tname, copy=(top // 2, top)) if top else None
    if tied is not None:
        assert int(greedy_head.ExactArgmax(tied).argmax(x[1:2])) == top // 2 == int(tied(x[1:2]).argmax())
    # the bound itself, row by row: |exact - approx| <= norms * radius
    approx = g.approx(x)
    err = (exact.double() - approx.double()).abs()
    bound = g.norms[None, :].double() * g.radius(x)[:, None].double()
    assert float((bound - err).min()) >= 0, f"the bound fails by {-float((bound - err).min()):.3g}"
    assert float(err[8, 5] / bound[8, 5]) > 0.5  # and is not loose where the rounding lines up
    # and it prunes: a peaked row leaves a few candidates, not the vocabulary (here at least the
    # two identical rows)
    g.argmax(x[:1])
    assert g.last_candidates < ROWS // 4, g.last_candidates
    # the norms bound each row's from above, and not by much
    w = head.dequantize().double()
    ratio = g.norms.double() / w.norm(dim=1)
    assert float(ratio.min()) >= 1 and float(ratio.max()) < 1 + 1e-3


@needs_kernel
def test_row_order_of_a_call_does_not_matter():
    """Each row of a T-row call is that row's own argmax (the candidates are a union over rows)."""
    head = _head("Q8_0", seed=2)
    g = greedy_head.ExactArgmax(head)
    x = _activations(head, seed=2)
    together = g.argmax(x)
    alone = torch.stack([g.argmax(x[i: i + 1])[0] for i in range(x.shape[0])])
    assert torch.equal(together, alone)


@needs_kernel
def test_non_finite_or_subnormal_rows_take_the_full_head():
    head = _head("Q4_K")
    g = greedy_head.ExactArgmax(head)
    x = torch.randn(2, K)
    for bad in (math.nan, math.inf, 1e-38):
        y = x.clone()
        y[1, 3] = bad
        if bad == 1e-38:  # a row of tiny values: 127 / amax would overflow in the int8 kernel
            y[1] = 0
            y[1, :32] = bad
        assert g.argmax(y) is None, bad


@needs_kernel
def test_only_plain_native_heads_are_eligible():
    raw, t = random_blocks("Q8_0", 16, 64, np.random.default_rng(0))
    assert greedy_head.eligible(linear_of(raw, t, 16, 64), None)
    assert not greedy_head.eligible(linear_of(raw, t, 16, 64), 30.0)  # soft-capping may merge logits
    assert not greedy_head.eligible(linear_of(raw, t, 16, 64, q8=True), None)  # native-q8: already the int8 pass
    raw, t = random_blocks("F16", 16, 64, np.random.default_rng(0))
    assert not greedy_head.eligible(linear_of(raw, t, 16, 64), None)


# ------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smollm_native(smollm_in):
    return smollm_in("native")


@needs_kernel
def test_smollm_greedy_head_equals_full_argmax(smollm_native):
    from prompts import PROMPTS

    tr = smollm_native.transformer
    assert tr.argmax_head is not None  # a Q8_0 tied head: eligible
    ids = torch.tensor(smollm_native.encode(" ".join(PROMPTS[:3])))
    _, hidden = tr.forward(ids, 0, smollm_native.fresh_cache(), return_hidden=True)
    full = tr.logits(hidden).argmax(-1)
    counts = []
    for T in (1, 9):
        for i in range(0, hidden.shape[0] - T, 5):
            assert torch.equal(tr.greedy(hidden[i: i + T]), full[i: i + T]), (T, i)
            counts.append(tr.argmax_head.last_candidates)
    # rows computed exactly: typically tens, never more than a tenth of the vocabulary
    assert sorted(counts)[len(counts) // 2] < tr.config.vocab_size // 100, counts
    assert max(counts) < tr.config.vocab_size // 10, counts


@needs_kernel
def test_smollm_generation_is_the_same_without_the_greedy_head(smollm_native, monkeypatch):
    from lossless import assert_lossless
    from prompts import PROMPTS
    from selfspec.drafters.ngram import NgramDrafter
    from selfspec.generation import generate

    tr = smollm_native.transformer
    calls = []
    real = tr.argmax_head.argmax
    monkeypatch.setattr(tr.argmax_head, "argmax", lambda x: calls.append(x.shape[0]) or real(x))
    with_head = [generate(smollm_native, p, max_new_tokens=24, drafter=d).token_ids
                 for p in PROMPTS[:2] for d in (None, NgramDrafter())]
    assert calls and max(calls) > 1  # plain steps and verify passes both went through it
    said = generate(smollm_native, PROMPTS[0], max_new_tokens=8).stats.extras["greedy_head"]
    assert said["passes"] == 8 and said["full_head_passes"] == 0 and 1 <= said["exact_rows_per_pass"] < 500, said
    monkeypatch.setattr(tr, "argmax_head", None)
    without = [generate(smollm_native, p, max_new_tokens=24, drafter=d).token_ids
               for p in PROMPTS[:2] for d in (None, NgramDrafter())]
    for a, b in zip(with_head, without):
        assert_lossless(b, a, "greedy head against the full logits")
