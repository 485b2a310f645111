import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfspec.errors import InvalidParameterError
from selfspec.sampling import (
    SamplingParams,
    greedy_tokens,
    make_generator,
    presence_mask,
    probs_from_logits,
    process_logits,
    sample,
)

INF = math.inf


def logits_of(probs: list[float]) -> torch.Tensor:
    """[1, V] logits whose softmax is `probs`."""
    return torch.tensor([probs], dtype=torch.float64).log().float()


def kept(processed: torch.Tensor) -> list[int]:
    """Token ids of row 0 that survived filtering."""
    return torch.isfinite(processed[0]).nonzero().flatten().tolist()


# ---------------------------------------------------------------- parameters


def test_defaults_are_greedy_and_valid():
    params = SamplingParams()
    assert params.greedy
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "0.5"),
        ("temperature", None),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", math.nan),
        ("top_p", "high"),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
        ("top_k", "5"),
        ("min_p", -0.1),
        ("min_p", 1.0),
        ("min_p", math.nan),
        ("min_p", [0.1]),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", "1.1"),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("seed", False),
        ("seed", "42"),
    ],
)
def test_invalid_value_names_the_parameter(field, value):
    with pytest.raises(InvalidParameterError, match=field) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.endswith(".") and message.count(". ") == 0  # one sentence
    assert isinstance(info.value, ValueError)


def test_boundary_values_are_accepted():
    params = SamplingParams(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1e-3, seed=0
    )
    assert params.top_p == 1.0
    assert SamplingParams(top_p=1e-9, min_p=0.999, seed=2**64 - 1).seed == 2**64 - 1


def test_numbers_are_normalised_to_python_types():
    params = SamplingParams(temperature=1, top_p=1, repetition_penalty=2)
    assert type(params.temperature) is float and params.temperature == 1.0
    assert type(params.top_p) is float
    assert type(params.repetition_penalty) is float


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), anything),
    top_k=st.one_of(st.integers(min_value=-5, max_value=10**6), anything),
    top_p=st.one_of(st.floats(allow_nan=True, allow_infinity=True), anything),
    min_p=st.one_of(st.floats(allow_nan=True, allow_infinity=True), anything),
    repetition_penalty=st.one_of(st.floats(allow_nan=True, allow_infinity=True), anything),
)
def test_fuzzed_construction_succeeds_or_raises_invalid_parameter(
    temperature, top_k, top_p, min_p, repetition_penalty
):
    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
    except InvalidParameterError:
        return
    # Whatever got through must really be in range.
    assert math.isfinite(params.temperature) and params.temperature >= 0
    assert isinstance(params.top_k, int) and params.top_k >= 0
    assert 0 < params.top_p <= 1
    assert 0 <= params.min_p < 1
    assert math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0


# ---------------------------------------------------------------- generators and sampling


def test_same_seed_same_samples_other_seed_other_samples():
    probs = torch.full((4, 1000), 1.0 / 1000)
    first = [sample(probs, make_generator(7)) for _ in range(2)]
    other = sample(probs, make_generator(8))
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other)


def test_unseeded_generators_differ():
    probs = torch.full((8, 1000), 1.0 / 1000)
    first, second = (sample(probs, make_generator(None)) for _ in range(2))
    assert not torch.equal(first, second)


def test_make_generator_rejects_bad_seed():
    with pytest.raises(InvalidParameterError, match="seed"):
        make_generator(-3)


def test_sample_one_token_per_row():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert sample(probs, make_generator(0)).tolist() == [1, 2, 0]


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    tokens = sample(probs.expand(30000, 3), make_generator(1))
    freq = torch.bincount(tokens, minlength=3).float() / tokens.numel()
    # Standard error of each frequency is below 0.003 at this count.
    assert torch.allclose(freq, probs, atol=0.015)


# ---------------------------------------------------------------- presence mask


def test_presence_rows_include_earlier_drafts():
    mask = presence_mask(torch.tensor([1, 3, 1]), torch.tensor([2, 4]), vocab=6)
    assert mask.shape == (3, 6) and mask.dtype == torch.bool
    assert mask[0].nonzero().flatten().tolist() == [1, 3]
    assert mask[1].nonzero().flatten().tolist() == [1, 2, 3]
    assert mask[2].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_presence_without_drafts_or_history():
    assert presence_mask(torch.tensor([5]), torch.tensor([], dtype=torch.long), 6).tolist() == [
        [False] * 5 + [True]
    ]
    empty = presence_mask(torch.tensor([], dtype=torch.long), torch.tensor([0, 0]), 3)
    assert empty.tolist() == [[False] * 3, [True, False, False], [True, False, False]]


def test_presence_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="drafts"):
        presence_mask(torch.tensor([1]), torch.tensor([6]), vocab=6)


# ---------------------------------------------------------------- single transforms


def test_temperature_divides_logits():
    out = process_logits(torch.tensor([[1.0, 2.0, -3.0]]), SamplingParams(temperature=2.0), None)
    assert torch.equal(out, torch.tensor([[0.5, 1.0, -1.5]]))


def test_temperature_one_without_filters_is_identity_but_a_copy():
    logits = torch.tensor([[1.0, 2.0, -3.0]])
    out = process_logits(logits, SamplingParams(temperature=1.0), None)
    assert torch.equal(out, logits)
    out[0, 0] = 100.0
    assert logits[0, 0] == 1.0


def test_top_k_keeps_k_largest():
    out = process_logits(
        torch.tensor([[1.0, 3.0, 2.0, 0.0]]), SamplingParams(temperature=1.0, top_k=2), None
    )
    assert torch.equal(out, torch.tensor([[-INF, 3.0, 2.0, -INF]]))


def test_top_k_with_ties_keeps_exactly_k():
    out = process_logits(
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]), SamplingParams(temperature=1.0, top_k=2), None
    )
    assert len(kept(out)) == 2


def test_top_k_at_least_vocab_is_off():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    out = process_logits(logits, SamplingParams(temperature=1.0, top_k=3), None)
    assert torch.equal(out, logits)


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.3, [2]),  # the top token alone reaches it
        (0.5, [2]),  # boundary: 0.5 >= 0.5, the set is complete
        (0.51, [2, 0]),
        (0.8, [2, 0]),  # boundary: 0.5 + 0.3 >= 0.8
        (0.81, [2, 0, 3]),
        (1e-9, [2]),  # the top token always survives
    ],
)
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, expected):
    # Tokens by probability: 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05).
    logits = logits_of([0.3, 0.05, 0.5, 0.15])
    out = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p), None)
    assert sorted(kept(out)) == sorted(expected)
    survivors = torch.tensor(expected)
    assert torch.allclose(out[0, survivors], logits[0, survivors])


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    # Peaked rows take the top-k shortcut, the flat row needs the full sort; both must agree with
    # a straightforward reference.
    gen = make_generator(3)
    vocab = 5000
    peaked = -2.0 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    logits = torch.stack([peaked[torch.randperm(vocab, generator=gen)] for _ in range(2)])
    flat = torch.randn(1, vocab, generator=gen) * 0.1
    # The 1024 best tokens hold 0.6 of the mass, enough for top_p = 0.5 but with a heavy tail, so
    # the nucleus must be measured against the whole row, not just the candidates.
    # Distinct, decreasing weights avoid ties whose order could differ from the reference's.
    head = torch.linspace(2.0, 1.0, 1023)
    tail = torch.linspace(2.0, 1.0, vocab - 1024)
    weights = torch.cat([torch.tensor([0.3]), 0.3 * head / head.sum(), 0.4 * tail / tail.sum()])
    heavy_tail = weights.log().unsqueeze(0)
    for rows, top_p in ((logits, 0.9), (flat, 0.9), (heavy_tail, 0.5)):
        out = process_logits(rows, SamplingParams(temperature=1.0, top_p=top_p), None)
        for row, processed in zip(rows, out):
            probs = torch.softmax(row.double(), -1)
            order = probs.argsort(descending=True)
            mass_before = probs[order].cumsum(0) - probs[order]
            expected = set(order[mass_before < top_p].tolist())
            assert set(torch.isfinite(processed).nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.2, [0, 1, 2]),  # threshold 0.1 drops only the 0.05 token
        (0.5, [0, 1]),  # threshold 0.25
        (0.9, [0]),
    ],
)
def test_min_p_drops_tokens_below_fraction_of_top(min_p, expected):
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    out = process_logits(logits, SamplingParams(temperature=1.0, min_p=min_p), None)
    assert kept(out) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    presence = torch.tensor([[True, True, False, False, True]])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), presence)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5, 0.0]]))


def test_repetition_penalty_needs_presence_and_a_penalty():
    logits = torch.tensor([[2.0, -2.0]])
    penalty = SamplingParams(repetition_penalty=2.0)
    assert torch.equal(process_logits(logits, penalty, None), logits)
    everywhere = torch.ones(1, 2, dtype=torch.bool)
    assert torch.equal(process_logits(logits, SamplingParams(), everywhere), logits)


def test_repetition_penalty_uses_each_rows_presence():
    logits = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    presence = presence_mask(torch.tensor([0]), torch.tensor([1]), vocab=2)
    out = process_logits(logits, SamplingParams(repetition_penalty=4.0), presence)
    assert torch.equal(out, torch.tensor([[0.5, 2.0], [0.5, 0.5]]))


def test_repetition_penalty_accepts_a_shared_vocab_mask():
    logits = torch.tensor([[2.0, 2.0], [-2.0, 2.0]])
    shared = torch.tensor([True, False])  # [vocab]
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), shared)
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [-4.0, 2.0]]))


# ---------------------------------------------------------------- order of transforms


def test_penalty_applies_before_top_k():
    logits = torch.tensor([[3.0, 2.5, 1.0]])
    presence = torch.tensor([[True, False, False]])
    params = SamplingParams(temperature=1.0, top_k=1, repetition_penalty=2.0)
    assert kept(process_logits(logits, params, presence)) == [1]  # 3.0 became 1.5


def test_temperature_applies_before_top_p():
    # At temperature 1 the top token holds 0.8 and suffices for top_p = 0.75; at temperature 4
    # the distribution flattens to about (0.586, 0.414) and both tokens are needed.
    logits = logits_of([0.8, 0.2])
    assert kept(process_logits(logits, SamplingParams(temperature=1.0, top_p=0.75), None)) == [0]
    hot = SamplingParams(temperature=4.0, top_p=0.75)
    assert kept(process_logits(logits, hot, None)) == [0, 1]


def test_top_p_sees_the_distribution_renormalised_by_top_k():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    # Alone, top_p = 0.5 keeps 0.4 + 0.3. After top_k = 2 the top token has 4/7 >= 0.5.
    assert kept(process_logits(logits, SamplingParams(temperature=1.0, top_p=0.5), None)) == [0, 1]
    both = SamplingParams(temperature=1.0, top_k=2, top_p=0.5)
    assert kept(process_logits(logits, both, None)) == [0]


def test_min_p_applies_after_top_p():
    # top_p = 0.75 first keeps {0.4, 0.3, 0.2}; min_p = 0.3 then needs >= 0.12 and keeps all three.
    # Were min_p first, it would drop 0.1 and renormalise to (4/9, 3/9, 2/9), and top_p would then
    # keep only two tokens.
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    params = SamplingParams(temperature=1.0, top_p=0.75, min_p=0.3)
    assert kept(process_logits(logits, params, None)) == [0, 1, 2]


def test_all_transforms_together():
    logits = torch.tensor([[4.0, 2.0, 3.0, -1.0, 1.0, 0.0]])
    presence = torch.tensor([[True, False, False, True, False, False]])
    params = SamplingParams(
        temperature=0.5, top_k=4, top_p=0.9, min_p=0.01, repetition_penalty=2.0
    )
    # penalty: [2, 2, 3, -2, 1, 0]; temperature: [4, 4, 6, -4, 2, 0]; top_k 4: tokens 2, 0, 1, 4
    # with probabilities ~ (0.776, 0.105, 0.105, 0.014); top_p 0.9: the mass before token 1 is
    # 0.881 < 0.9, before token 4 it is 0.986, so 2, 0, 1 stay; min_p 0.01 (> 0.0078) keeps them.
    out = process_logits(logits, params, presence)
    assert kept(out) == [0, 1, 2]
    assert torch.allclose(out[0, [0, 1, 2]], torch.tensor([4.0, 4.0, 6.0]))


# ---------------------------------------------------------------- greedy and probabilities


def test_greedy_applies_only_the_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    presence = torch.tensor([[True, False, False]])
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.1, repetition_penalty=2.0)
    assert torch.equal(process_logits(logits, params, presence), torch.tensor([[1.5, 2.0, 1.0]]))


def test_greedy_tokens_follow_the_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    presence = torch.tensor([[True, False, False], [False, False, False]])
    assert greedy_tokens(logits, SamplingParams()).tolist() == [0, 2]
    penalised = greedy_tokens(logits, SamplingParams(repetition_penalty=2.0), presence)
    assert penalised.tolist() == [1, 2]


def test_greedy_probs_are_one_hot():
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 5.0, 1.0]])
    probs = probs_from_logits(logits, SamplingParams())
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_greedy_probs_follow_the_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    presence = torch.tensor([[True, False, False]])
    probs = probs_from_logits(logits, SamplingParams(repetition_penalty=2.0), presence)
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_probs_are_softmax_of_processed_logits():
    logits = logits_of([0.5, 0.3, 0.15, 0.05]).repeat(2, 1)
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = torch.tensor([0.625, 0.375, 0.0, 0.0]).expand(2, 4)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2))


def test_low_precision_input_is_computed_in_fp32_and_not_modified():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    before = logits.clone()
    presence = torch.tensor([[False, False, False, True]])
    params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0)
    out = process_logits(logits, params, presence)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[-INF, 4.0, 6.0, 4.0]]))
    assert torch.equal(logits, before)
    assert probs_from_logits(logits, params, presence).dtype == torch.float32


def test_fp32_input_is_not_modified_in_place():
    logits = torch.tensor([[1.0, -2.0, 3.0]])
    before = logits.clone()
    presence = torch.tensor([[True, True, True]])
    for params in (
        SamplingParams(repetition_penalty=3.0),
        SamplingParams(temperature=2.0, top_p=0.5, min_p=0.1, repetition_penalty=3.0),
    ):
        process_logits(logits, params, presence)
        greedy_tokens(logits, params, presence)
    assert torch.equal(logits, before)


def test_process_logits_rejects_wrong_shape():
    with pytest.raises(ValueError, match="vocab"):
        process_logits(torch.zeros(5), SamplingParams(), None)
