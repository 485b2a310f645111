"""The speculative loop on tiny random models: adversarial drafters, stop tokens inside drafts,
cache state after accepts/rejects, the adaptive exit rule, and distributional losslessness."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lossless import truncated_copy
from selfspec.drafters.base import Draft
from selfspec.drafters.draft_model import DraftModelDrafter
from selfspec.drafters.layerskip import AdaptiveExit, LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import NgramDrafter, lookup_match
from selfspec.errors import DrafterError, SkipConfigError
from selfspec.generation import generate, stream
from selfspec.sampling import SamplingParams, presence_mask
from distributions import (N_SAMPLES, PROMPT, SAMPLING_CASES, ScriptedDrafter, _one_thread,  # noqa: F401
                           assert_draws_follow_q, exact_second_token, gemma3, llama, noise_floor, pair_tv, peaky,
                           second_token_samples, total_variation)
from tiny import tiny_model

@pytest.mark.parametrize("fixture", ["llama", "gemma3"])
def test_adversarial_drafters_are_lossless(fixture, request):
    model = request.getfixturevalue(fixture)
    plain = generate(model, PROMPT, max_new_tokens=30)
    assert plain.stats.rounds == 30 and plain.stats.mean_accepted_tokens == 1.0
    oracle = generate(model, PROMPT, max_new_tokens=30, drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 4))
    assert oracle.token_ids == plain.token_ids
    assert oracle.stats.acceptance_rate == 1.0 and oracle.stats.mean_accepted_tokens > 4.0
    garbage = generate(model, PROMPT, max_new_tokens=30,
                       drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 4, corrupt=True))
    assert garbage.token_ids == plain.token_ids
    assert garbage.stats.accepted == 0 and garbage.stats.drafted > 0
    mixed = generate(model, PROMPT, max_new_tokens=30,
                     drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 3, corrupt=None))
    assert mixed.token_ids == plain.token_ids
    assert 0 < mixed.stats.accepted < mixed.stats.drafted


def test_chunks_mark_which_tokens_came_from_the_draft(llama):
    """A drafter wrong on odd rounds and right on even ones: the prefill token and every odd
    round give one target token; every even round gives 3 accepted drafts + the bonus token."""
    plain = generate(llama, PROMPT, max_new_tokens=21)
    gen = stream(llama, PROMPT, max_new_tokens=21, drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 3, corrupt=None))
    chunks = list(gen)
    assert [t for c in chunks for t in c.token_ids] == plain.token_ids
    assert all(len(c.drafted) == len(c.token_ids) for c in chunks)
    expected = [[False]] + [[False] if r % 2 else [True, True, True, False] for r in range(1, 9)]
    assert [c.drafted for c in chunks] == expected
    assert sum(f for c in chunks for f in c.drafted) == gen.result.stats.accepted


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_max_new_tokens_is_exact_with_long_drafts(llama, n):
    plain = generate(llama, PROMPT, max_new_tokens=12)
    spec = generate(llama, PROMPT, max_new_tokens=n, drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 6))
    assert spec.token_ids == plain.token_ids[:n] and spec.finish_reason == "length"


def test_stop_token_inside_an_accepted_draft(llama):
    plain = generate(llama, PROMPT, max_new_tokens=20)
    j = 6
    stop_tok = plain.token_ids[j]
    first = plain.token_ids.index(stop_tok)  # the stop token may occur earlier too
    stopping = dataclasses.replace(llama, config=dataclasses.replace(llama.config, eos_token_ids=(stop_tok,)))
    spec = generate(stopping, PROMPT, max_new_tokens=20, drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 8))
    assert spec.token_ids == plain.token_ids[:first]  # nothing at or after the stop token
    assert spec.finish_reason == "stop"
    assert spec.stats.drafted >= first  # the stop token really was inside a draft


def test_cache_after_accepts_and_rejects_equals_plain(llama):
    plain = generate(llama, PROMPT, max_new_tokens=25)
    length = len(PROMPT) + 24  # every emitted token but the last is in the cache
    k_plain = llama._cache.k[:, :, :length].clone()
    v_plain = llama._cache.v[:, :, :length].clone()
    spec = generate(llama, PROMPT, max_new_tokens=25,
                    drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 3, corrupt=None))
    assert spec.token_ids == plain.token_ids
    cache = llama._cache
    assert cache.length >= length
    # Batched verification and one-token steps may differ in the last bits only.
    torch.testing.assert_close(cache.k[:, :, :length], k_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :length], v_plain, atol=1e-5, rtol=1e-5)


def test_layerskip_and_ngram_and_draft_model_lossless_on_tiny(gemma3):
    plain = generate(gemma3, PROMPT, max_new_tokens=30)
    n = gemma3.config.n_layers
    drafters = [
        LayerSkipDrafter(SkipConfig(model="gemma3", n_layers=n, attention=(1,), mlp=(2,)), max_draft=4),
        LayerSkipDrafter(SkipConfig(model="gemma3", n_layers=n), max_draft=3),  # skip nothing: all accepted
        NgramDrafter(ngram_max=2),
        LayerSkipDrafter(SkipConfig(model="gemma3", n_layers=n, attention=(2,), draft_bits=8), max_draft=4),
        DraftModelDrafter(truncated_copy(gemma3, 2), max_draft=3, target=gemma3),
    ]
    for d in drafters:
        spec = generate(gemma3, PROMPT, max_new_tokens=30, drafter=d)
        assert spec.token_ids == plain.token_ids, d.name
    # The drafter that skips nothing is the target itself: every draft must be accepted.
    full = generate(gemma3, PROMPT, max_new_tokens=30, drafter=drafters[1])
    assert full.stats.drafted > 0 and full.stats.acceptance_rate == 1.0
    with pytest.raises(SkipConfigError, match="draft_bits 5"):
        LayerSkipDrafter(SkipConfig(model="gemma3", n_layers=n, draft_bits=5))


def test_ngram_lookup_finds_latest_longest_match():
    t = torch.tensor([1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 2, 3])
    got, n = lookup_match(t, 3, 1, 3)
    assert got.tolist() == [7, 8, 4] and n == 2  # "2 3" matched, latest occurrence
    assert lookup_match(torch.tensor([5, 6, 7]), 3, 1, 4)[0].tolist() == []
    assert lookup_match(torch.tensor([1, 2, 1]), 2, 1, 4)[0].tolist() == [2, 1]


def test_adaptive_exit_update_hand_computed():
    ex = AdaptiveExit(gamma=0.6, alpha=0.9, epsilon=0.01, beta1=0.5, beta2=0.9)
    ex.update(accepted=1, proposed=4, hit_max=False)
    # AR~ = 0.5*0.9 + 0.5*0.25 = 0.575 <= 0.9 -> gamma~ = 0.61; gamma = 0.9*0.6 + 0.1*0.61 = 0.601
    assert ex.smoothed_ar == pytest.approx(0.575)
    assert ex.gamma == pytest.approx(0.601)
    ex.update(accepted=4, proposed=4, hit_max=True)  # stopped at max length: gamma left alone
    assert ex.gamma == pytest.approx(0.601) and ex.smoothed_ar == pytest.approx(0.575)
    ex.smoothed_ar = 0.95
    ex.update(accepted=4, proposed=4, hit_max=False)
    # AR~ = 0.5*0.95 + 0.5*1.0 = 0.975 > 0.9 -> gamma~ = 0.591; gamma = 0.9*0.601 + 0.1*0.591 = 0.600
    assert ex.smoothed_ar == pytest.approx(0.975)
    assert ex.gamma == pytest.approx(0.6)
    frozen = AdaptiveExit(gamma=0.5, adaptive=False)
    frozen.update(0, 4, False)
    assert frozen.gamma == 0.5


def test_skip_config_validation(tmp_path, llama):
    good = SkipConfig(model=llama.name, n_layers=llama.config.n_layers, attention=(1,), mlp=(2,))
    path = tmp_path / "skip.json"
    good.save(path)
    assert SkipConfig.load(path) == good
    LayerSkipDrafter.for_model(llama, path)
    other = SkipConfig(model="smollm2-135m", n_layers=30, attention=(3,))
    with pytest.raises(SkipConfigError, match="30 layers"):
        other.check_model(llama)
    with pytest.raises(SkipConfigError, match="not 'llama'"):
        SkipConfig(model="another", n_layers=llama.config.n_layers).check_model(llama)
    with pytest.raises(SkipConfigError, match="not 'llama'"):  # a recorded hash cannot match a folder
        SkipConfig(model="another", n_layers=llama.config.n_layers, model_sha256="ab" * 32).check_model(llama)
    bad = tmp_path / "bad.json"
    for text, needle in [("{", "not valid JSON"), (json.dumps({"model": "x"}), "n_layers"),
                         (json.dumps({"model": "llama", "n_layers": 4, "attention": [9], "mlp": []}), "outside"),
                         (json.dumps({"model": "llama", "n_layers": 4, "attention": "1", "mlp": []}), "list")]:
        bad.write_text(text)
        with pytest.raises(SkipConfigError, match=needle):
            SkipConfig.load(bad)
    with pytest.raises(SkipConfigError, match="cannot read"):
        SkipConfig.load(tmp_path / "missing.json")


def test_draft_model_with_other_vocabulary_is_refused(llama, tmp_path):
    other = tiny_model("qwen2", tmp_path)
    small_vocab = dataclasses.replace(other, tokenizer=type(other.tokenizer)(100))
    with pytest.raises(DrafterError, match="different tokenizer"):
        DraftModelDrafter(small_vocab, target=llama)


N_PAIRS = 1000  # each pair sample drafts afresh (two drafts: no memoised q): ~3 ms each


def _skip_drafter(model):
    return LayerSkipDrafter(SkipConfig(model=model.name, n_layers=model.config.n_layers, attention=(1,)),
                            max_draft=2, exit=AdaptiveExit(gamma=0.0, adaptive=False))


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_speculative_sampling_matches_target_distribution(peaky, case):
    params = SAMPLING_CASES[case]
    prompt = PROMPT[:5]
    p = exact_second_token(peaky, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    counts = second_token_samples(peaky, prompt, params, _skip_drafter(peaky), N_SAMPLES, memo_drafts=True)
    tv = total_variation(counts, p)
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


@pytest.mark.parametrize("case", ["temperature-1", "repetition-penalty"])
def test_layer_skip_draws_follow_its_q(peaky, case):
    """The replay above draws draft tokens from the q the drafter reported (memo_drafts): here the
    drafter's own draws are checked against that q."""
    assert_draws_follow_q(peaky, PROMPT[:5], SAMPLING_CASES[case], _skip_drafter(peaky))


def test_draw_check_catches_a_drafter_that_misreports_q(peaky):
    """assert_draws_follow_q fails for a drafter whose tokens do not come from the q it reports."""
    drafter = _skip_drafter(peaky)
    propose = drafter.propose

    def lying(ctx, max_tokens):
        draft = propose(ctx, max_tokens)
        return Draft(draft.tokens, torch.softmax(torch.log(draft.q_draft) * 0.5, -1))  # reports a flatter q

    drafter.propose = lying
    with pytest.raises(AssertionError, match="reported q"):
        assert_draws_follow_q(peaky, PROMPT[:5], SAMPLING_CASES["temperature-1"], drafter)


def test_distribution_check_catches_a_broken_residual(peaky, monkeypatch):
    """The same statistic must fail when rejection resamples from p instead of norm(max(0, p-q))."""
    import selfspec.verify as verify  # the decode loop's verify_chain calls verify.verify_sampled
    from selfspec.sampling import sample
    from selfspec.verify import Verdict

    def broken(draft_tokens, q_draft, p_target, generator):
        k = draft_tokens.numel()
        u = torch.rand(k, generator=generator).tolist()
        acc = 0
        for i in range(k):
            q = float(q_draft[i, draft_tokens[i]]) if q_draft is not None else 1.0
            if u[i] * q < float(p_target[i, draft_tokens[i]]):
                acc += 1
            else:
                break
        new = sample(p_target[acc: acc + 1], generator)  # bug: should be the residual
        return Verdict(acc, torch.cat((draft_tokens[:acc], new)))

    monkeypatch.setattr(verify, "verify_sampled", broken)
    params = SAMPLING_CASES["temperature-1"]
    prompt = PROMPT[:5]
    p = exact_second_token(peaky, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    counts = second_token_samples(peaky, prompt, params, _skip_drafter(peaky), N_SAMPLES, memo_drafts=True)
    tv = total_variation(counts, p)
    assert tv > 1.6 * floor + 0.01, f"a broken verifier went unnoticed: TV {tv:.4f}, floor {floor:.4f}"


PENALTY_PAIRS = SamplingParams(temperature=1.0, top_k=5, repetition_penalty=1.5)


def test_penalty_sees_earlier_drafts_of_the_round(peaky):
    """The (2nd, 3rd) tokens when both are drafts of one round (layer skip, two drafts): the
    target's row for the second draft must count the first in the penalty's history (and so must
    the drafter's q). The exact pair distribution applies the penalty to every earlier token."""
    tv, floor, impossible = pair_tv(peaky, PROMPT[:5], PENALTY_PAIRS, _skip_drafter(peaky), N_PAIRS, max_new_tokens=4)
    assert impossible == 0, f"{impossible} samples of pairs the target cannot produce"
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


@pytest.mark.slow  # a check of the check, ~4 s (10 on a busy machine)
def test_pair_check_catches_a_penalty_blind_to_earlier_drafts(peaky, monkeypatch):
    """The same check fails when the verify rows' penalty ignores the round's earlier drafts (the
    loop's target_choice loses them). Under top-k 5 the blind penalty moves the target's support:
    ~3% of the samples are pairs the true target cannot produce (the TV alone, ~0.09 against a
    threshold of ~0.13 for the ~100 pairs, would not notice)."""
    import selfspec.generation as loop

    def blind(history, drafts, vocab):
        return presence_mask(history, drafts[:0], vocab).expand(drafts.numel() + 1, -1)

    monkeypatch.setattr(loop, "presence_mask", blind)
    tv, floor, impossible = pair_tv(peaky, PROMPT[:5], PENALTY_PAIRS, _skip_drafter(peaky), N_PAIRS, max_new_tokens=4)
    assert impossible > 0 or tv > 1.6 * floor + 0.01, \
        f"a penalty blind to earlier drafts went unnoticed: TV {tv:.4f}, floor {floor:.4f}"


# ----------------------------------------------------------------- draft head over a vocab subset
@pytest.fixture
def fixed_ranking(monkeypatch):
    import selfspec.drafters.vocab as vocab

    monkeypatch.setattr(vocab, "frequency_ranking", lambda model: list(range(0, 160, 3)))


def test_subset_draft_head_lossless_and_restricted(gemma3, fixed_ranking):
    plain = generate(gemma3, PROMPT, max_new_tokens=30)
    d = LayerSkipDrafter(SkipConfig(model="gemma3", n_layers=gemma3.config.n_layers, attention=(1,)),
                         max_draft=4, draft_vocab=20)
    spec = generate(gemma3, PROMPT, max_new_tokens=30, drafter=d)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.extras["draft_vocab"] <= 20 + len(set(PROMPT)) + 1
    # Drafts come from the subset only, under sampling too, and q is zero outside it.
    proposals = []
    orig = d.propose

    def spy(ctx, max_tokens):
        draft = orig(ctx, max_tokens)
        proposals.append(draft)
        return draft

    d.propose = spy
    generate(gemma3, PROMPT, max_new_tokens=20, drafter=d, sampling=SamplingParams(temperature=1.0, seed=3))
    ids = d._head.ids if d._head is not None else None
    assert proposals and ids is not None
    for draft in proposals:
        assert set(draft.tokens.tolist()) <= set(ids.tolist())
        outside = torch.ones(160, dtype=torch.bool)
        outside[ids] = False
        assert float(draft.q_draft[:, outside].abs().sum()) == 0.0


def test_subset_draft_head_keeps_sampling_lossless(peaky, fixed_ranking):
    params = SAMPLING_CASES["temperature-1"]
    prompt = PROMPT[:5]
    p = exact_second_token(peaky, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    drafter = LayerSkipDrafter(SkipConfig(model=peaky.name, n_layers=peaky.config.n_layers, attention=(1,)),
                               max_draft=2, exit=AdaptiveExit(gamma=0.0, adaptive=False), draft_vocab=30)
    counts = second_token_samples(peaky, prompt, params, drafter, N_SAMPLES, memo_drafts=True)
    tv = total_variation(counts, p)
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


def test_int8_linear_round_trips_through_dense_weight():
    from selfspec.models.quant import Int8Linear, dense_weight

    w = torch.randn(24, 16)
    lin = Int8Linear(w)
    again = Int8Linear(dense_weight(lin))
    assert torch.equal(again.q, lin.q) and torch.equal(again.scale, lin.scale)
    x = torch.randn(3, 16)
    torch.testing.assert_close(lin(x), x @ w.T, atol=0.1, rtol=0.05)  # int8 is close, not equal


def test_subset_head_with_int8_draft(gemma3, fixed_ranking):
    plain = generate(gemma3, PROMPT, max_new_tokens=20)
    d = LayerSkipDrafter(SkipConfig(model="gemma3", n_layers=gemma3.config.n_layers, draft_bits=8),
                         max_draft=4, draft_vocab=20)
    spec = generate(gemma3, PROMPT, max_new_tokens=20, drafter=d)
    assert spec.token_ids == plain.token_ids and "draft_vocab" in spec.stats.extras


def test_stop_string_across_token_and_draft_boundaries(llama):
    from selfspec.generation import stream

    plain = generate(llama, PROMPT, max_new_tokens=20)
    j = 7
    words = plain.text.split(" ")  # FakeTokenizer: token i is the word "t{i}"
    stop = " ".join(words[j - 1: j + 1])[1:]  # spans two tokens, starts mid-word
    cut = plain.text.find(stop)
    assert cut > 0
    gen = stream(llama, PROMPT, max_new_tokens=20, stop=[stop],
                 drafter=ScriptedDrafter(len(PROMPT), plain.token_ids, 5))
    chunks = [c.text for c in gen]
    result = gen.result
    assert result.finish_reason == "stop"
    assert result.text == plain.text[:cut] == "".join(chunks)
    assert stop not in "".join(chunks)
    assert result.token_ids == plain.token_ids[: len(result.token_ids)]
    assert len(result.token_ids) <= j + 1  # nothing generated after the stop is returned
