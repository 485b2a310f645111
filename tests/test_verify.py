import functools
import math
import random
from itertools import accumulate

import pytest
import torch

from selfspec.sampling import make_generator, sample
from selfspec.verify import Verdict, verify_greedy, verify_sampled


def tokens(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def one_hot(ids: list[int], vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


# ---------------------------------------------------------------- greedy


def test_greedy_accepts_everything_and_adds_the_bonus():
    verdict = verify_greedy(tokens(4, 2, 7), tokens(4, 2, 7, 9))
    assert verdict.accepted == 3
    assert verdict.tokens.tolist() == [4, 2, 7, 9]


def test_greedy_rejects_the_first_draft():
    verdict = verify_greedy(tokens(4, 2, 7), tokens(5, 2, 7, 9))
    assert verdict.accepted == 0
    assert verdict.tokens.tolist() == [5]


def test_greedy_stops_at_the_first_mismatch():
    # The later match at position 2 must not count: the target's token 3 differs from draft 1.
    verdict = verify_greedy(tokens(4, 2, 7), tokens(4, 3, 7, 9))
    assert verdict.accepted == 1
    assert verdict.tokens.tolist() == [4, 3]


def test_greedy_without_drafts_emits_the_targets_token():
    verdict = verify_greedy(torch.empty(0, dtype=torch.long), tokens(6))
    assert verdict.accepted == 0
    assert verdict.tokens.tolist() == [6]
    assert verdict.tokens.dtype == torch.long


def test_greedy_result_does_not_alias_the_input():
    target = tokens(1, 2)
    verdict = verify_greedy(tokens(1), target)
    verdict.tokens[0] = 99
    assert target.tolist() == [1, 2]


def test_greedy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="target_tokens"):
        verify_greedy(tokens(1, 2), tokens(1, 2))


def test_verdict_checks_its_length():
    with pytest.raises(ValueError, match="accepted"):
        Verdict(accepted=2, tokens=tokens(1, 2))


# ---------------------------------------------------------------- sampled: exact cases


def test_sampled_accepts_drafts_the_target_is_sure_of():
    vocab = 5
    p_target = one_hot([3, 1, 4], vocab)
    verdict = verify_sampled(tokens(3, 1), one_hot([3, 1], vocab), p_target, make_generator(0))
    assert verdict.accepted == 2
    assert verdict.tokens.tolist() == [3, 1, 4]


def test_sampled_rejects_a_draft_the_target_rules_out():
    vocab = 4
    q_draft = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.25] * 4])
    p_target = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25] * 4, [0.25] * 4])
    for seed in range(20):
        verdict = verify_sampled(tokens(1, 0), q_draft, p_target, make_generator(seed))
        assert verdict.accepted == 0
        assert verdict.tokens.tolist() == [2]


def test_sampled_deterministic_draft_rejection_excludes_the_draft():
    # q = one-hot(draft): the residual is p without the draft token.
    p_target = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    seen = set()
    for seed in range(40):
        verdict = verify_sampled(tokens(0), None, p_target, make_generator(seed))
        if verdict.accepted == 0:
            assert verdict.tokens.tolist() == [1]
        else:
            assert verdict.tokens.tolist() == [0, 0]
        seen.add(verdict.accepted)
    assert seen == {0, 1}


def test_sampled_treats_zero_draft_probability_as_rejection():
    # The draft token had q = 0, so it cannot have come from q; even a target that is certain of
    # it must not accept it through p/q = 1/0.
    q_draft = torch.tensor([[0.0, 1.0, 0.0]])
    p_target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    verdict = verify_sampled(tokens(0), q_draft, p_target, make_generator(0))
    assert verdict.accepted == 0
    assert verdict.tokens.tolist() == [0]  # the residual max(0, p - q) is all on token 0


def test_sampled_empty_residual_falls_back_to_the_target():
    # p == q, and the (impossible) draft has q = 0: it is rejected and max(0, p - q) is zero.
    dist = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    p_target = torch.cat([dist, dist])
    emitted = set()
    for seed in range(40):
        verdict = verify_sampled(tokens(0), dist, p_target, make_generator(seed))
        assert verdict.accepted == 0
        emitted.add(verdict.tokens.item())
    assert emitted == {1, 2}


@pytest.mark.parametrize("q_draft", [None, torch.empty(0, 3)])
def test_sampled_without_drafts_draws_from_the_target(q_draft):
    verdict = verify_sampled(
        torch.empty(0, dtype=torch.long), q_draft, one_hot([2], 3), make_generator(0)
    )
    assert verdict.accepted == 0
    assert verdict.tokens.tolist() == [2]


def test_sampled_is_reproducible_with_a_seed():
    gen = torch.Generator().manual_seed(0)
    q_draft = torch.softmax(torch.randn(4, 50, generator=gen), -1)
    p_target = torch.softmax(torch.randn(5, 50, generator=gen), -1)
    drafts = sample(q_draft, gen)

    def run(seed: int) -> list[list[int]]:
        g = make_generator(seed)
        return [verify_sampled(drafts, q_draft, p_target, g).tokens.tolist() for _ in range(30)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sampled_accepts_low_precision_distributions():
    p_target = one_hot([1, 2], 3).to(torch.bfloat16)
    q_draft = one_hot([1], 3).to(torch.float16)
    verdict = verify_sampled(tokens(1), q_draft, p_target, make_generator(0))
    assert verdict.accepted == 1
    assert verdict.tokens.tolist() == [1, 2]


def test_sampled_rejects_mismatched_shapes():
    gen = make_generator(0)
    with pytest.raises(ValueError, match="p_target"):
        verify_sampled(tokens(1, 2), None, torch.full((2, 4), 0.25), gen)
    with pytest.raises(ValueError, match="q_draft"):
        verify_sampled(tokens(1), torch.full((1, 3), 0.3), torch.full((2, 4), 0.25), gen)


# ---------------------------------------------------------------- sampled: losslessness
#
# A toy "language model" over 6 tokens in which the next-token distribution depends on the last
# token (state 0 is the start, state 1 + x follows token x). The target uses P, the drafter a
# deliberately different Q. We run the full loop (draft from Q, verify, repeat until enough
# tokens are out) many times and compare what came out with what sampling from P alone gives:
# P0[x0] for the first token and P0[x0] * P1[x0, x1] for the first two.

VOCAB = 6
P0 = [0.30, 0.25, 0.15, 0.12, 0.10, 0.08]
Q0 = [0.05, 0.10, 0.15, 0.20, 0.25, 0.25]  # TV(P0, Q0) = 0.4


def _toy_rows(first: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Mixed with the uniform distribution so every pair of tokens has an expected count well
    # above 5 at the sample sizes below, as the chi-square approximation needs.
    follow = 0.6 * torch.softmax(2 * torch.randn(VOCAB, VOCAB, generator=gen), -1) + 0.4 / VOCAB
    return torch.cat([torch.tensor([first]), follow])  # [1 + VOCAB, VOCAB]


P_ALL = _toy_rows(P0, seed=11)
Q_ALL = _toy_rows(Q0, seed=12)
Q_CUMULATIVE = [list(accumulate(row)) for row in Q_ALL.tolist()]
# A deterministic drafter proposes the draft model's most likely token.
Q_ARGMAX = Q_ALL.argmax(-1).tolist()

SAMPLES = 6_000


@functools.cache
def _round_inputs(drafts: tuple[int, ...], states: tuple[int, ...]):
    """Tensors for one verification round, cached: building them dominated the simulation."""
    return (
        torch.tensor(drafts, dtype=torch.long),
        Q_ALL[list(states[:-1])],  # [k, vocab]
        P_ALL[list(states)],  # [k+1, vocab]
    )


def simulate(verifier, *, k: int, length: int, deterministic: bool, seed: int) -> torch.Tensor:
    """Counts of the first `length` emitted tokens (flattened, [VOCAB ** length])."""
    draft_rng = random.Random(seed)
    generator = make_generator(seed)
    counts = [0] * VOCAB**length
    ids = range(VOCAB)
    for _ in range(SAMPLES):
        emitted: list[int] = []
        state = 0
        while len(emitted) < length:
            drafts, states = [], [state]
            for _ in range(k):
                if deterministic:
                    draft = Q_ARGMAX[states[-1]]
                else:
                    draft = draft_rng.choices(ids, cum_weights=Q_CUMULATIVE[states[-1]])[0]
                drafts.append(draft)
                states.append(1 + draft)
            draft_tokens, q_draft, p_target = _round_inputs(tuple(drafts), tuple(states))
            if deterministic:
                q_draft = None
            verdict = verifier(draft_tokens, q_draft, p_target, generator)
            emitted.extend(verdict.tokens.tolist())
            state = 1 + emitted[-1]
        index = 0
        for token in emitted[:length]:
            index = index * VOCAB + token
        counts[index] += 1
    return torch.tensor(counts, dtype=torch.float64)


def target_distribution(length: int) -> torch.Tensor:
    p = P_ALL.double()
    if length == 1:
        return p[0]
    return (p[0].unsqueeze(1) * p[1:]).flatten()  # [x0 * VOCAB + x1]


def statistics(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, float]:
    """Total variation, chi-square p-value and the TV tolerance for `counts` against `expected`.

    Under the null hypothesis each frequency has standard deviation sqrt(e (1 - e) / n), so the
    expected TV is about 0.5 * sum(sqrt(2 e (1 - e) / (pi n))) (mean absolute value of a normal).
    The tolerance is 3 times that: 0.033 for one token, 0.080 for a pair at n = 6000. The
    chi-square p-value is the sharper test; a correct verifier must pass both.
    """
    n = counts.sum()
    tv = 0.5 * (counts / n - expected).abs().sum().item()
    chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum()
    df = counts.numel() - 1
    p_value = torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), chi2 / 2).item()
    mean_tv = 0.5 * torch.sqrt(2 * expected * (1 - expected) / (math.pi * n)).sum().item()
    return tv, p_value, 3 * mean_tv


def assert_matches_target(counts: torch.Tensor, length: int) -> None:
    expected = target_distribution(length)
    tv, p_value, tolerance = statistics(counts, expected)
    assert p_value > 1e-3, (tv, p_value)
    assert tv < tolerance, (tv, tolerance)
    if length == 2:
        # The joint TV is loose with 36 cells; the marginals are held to the one-token tolerance.
        joint, expected_joint = counts.view(VOCAB, VOCAB), expected.view(VOCAB, VOCAB)
        for axis in (0, 1):
            tv, _, tolerance = statistics(joint.sum(axis), expected_joint.sum(axis))
            assert tv < tolerance, (axis, tv, tolerance)


def assert_detects_mismatch(counts: torch.Tensor, length: int) -> None:
    tv, p_value, tolerance = statistics(counts, target_distribution(length))
    assert p_value < 1e-9, (tv, p_value)
    assert tv > 2 * tolerance, (tv, tolerance)


def test_toy_distributions_really_differ():
    # Otherwise the losslessness tests below would pass with any verifier.
    assert 0.5 * (P_ALL - Q_ALL).abs().sum(-1).min() > 0.15


@pytest.mark.parametrize(
    "k, length, deterministic",
    [
        (1, 2, False),  # first token, correction after rejection, bonus after acceptance
        (2, 2, False),  # correction at the second position after accepting the first
        (2, 2, True),  # deterministic drafter: q_draft is None
    ],
)
def test_sampled_verification_is_lossless(k, length, deterministic):
    counts = simulate(verify_sampled, k=k, length=length, deterministic=deterministic, seed=k)
    assert_matches_target(counts.view(VOCAB, VOCAB).sum(1), 1)
    assert_matches_target(counts, length)


# Deliberately broken verifiers, to show the statistics above catch the usual mistakes.


def _accept_mask(draft_tokens, q_draft, p_target, generator) -> int:
    k = draft_tokens.numel()
    u = torch.rand(k, generator=generator)
    rows = torch.arange(k)
    q = torch.ones(k) if q_draft is None else q_draft[rows, draft_tokens]
    accept = u * q < p_target[rows, draft_tokens]
    return int(torch.cumprod(accept.int(), 0).sum())


def _finish(draft_tokens, accepted, row, generator) -> Verdict:
    new = sample(row.unsqueeze(0), generator)
    return Verdict(accepted, torch.cat([draft_tokens[:accepted], new]))


def broken_resample_from_target(draft_tokens, q_draft, p_target, generator) -> Verdict:
    """On rejection draws from p instead of norm(max(0, p - q))."""
    accepted = _accept_mask(draft_tokens, q_draft, p_target, generator)
    return _finish(draft_tokens, accepted, p_target[accepted], generator)


def broken_always_accept(draft_tokens, q_draft, p_target, generator) -> Verdict:
    k = draft_tokens.numel()
    return _finish(draft_tokens, k, p_target[k], generator)


def broken_bonus_from_last_draft_row(draft_tokens, q_draft, p_target, generator) -> Verdict:
    """Correct except that the bonus comes from p_target[k - 1] (an off-by-one)."""
    k = draft_tokens.numel()
    accepted = _accept_mask(draft_tokens, q_draft, p_target, generator)
    if accepted == k:
        return _finish(draft_tokens, k, p_target[k - 1], generator)
    if q_draft is None:
        q_row = one_hot([draft_tokens[accepted].item()], VOCAB)[0]
    else:
        q_row = q_draft[accepted]
    residual = (p_target[accepted] - q_row).clamp_min(0)
    return _finish(draft_tokens, accepted, residual, generator)


@pytest.mark.parametrize(
    "broken, first_token_right",
    [
        (broken_resample_from_target, False),
        (broken_always_accept, False),
        # Shares acceptance and residual with the real rule, so only the pair can reveal it; the
        # first token agreeing also shows the helper has no other mistake.
        (broken_bonus_from_last_draft_row, True),
    ],
)
def test_statistics_detect_a_broken_verifier(broken, first_token_right):
    counts = simulate(broken, k=1, length=2, deterministic=False, seed=1)
    first = counts.view(VOCAB, VOCAB).sum(1)
    if first_token_right:
        assert_matches_target(first, 1)
    else:
        assert_detects_mismatch(first, 1)
    assert_detects_mismatch(counts, 2)
