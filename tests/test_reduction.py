"""Hypothesis reduction in front of tree verification (selfspec/drafters/reduction.py): path
probabilities never rank a child above its parent, the budget keeps a set closed under ancestors
and shrinks as rows get dearer, the kept set is re-indexed (a single path becomes a chain), the
scores learn from verdicts, reduction off is today's tree, and reduced trees stay lossless."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from distributions import PROMPT
from lossless import assert_lossless
from selfspec.drafters.base import DraftContext
from selfspec.drafters.costs import CostModel
from selfspec.drafters.factory import build_drafter, parse_method
from selfspec.drafters.ngram import NgramDrafter
from selfspec.drafters.reduction import NodeScorer, TreeReducer, select, subtree, verify_cost
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.sampling import SamplingParams
from selfspec.tree import TreeLayout
from tiny import one_thread, tiny_model

FLAT = CostModel([1.0] * 9, source="synthetic")  # extra rows free: every node pays
STEEP = CostModel([1.0 * (k + 1) for k in range(9)], source="synthetic")  # each row costs a step


def sloped(slope: float) -> CostModel:
    return CostModel([1.0 + slope * k for k in range(9)], source="synthetic")


def random_tree(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(-1, i) for i in range(n)]


def trained_scorer(rng: random.Random) -> NodeScorer:
    scorer = NodeScorer()
    for key in range(4):
        scorer.buckets[key] = type(scorer.overall)(hits=rng.uniform(0, 5), trials=5.0)
    return scorer


def ctx_of(tokens: list[int]) -> DraftContext:
    return DraftContext(model=None, cache=None, tokens=tokens, sampling=SamplingParams(), generator=torch.Generator())


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


# ------------------------------------------------------------------------------ scores, budget
def test_a_child_never_outranks_its_parent_and_siblings_share_their_parent():
    rng = random.Random(0)
    for _ in range(200):
        parents = random_tree(rng, rng.randrange(1, 20))
        keys = [rng.randrange(4) for _ in parents]
        probs = trained_scorer(rng).path_probabilities(keys, parents)
        for i, p in enumerate(parents):
            above = probs[p] if p >= 0 else 1.0
            assert 0 < probs[i] < above
        for p in set(parents):  # at most one child is accepted: their mass fits in the parent's
            assert sum(probs[i] for i, q in enumerate(parents) if q == p) <= (probs[p] if p >= 0 else 1.0) + 1e-12


def test_the_kept_set_is_closed_under_ancestors_at_every_cost():
    rng = random.Random(1)
    for _ in range(200):
        parents = random_tree(rng, rng.randrange(1, 24))
        probs = trained_scorer(rng).path_probabilities([rng.randrange(4) for _ in parents], parents)
        for costs in (FLAT, STEEP, sloped(0.05), sloped(0.3)):
            keep, expected = select(probs, costs)
            assert keep and keep == sorted(set(keep))
            assert all(parents[i] == -1 or parents[i] in keep for i in keep)
            assert expected == pytest.approx(1 + sum(probs[i] for i in keep))


def test_the_budget_shrinks_as_rows_get_dearer():
    parents = [-1, 0, 1, 2, -1, 4, 0, 6, 1, 3, 5]
    probs = NodeScorer().path_probabilities([0] * len(parents), parents)
    sizes = [len(select(probs, sloped(s))[0]) for s in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)]
    assert sizes[0] == len(parents)  # flat costs: every node pays
    assert sizes[-1] == 1  # a step per row: only the likeliest node
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 2


def test_costs_beyond_the_measurement_extrapolate_linearly():
    costs = CostModel([1.0, 1.1, 1.3], source="synthetic")
    assert [verify_cost(costs, n) for n in range(5)] == pytest.approx([1.0, 1.1, 1.3, 1.5, 1.7])
    assert verify_cost(FLAT, 40) == 1.0  # flat stays flat: a wide tree keeps every node
    assert len(select([0.5 ** (i + 1) for i in range(30)], FLAT)[0]) == 30


def test_subtree_reindexes_parents_and_a_single_path_is_a_chain():
    tokens, parents = [10, 11, 12, 13, 14, 15], [-1, -1, 0, 0, 3, 1]
    chain = subtree(tokens, parents, [0, 3, 4])
    assert chain.parents is None and chain.tokens.tolist() == [10, 13, 14]
    tree = subtree(tokens, parents, [0, 1, 3, 5])
    assert tree.tokens.tolist() == [10, 11, 13, 15] and tree.parents.tolist() == [-1, -1, 0, 1]
    TreeLayout.of(tree.parents)  # valid: parents[i] < i


# ------------------------------------------------------------------------------ learning
def test_the_reducer_learns_which_branch_is_accepted_from_the_sequence():
    """Two root children: A (bucket "a") is always rejected, B (bucket "b") always accepted. The
    reducer reads the accepted path from the tokens the sequence grew by; with each row costing a
    step it ends up verifying B alone."""
    reducer = TreeReducer(FLAT)
    context = [1, 2, 3]
    for _ in range(10):
        draft = reducer.reduce(ctx_of(context), [7, 8], [-1, -1], ["a", "b"])
        assert draft.tokens.tolist() == [7, 8]
        reducer.update(1, 2)
        context = context + [8, 9]  # B accepted, then the target's own token
    reducer.reduce(ctx_of(context), [7, 8], [-1, -1], ["a", "b"])  # learns the last round
    assert reducer.scorer.conditional("b") > 0.8 > 0.2 > reducer.scorer.conditional("a")
    reducer.costs = STEEP
    assert reducer.reduce(ctx_of(context), [7, 8], [-1, -1], ["a", "b"]).tokens.tolist() == [8]


def test_a_plain_step_after_a_round_forgets_it_unlearnt():
    reducer = TreeReducer(FLAT)
    reducer.reduce(ctx_of([1, 2]), [7], [-1], ["a"])
    reducer.update(0, 0)  # no verdict for the round (nothing verified)
    reducer.reduce(ctx_of([1, 2, 7, 9]), [7], [-1], ["a"])
    assert reducer.scorer.buckets == {}


# ------------------------------------------------------------------------------ ngram, options
CONTEXT = [1, 2, 3, 9, 1, 2, 3, 7, 2, 3]


def test_reduction_off_is_todays_tree():
    """The candidate tree as tree mode built it before reduction (the latest match first), even
    with costs that would prune it."""
    draft = NgramDrafter(tree=3, ngram_min=1, tree_reduce=False, costs=STEEP).propose(ctx_of(CONTEXT), 8)
    assert draft.tokens.tolist() == [7, 2, 3, 9, 1, 2, 3, 7]
    assert draft.parents.tolist() == [-1, 0, 1, -1, 3, 4, 5, 6]
    one_match = NgramDrafter(tree=2, tree_reduce=False).propose(ctx_of([1, 2, 3, 4, 2, 3]), 8)
    assert one_match.parents is None and one_match.tokens.tolist() == [4, 2, 3]


def test_ngram_reduction_prunes_by_cost_and_reports_the_budget():
    wide = NgramDrafter(tree=3, ngram_min=1, costs=FLAT)
    full = wide.propose(ctx_of(CONTEXT), 8)
    assert full.tokens.tolist() == [7, 2, 3, 9, 1, 2, 3, 7]  # free rows: the whole tree
    narrow = NgramDrafter(tree=3, ngram_min=1, costs=STEEP)
    pruned = narrow.propose(ctx_of(CONTEXT), 8)
    assert pruned.parents is None and pruned.tokens.tolist() == [7]  # the latest match's first token
    stats = narrow.extra_stats()
    assert stats == {"tree": 3, "tree_reduce": True, "tree_nodes_proposed": 8.0, "tree_nodes_verified": 1.0,
                     "tree_expected_tokens": stats["tree_expected_tokens"]}
    assert 1 < stats["tree_expected_tokens"] < 2


def test_reduction_options(models):
    model = models["llama"]
    assert parse_method("ngram:tree=4,reduce=0").options == {"tree": 4, "tree_reduce": False}
    with pytest.raises(InvalidParameterError, match="0 or 1"):
        parse_method("ngram:tree=4,reduce=yes")
    on = build_drafter("ngram", model, tree=4)
    assert on.reducer is not None and isinstance(on.costs, CostModel)  # measured, as auto's
    assert build_drafter("ngram", model, tree=4, tree_reduce=False).reducer is None
    assert build_drafter("ngram", model).reducer is None  # a chain: nothing to reduce
    with pytest.raises(InvalidParameterError, match="--tree-reduce"):
        build_drafter("ngram", model, tree_reduce=False)


# ------------------------------------------------------------------------------ lossless
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {arch: tiny_model(arch, tmp_path_factory.mktemp(arch), ctx_size=128)
            for arch in ("llama", "mistral", "gemma3")}


class Recording(NgramDrafter):
    """Counts the tree rounds of its proposals."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.trees = 0

    def propose(self, ctx, max_tokens):
        draft = super().propose(ctx, max_tokens)
        self.trees += draft.parents is not None
        return draft


@pytest.mark.parametrize("arch,penalty", [("llama", 1.0), ("llama", 1.3), ("mistral", 1.0), ("gemma3", 1.0)])
def test_reduced_ngram_trees_are_lossless(models, arch, penalty):
    """The prompt holds two noisy copies of the plain answer, so that lookups find several
    distinct continuations (random tiny models soon repeat one token, which gives one)."""
    model, sampling = models[arch], SamplingParams(repetition_penalty=penalty)
    answer = generate(model, PROMPT * 3, max_new_tokens=30, sampling=sampling).token_ids
    prompt = ([t if i % 5 != 3 else (t + 1) % 160 for i, t in enumerate(answer)]
              + [t if i % 7 != 4 else (t + 2) % 160 for i, t in enumerate(answer)] + PROMPT * 3)
    plain = generate(model, prompt, max_new_tokens=40, sampling=sampling)
    for costs in (FLAT, sloped(0.1), STEEP):
        drafter = Recording(tree=4, ngram_min=1, max_draft=4, costs=costs)
        spec = generate(model, prompt, max_new_tokens=40, drafter=drafter, sampling=sampling)
        assert_lossless(plain.token_ids, spec.token_ids, f"{arch} slope {costs.verify[1] - costs.verify[0]}")
        stats = spec.stats.to_dict()
        assert stats["drafted"] > 0 and stats["tree_nodes_verified"] <= stats["tree_nodes_proposed"]
        if costs is FLAT:
            assert drafter.trees > 0 and stats["tree_nodes_verified"] == stats["tree_nodes_proposed"]
        if costs is STEEP:
            assert drafter.trees == 0 and stats["tree_nodes_verified"] == 1.0


def test_reduced_ngram_tree_is_lossless_on_smollm(smollm):
    prompt = ("Repeat the list exactly twice.\nred apple, green pear, red cherry, green apple, red pear, "
              "green cherry, red grape.\n")
    plain = generate(smollm, prompt, max_new_tokens=48, ignore_eos=True)
    drafter = build_drafter("ngram", smollm, tree=4)  # the measured costs of this machine
    spec = generate(smollm, prompt, max_new_tokens=48, drafter=drafter, ignore_eos=True)
    assert_lossless(plain.token_ids, spec.token_ids, "smollm2 ngram tree=4 reduced")
    assert spec.stats.drafted > 0 and spec.stats.extras["tree_nodes_proposed"] > 0


def test_generate_json_reports_the_node_budget():
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "generate", "--model", "smollm2-135m",
                           "--prompt", "one two three, one two three, one two", "-n", "12", "--draft", "ngram",
                           "--tree", "3", "--dtype", "fp32", "--no-chat", "--json"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and "not installed" in proc.stderr:
        pytest.skip("smollm2-135m is not installed; `make test` installs it")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])["stats"]
    assert stats["tree"] == 3 and stats["tree_reduce"] is True
    for key in ("tree_nodes_proposed", "tree_nodes_verified", "tree_expected_tokens"):
        assert isinstance(stats[key], float), key
