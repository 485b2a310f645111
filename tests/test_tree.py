"""Tree verification (selfspec/tree.py, selfspec/verify_tree.py): mask and positions of a
hand-built tree, tree-forward logits equal to chain forwards of each node's path on every tiny
arch (sliding windows crossed), KV compaction, greedy losslessness with random trees, and the
sampled rules checked statistically."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from lossless import assert_lossless
from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.ngram import NgramDrafter, lookup_candidates
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.drafters.factory import build_drafter, parse_method
from selfspec.sampling import SamplingParams, probs_from_logits
from selfspec.tree import TreeLayout, tree_from_chains, tree_mask
from selfspec.verify_tree import tree_presence, verify_tree_greedy, verify_tree_sampled
from distributions import StubDrafter  # noqa: E402
from distributions import N_SAMPLES, PROMPT, pair_tv
from tiny import ARCHS, WINDOW, one_thread, tiny_model

INF = float("-inf")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {arch: tiny_model(arch, tmp_path_factory.mktemp(arch), ctx_size=96) for arch in ARCHS}


# ----------------------------------------------------------------------- layout, mask, trie
# Nodes 0..5 under the pending token P:   P ─┬─ 0 ─┬─ 2
#                                            │     └─ 3
#                                            └─ 1 ─── 4 ─── 5
PARENTS = [-1, -1, 0, 0, 1, 4]


def test_layout_of_a_hand_built_tree():
    layout = TreeLayout.of(PARENTS)
    assert layout.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    #            rows: P  0  1  2  3  4  5
    expected = [[1, 0, 0, 0, 0, 0, 0],  # P
                [1, 1, 0, 0, 0, 0, 0],  # 0
                [1, 0, 1, 0, 0, 0, 0],  # 1
                [1, 1, 0, 1, 0, 0, 0],  # 2
                [1, 1, 0, 0, 1, 0, 0],  # 3
                [1, 0, 1, 0, 0, 1, 0],  # 4
                [1, 0, 1, 0, 0, 1, 1]]  # 5
    assert layout.visible.int().tolist() == expected
    assert layout.path(6) == [2, 5, 6] and layout.path(0) == []
    # No window: every row sees the 5 cached keys, then its ancestors.
    mask = tree_mask(layout, start=5, first=0, window=0)
    assert mask.shape == (7, 12)
    assert (mask[:, :5] == 0).all()
    assert mask[:, 5:].eq(0).int().tolist() == expected
    # Window 3 (in positions), start 5: keys from slot 3. Row at depth d (position 5 + d) sees
    # cached position j when 5 + d - j < 3, and ancestors less than 3 levels up.
    mask = tree_mask(layout, start=5, first=3, window=3)
    allowed = mask.eq(0).int().tolist()
    assert allowed == [[1, 1, 1, 0, 0, 0, 0, 0, 0],  # P, position 5: keys 3, 4
                       [0, 1, 1, 1, 0, 0, 0, 0, 0],  # 0, position 6: key 4
                       [0, 1, 1, 0, 1, 0, 0, 0, 0],  # 1
                       [0, 0, 1, 1, 0, 1, 0, 0, 0],  # 2, position 7
                       [0, 0, 1, 1, 0, 0, 1, 0, 0],  # 3
                       [0, 0, 1, 0, 1, 0, 0, 1, 0],  # 4
                       [0, 0, 0, 0, 1, 0, 0, 1, 1]]  # 5, position 8: P (position 5) is out of the window
    assert mask.min() == INF


def test_bad_parents_are_refused():
    for bad in ([0], [-1, 1], [-1, -2]):
        with pytest.raises(InvalidParameterError, match="parents"):
            TreeLayout.of(bad)


def test_tree_from_chains_merges_shared_prefixes():
    tokens, parents = tree_from_chains([[1, 2, 3], [1, 2, 4], [5], [1, 6], [1, 2]])
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert parents.tolist() == [-1, 0, 1, 1, -1, 0]
    tokens, parents = tree_from_chains([[1, 2, 3], [7, 8]], max_nodes=4)
    assert tokens.tolist() == [1, 2, 3, 7] and parents.tolist() == [-1, 0, 1, -1]
    assert tree_from_chains([])[0].numel() == 0


def test_tree_presence_sees_only_the_rows_own_path():
    layout = TreeLayout.of(PARENTS)
    nodes = torch.tensor([10, 11, 12, 13, 14, 15])
    mask = tree_presence(torch.tensor([1, 2]), nodes, layout, 20)
    rows = [set(torch.nonzero(r).flatten().tolist()) for r in mask]
    assert rows == [{1, 2}, {1, 2, 10}, {1, 2, 11}, {1, 2, 10, 12}, {1, 2, 10, 13}, {1, 2, 11, 14},
                    {1, 2, 11, 14, 15}]


# -------------------------------------------------------------------- forward, cache, archs
def random_tree(gen: random.Random, n: int, vocab: int = 160) -> tuple[list[int], list[int]]:
    parents = [-1] + [gen.randrange(-1, i) for i in range(1, n)]
    return [gen.randrange(vocab) for _ in range(n)], parents


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_equals_chain_forward_of_each_path(models, arch):
    """Every node's logits equal a plain forward of its path; prompt 20 > window 8, and one
    branch deeper than the window, so both the cached keys and the ancestors cross it."""
    tr = models[arch].transformer
    gen = random.Random(7)
    prompt = torch.tensor([gen.randrange(160) for _ in range(20)])
    tokens, parents = random_tree(gen, 8)
    tokens += [gen.randrange(160) for _ in range(WINDOW + 2)]  # a chain of 10 below node 7
    parents += list(range(7, 7 + WINDOW + 2))
    layout = TreeLayout.of(parents)
    nodes = torch.tensor(tokens)
    cache = tr.new_cache(96)
    tr.forward(prompt[:-1], 0, cache)
    start = len(prompt) - 1
    out = tr.forward(torch.cat((prompt[-1:], nodes)), start, cache, tree=layout)
    assert cache.length == start + 1 + len(tokens)
    for row in range(len(tokens) + 1):
        path = [r - 1 for r in layout.path(row)]
        ref = tr.forward(torch.cat((prompt, nodes[path])), 0, tr.new_cache(96))[-1]
        assert torch.equal(out[row], ref), f"{arch} row {row}"  # row-invariant forward: same bits


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_compaction_leaves_the_cache_of_a_plain_forward(models, arch):
    tr = models[arch].transformer
    gen = random.Random(3)
    prompt = torch.tensor([gen.randrange(160) for _ in range(20)])
    tokens, parents = random_tree(gen, 12)
    layout = TreeLayout.of(parents)
    start = len(prompt) - 1
    for row in (12, 5, 1, 0):  # deep, middle, first node (already in place), nothing accepted
        cache = tr.new_cache(96)
        tr.forward(prompt[:-1], 0, cache)
        tr.forward(torch.cat((prompt[-1:], torch.tensor(tokens))), start, cache, tree=layout)
        path = [r - 1 for r in layout.path(row)]
        cache.compact(start + 1, [start + 1 + i for i in path])
        n = len(prompt) + len(path)
        assert cache.length == n
        plain = tr.new_cache(96)
        tr.forward(torch.cat((prompt, torch.tensor(tokens)[path])).long(), 0, plain)
        assert torch.equal(cache.k[:, :, :n], plain.k[:, :, :n]) and torch.equal(cache.v[:, :, :n], plain.v[:, :, :n])


def test_compiled_wrapper_runs_trees_eagerly(models, monkeypatch):
    from selfspec.models.compiled import CompiledTransformer

    tr = models["llama"].transformer
    wrapped = CompiledTransformer(tr)
    monkeypatch.setattr(wrapped, "compile_status", "compiled")
    monkeypatch.setattr(wrapped, "_compiled", lambda *a: pytest.fail("a tree went to the compiled graph"))
    layout = TreeLayout.of(PARENTS)
    ids = torch.arange(7)
    got = wrapped.forward(ids, 0, tr.new_cache(16), tree=layout)
    torch.testing.assert_close(got, tr.forward(ids, 0, tr.new_cache(16), tree=layout))


# --------------------------------------------------------------------------- greedy, lossless
TreeDrafter = StubDrafter  # the name the drafters below grew up with


class RandomTreeDrafter(TreeDrafter):
    """Random trees around the true continuation `script`: it is one branch (at a random place,
    of random length, sometimes corrupted after its first token) or missing altogether."""

    name = "random-tree"

    def __init__(self, prompt_len: int, script: list[int], seed: int, width: int = 4, depth: int = 4):
        self.prompt_len, self.script, self.width, self.depth = prompt_len, script, width, depth
        self.rng = random.Random(seed)
        self.proposed: list[Draft] = []

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        rng = self.rng
        done = len(ctx.tokens) - self.prompt_len
        chains = [[rng.randrange(160) for _ in range(rng.randint(1, self.depth))] for _ in range(self.width)]
        truth = self.script[done: done + rng.randint(1, self.depth)]
        kind = rng.random()
        if kind < 0.6 and truth:
            chains.insert(rng.randrange(len(chains) + 1), truth)
        elif kind < 0.8 and len(truth) > 1:  # right first token, then wrong: a shared prefix that fails
            chains.insert(rng.randrange(len(chains) + 1), truth[:1] + [(t + 1) % 160 for t in truth[1:]])
        tokens, parents = tree_from_chains(chains, max_nodes=max_tokens)
        draft = Draft(tokens, parents=parents)
        self.proposed.append(draft)
        return draft


@pytest.mark.parametrize("arch", ARCHS)
def test_random_trees_are_lossless_under_greedy(models, arch):
    model = models[arch]
    prompt = PROMPT * 3  # 27 tokens: past the sliding window
    for penalty in (1.0, 1.5):  # the penalty at a node must see its own path only
        sampling = SamplingParams(repetition_penalty=penalty)
        plain = generate(model, prompt, max_new_tokens=40, sampling=sampling)
        drafter = RandomTreeDrafter(len(prompt), plain.token_ids, seed=len(arch))
        spec = generate(model, prompt, max_new_tokens=40, sampling=sampling, drafter=drafter)
        assert_lossless(plain.token_ids, spec.token_ids, f"{arch} penalty {penalty}")
        s = spec.stats
        assert s.drafted == sum(len(d) for d in drafter.proposed)  # nodes, not paths
        assert 0 < s.accepted < s.drafted and s.rounds < 40
        assert s.new_tokens == s.accepted + s.rounds  # every round: accepted path + one target token


def test_verify_tree_greedy_follows_the_matching_child():
    layout = TreeLayout.of(PARENTS)
    nodes = torch.tensor([10, 11, 12, 13, 14, 15])
    #                       rows: P   0   1   2   3   4   5
    v = verify_tree_greedy(layout, nodes, torch.tensor([11, 99, 14, 99, 99, 15, 42]))
    assert v.path == (1, 4, 5) and v.tokens.tolist() == [11, 14, 15, 42] and v.accepted == 3
    v = verify_tree_greedy(layout, nodes, torch.tensor([10, 13, 99, 7, 99, 99, 99]))
    assert v.path == (0, 3) and v.tokens.tolist() == [10, 13, 99]
    v = verify_tree_greedy(layout, nodes, torch.tensor([5, 0, 0, 0, 0, 0, 0]))
    assert v.path == () and v.tokens.tolist() == [5]


# ------------------------------------------------------------------------ sampled, exactness
class FixedTreeDrafter(TreeDrafter):
    """A deterministic tree of target-ranked candidates: at the pending token, the tokens of
    ranks `ranks` under the target (at temperature 1), each with the same ranks one level below.
    Ranks far from 0 make every candidate usually wrong, so the residual decides."""

    name = "fixed-tree"

    def __init__(self, model, ranks: tuple[int, ...], depth: int = 2):
        self.model, self.ranks, self.depth = model, ranks, depth
        self.memo: dict[tuple, list[int]] = {}

    def _ranked(self, context: list[int]) -> list[int]:
        key = tuple(context)
        if key not in self.memo:
            tr = self.model.transformer
            logits = tr.forward(torch.tensor(context), 0, tr.new_cache(len(context)), last_only=True)[0]
            order = logits.argsort(descending=True).tolist()
            self.memo[key] = [order[r] for r in self.ranks]
        return self.memo[key]

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        chains = [[t] for t in self._ranked(ctx.tokens)]
        if self.depth > 1:
            chains = [[t, u] for t in self._ranked(ctx.tokens) for u in self._ranked(ctx.tokens + [t])]
        tokens, parents = tree_from_chains(chains, max_nodes=max_tokens)
        return Draft(tokens, parents=parents)


class IidTreeDrafter(TreeDrafter):
    """Rule (b): m children drawn i.i.d. (with replacement, duplicates kept) from a q unlike the
    target (its temperature-2 softmax), each reported with that q."""

    name = "iid-tree"

    def __init__(self, model, m: int = 3):
        self.model, self.m = model, m
        self.memo: dict[tuple, torch.Tensor] = {}

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        key = tuple(ctx.tokens)
        if key not in self.memo:
            tr = self.model.transformer
            logits = tr.forward(torch.tensor(ctx.tokens), 0, tr.new_cache(len(ctx.tokens)), last_only=True)
            self.memo[key] = probs_from_logits(logits, SamplingParams(temperature=2.0))[0]
        q = self.memo[key]
        picks = torch.multinomial(q, self.m, replacement=True, generator=ctx.generator)
        return Draft(picks, q_draft=q.expand(self.m, -1).clone(), parents=torch.full((self.m,), -1))


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("peaky"), ctx_size=64)


def _tv_and_floor(model, params, drafter):
    """The (2nd, 3rd) tokens with room for 14 nodes in the round after the first token (the trees
    are not cut short by the length limit), replayed (distributions.pair_tv)."""
    tv, floor, impossible = pair_tv(model, PROMPT[:5], params, drafter, N_SAMPLES)
    assert impossible == 0, f"{impossible} samples of pairs the target cannot produce"
    return tv, floor


# Top-k 5 keeps the exact pair distribution cheap (<= 25 pairs per first token).
TREE_CASES = {
    # All wrong: ranks 3 and 4 carry mass (rejected mostly, the residual decides), 7 has none.
    "all-wrong": ((3, 4, 7), SamplingParams(temperature=1.0, top_k=5)),
    # Likely candidates (accepted often, depth 2 reached), under top-p and a repetition penalty.
    "top-p-penalty": ((1, 0), SamplingParams(temperature=1.0, top_p=0.7, repetition_penalty=1.5)),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_sampled_tree_matches_target_distribution(peaky, case):
    ranks, params = TREE_CASES[case]
    tv, floor = _tv_and_floor(peaky, params, FixedTreeDrafter(peaky, ranks))
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


def test_sampled_iid_children_match_target_distribution(peaky):
    tv, floor = _tv_and_floor(peaky, SamplingParams(temperature=1.0, top_k=5), IidTreeDrafter(peaky))
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


def test_distribution_check_catches_a_tree_rule_without_renormalising(peaky, monkeypatch):
    """The same statistic must fail for a plausible bug: every sibling tested against the
    original p (no residual), and the final token drawn from p."""
    import selfspec.verify_tree as vt

    def broken(layout, node_tokens, q_draft, p_target, generator):
        kids = vt._children(layout)
        toks = node_tokens.tolist()
        row, path = 0, []
        while True:
            child = next((c for c in kids[row] if float(torch.rand(1, generator=generator)) < float(p_target[row, toks[c - 1]])), None)
            if child is None:
                return vt._verdict(path, toks, int(torch.multinomial(p_target[row], 1, generator=generator)))
            path.append(child)
            row = child

    monkeypatch.setattr(vt, "verify_tree_sampled", broken)
    tv, floor = _tv_and_floor(peaky, SamplingParams(temperature=1.0, top_k=5), FixedTreeDrafter(peaky, (0, 1, 2)))
    assert tv > 1.6 * floor + 0.01, f"a broken tree rule went unnoticed: TV {tv:.4f}, floor {floor:.4f}"


def test_verify_tree_sampled_all_candidates_certain():
    """p puts all its mass on the second child: it is always accepted, then the leaf's bonus."""
    layout = TreeLayout.of([-1, -1])
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25] * 4, [0.0, 0.0, 0.0, 1.0]])
    for seed in range(20):
        v = verify_tree_sampled(layout, torch.tensor([1, 2]), None, p, torch.Generator().manual_seed(seed))
        assert v.path == (1,) and v.tokens.tolist() == [2, 3]


# ----------------------------------------------------------------------------- ngram tree mode
def test_ngram_candidates_and_tree_mode(models):
    t = torch.tensor([1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 2, 3, 5, 2, 3])
    assert lookup_candidates(t, 3, 1, 3, 3) == [[5, 2, 3], [7, 8, 4], [9, 1, 2]]
    assert lookup_candidates(t, 3, 1, 2, 1) == [[5, 2]]
    model = models["gemma3"]
    prompt = PROMPT * 3
    plain = generate(model, prompt, max_new_tokens=30)
    spec = generate(model, prompt, max_new_tokens=30, drafter=NgramDrafter(tree=3, max_draft=4))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.extras["tree"] == 3 and spec.stats.drafted > 0
    with pytest.raises(InvalidParameterError, match="--tree"):
        NgramDrafter(tree=0)
    assert parse_method("ngram:tree=4").options == {"tree": 4}
    assert build_drafter("ngram", model, tree=4).tree == 4
    assert build_drafter("ngram", model).tree == 1  # default: a chain
    with pytest.raises(InvalidParameterError, match="--tree"):
        build_drafter("layer-skip", model, tree=2)


def test_ngram_tree_proposes_a_tree_only_with_several_matches():
    ctx = DraftContext(model=None, cache=None, tokens=[1, 2, 3, 9, 1, 2, 3, 7, 2, 3], sampling=SamplingParams(),
                       generator=torch.Generator())
    # The whole candidate tree (hypothesis reduction, tests/test_reduction.py, would prune it).
    draft = NgramDrafter(tree=2, ngram_min=1, tree_reduce=False).propose(ctx, 8)
    assert draft.parents is not None
    assert draft.tokens.tolist()[:3] == [7, 2, 3]  # the latest match first: in place if accepted
    ctx = dataclasses.replace(ctx, tokens=[1, 2, 3, 4, 2, 3])
    assert NgramDrafter(tree=2, tree_reduce=False).propose(ctx, 8).parents is None  # one match: a chain
