"""Training-free drafters (docs/drafters-training-free.md): the incremental n-gram index and the
adaptive n-gram drafter, the token datastore and retrieval drafts, their place in `auto`; all of
them lossless, greedy and sampled, on tiny random models."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lossless import assert_lossless
from selfspec.drafters.costs import CostModel
from selfspec.drafters.datastore import Datastore, tokenizer_identity
from selfspec.drafters.anpd import AdaptiveNgramDrafter, NgramIndex
from selfspec.drafters.auto import AutoDrafter
from selfspec.drafters.base import Draft
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import CappedDrafter, NgramDrafter
from selfspec.drafters.retrieval import RetrievalDrafter
from selfspec.errors import InvalidParameterError, SelfspecError
from selfspec.generation import generate
from selfspec.drafters.factory import build_drafter, parse_methods
from distributions import N_SAMPLES, SAMPLING_CASES, exact_second_token, noise_floor, second_token_samples, total_variation
from tiny import tiny_model

# Repeats "5 17" and "33 2" so that n-gram drafters have something to match from the first round.
PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 33, 2, 8, 5, 17]


from distributions import _one_thread, gemma3, llama  # noqa: F401 (fixtures)


def store_of(docs, model=None, sep=160) -> Datastore:
    tok = model.tokenizer if model is not None else None
    meta = {"model": getattr(model, "name", "hand"), "tokenizer_sha256": tokenizer_identity(tok) if tok else "none"}
    return Datastore.build(docs, sep=sep, meta=meta)


# ----------------------------------------------------------------------------- the n-gram index
def test_index_counts_followers_longest_match_first():
    idx = NgramIndex(ngram_max=3, ngram_min=1)
    idx.sync([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 9, 2, 3])
    assert idx.tables[3][(1, 2, 3)] == {5: 1, 4: 2}  # 4 seen twice, the latest last
    assert idx.predict([1, 2, 3]) == (4, 3, pytest.approx(2 / 3))  # most frequent wins
    tok, n, share = idx.predict([9, 2, 3])  # "9 2 3" was never followed: level 2, "2 3" -> 4, 5, 4
    assert (tok, n) == (4, 2) and share == pytest.approx(2 / 3)
    assert idx.predict([7, 8, 1]) == (2, 1, 1.0)  # only a unigram matches
    assert idx.predict([42]) is None


def test_index_ties_go_to_the_latest_follower():
    idx = NgramIndex(ngram_max=2, ngram_min=2)
    idx.sync([1, 2, 7, 1, 2, 8])
    assert idx.predict([1, 2]) == (8, 2, 0.5)
    idx.sync([1, 2, 7, 1, 2, 8, 1, 2, 7])  # 7 now twice
    assert idx.predict([1, 2])[0] == 7


def test_index_sync_is_incremental_and_restarts_on_another_sequence():
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    inc = NgramIndex(4, 1)
    for end in range(1, len(seq) + 1):
        inc.sync(seq[:end])
    whole = NgramIndex(4, 1)
    whole.sync(seq)
    assert inc.tables == whole.tables and len(inc) == len(seq)
    inc.sync([7, 7, 7])  # a new sequence: not a continuation
    assert inc.tokens == [7, 7, 7] and inc.predict([7, 7]) == (7, 2, 1.0)


def test_adaptive_drafter_walks_the_model_and_stops_when_unsure():
    d = AdaptiveNgramDrafter(ngram_max=2, ngram_min=2, max_draft=8, min_confidence=0.3)
    seq = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2]
    # "1 2" -> 3 (2 of 2); "2 3" -> 4 or 5 (tie: the latest, 5; share 1/2); "3 5" -> 1; "5 1" -> 2;
    # "1 2" -> 3; then "2 3" again at share 1/2: confidence 1/4 < 0.3 stops the draft.
    assert d.draft_tokens(seq, 8) == [3, 5, 1, 2, 3]
    assert d.last_level == 2
    assert AdaptiveNgramDrafter(2, 2, min_confidence=0.6).draft_tokens(seq, 8) == [3]
    assert d.draft_tokens(seq, 2) == [3, 5]
    assert d.draft_tokens([8, 9], 4) == [] and d.last_level == 0


def test_adaptive_drafter_length_follows_acceptance():
    d = AdaptiveNgramDrafter(max_draft=8)
    d.update(2, 8)
    assert d.cap == 3
    d.update(3, 3)
    assert d.cap == 5
    d.reset()
    assert d.cap == 8 and len(d.index) == 0


def test_bad_ngram_arguments_are_refused():
    with pytest.raises(InvalidParameterError, match="ngram-min"):
        AdaptiveNgramDrafter(ngram_max=1, ngram_min=2)
    with pytest.raises(InvalidParameterError, match="ngram-mode"):
        build_drafter("ngram", None, ngram_mode="fuzzy")


# ----------------------------------------------------------------------------- the datastore
def test_datastore_finds_the_longest_suffix_and_the_most_frequent_continuation():
    docs = [[1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 7, 7], [8, 3, 4, 7, 1], [2, 3, 4, 5, 0]]
    st = store_of(docs)
    assert st.tokens.tolist()[-1] == 160 and st.tokens.size == 4 + sum(map(len, docs))
    m = st.match([0, 2, 3, 4], max_len=16, min_len=1)
    assert m.length == 3 and m.count == 3  # "2 3 4" three times; "0 2 3 4" never
    # after "2 3 4": 5 (twice) beats 7 (once); after "2 3 4 5": 6 and 0 tie, lowest id, then the
    # document ends (SEP): the chain stops there
    assert st.chain([0, 2, 3, 4], 4, min_len=1) == ([5, 0], 3)
    assert st.chain([8, 3, 4], 4, min_len=1) == ([7, 1], 3)
    assert st.chain([42, 43], 4, min_len=1) == ([], 0)
    assert st.chain([7, 4], 4, min_len=2) == ([], 0)  # only "4" matches: under min_len


def test_datastore_handles_token_ids_beyond_16_bits():
    st = store_of([[200_000, 262_143, 70_000, 5, 1, 200_000, 262_143, 70_000, 9]], sep=262_144)
    assert st.chain([3, 200_000, 262_143], 3, min_len=2) == ([70_000, 5, 1], 2)
    assert st.chain([3, 70_000], 3, min_len=1) == ([5, 1, 200_000], 1)


def test_datastore_trie_is_a_valid_token_tree():
    docs = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7, 8], [1, 2, 9]]
    st = store_of(docs)
    tokens, parents, length, counts, rows = st.trie([1, 2], 3, max_nodes=16, min_len=1)
    assert length == 2 and rows == 4
    assert counts == [3, 2, 1, 1, 1, 1, 1]  # how many continuations share each node's prefix
    assert all(-1 <= p < i for i, p in enumerate(parents))
    paths = set()
    for i in range(len(tokens)):  # every root-to-node path is a real continuation
        path, j = [], i
        while j != -1:
            path.insert(0, tokens[j])
            j = parents[j]
        paths.add(tuple(path))
    assert paths == {(3,), (9,), (3, 4), (3, 7), (3, 4, 5), (3, 4, 6), (3, 7, 8)}
    assert tokens[0] == 3 and parents[0] == -1  # the most frequent first
    # counts: "3" 3, "3 4" 2, then the singletons by depth: "9" before "3 7"
    assert st.trie([1, 2], 3, max_nodes=3, min_len=1)[:2] == ([3, 4, 9], [-1, 0, -1])


def test_datastore_round_trip_and_errors(tmp_path, llama):
    st = store_of([[1, 2, 3], [4, 5]], model=llama)
    st.save(tmp_path / "s")
    back = Datastore.load(tmp_path / "s")
    assert back.tokens.tolist() == st.tokens.tolist() and back.suffixes.tolist() == st.suffixes.tolist()
    back.check_tokenizer(llama.tokenizer, "llama")
    with pytest.raises(SelfspecError, match="tokenizer of 'llama'.*other-model"):
        back.check_tokenizer(type("Tok", (), {"get_vocab": lambda self: {"a": 0}})(), "other-model")
    with pytest.raises(SelfspecError, match="not a datastore"):
        Datastore.load(tmp_path)
    (tmp_path / "s" / "suffixes.npy").write_bytes(b"garbage")
    with pytest.raises(SelfspecError, match="damaged"):
        Datastore.load(tmp_path / "s")
    with pytest.raises(SelfspecError, match="--datastore"):
        build_drafter("retrieval", llama)


def test_retrieval_tree_option_returns_parents():
    st = store_of([[1, 2, 3, 4], [1, 2, 5, 6]])
    ctx = type("Ctx", (), {"tokens": [9, 1, 2]})()
    chain = RetrievalDrafter(st, min_len=1).propose(ctx, 4)
    assert chain.parents is None and chain.tokens.tolist() == [3, 4]  # a tie: the lower id
    tree = RetrievalDrafter(st, min_len=1, tree=True, tree_reduce=False).propose(ctx, 4)
    assert tree.tokens.tolist() == [3, 5, 4, 6] and tree.parents.tolist() == [-1, -1, 0, 1]
    # Reduced (the default): every row free keeps the trie; every row a step keeps one node.
    free, dear = CostModel([1.0] * 9), CostModel([k + 1.0 for k in range(9)])
    assert RetrievalDrafter(st, min_len=1, tree=True, costs=free).propose(ctx, 4).tokens.tolist() == [3, 5, 4, 6]
    reduced = RetrievalDrafter(st, min_len=1, tree=True, costs=dear)
    assert reduced.propose(ctx, 4).tokens.tolist() == [3] and reduced.extra_stats()["tree_nodes_proposed"] == 4


# ----------------------------------------------------------------------------- lossless
def drafters_for(model, plain_ids):
    # A corpus that holds most of the answer, with some tokens changed: drafts are accepted in part.
    noisy = [t if i % 7 else (t + 1) % 160 for i, t in enumerate(plain_ids)]
    st = store_of([PROMPT + noisy, [3, 4, 5]], model=model)
    n = model.config.n_layers
    auto_arms = [NgramDrafter(adaptive=False), AdaptiveNgramDrafter(adaptive=False),
                 RetrievalDrafter(st, adaptive=False),
                 LayerSkipDrafter(SkipConfig(model=model.name, n_layers=n, attention=(1,)), max_draft=4)]
    free = CostModel([0.05] * 9, source="synthetic")
    return {"ngram-lookup": NgramDrafter(), "ngram-adaptive": AdaptiveNgramDrafter(),
            "ngram-adaptive-1": AdaptiveNgramDrafter(ngram_max=3, ngram_min=1, max_draft=5),
            "retrieval": RetrievalDrafter(st),
            "retrieval-tree": RetrievalDrafter(st, tree=True, tree_nodes=12),
            "retrieval-tree-full": RetrievalDrafter(st, tree=True, tree_nodes=12, tree_reduce=False),
            "auto": AutoDrafter(auto_arms, free, draft_cost_guess={a.name: 0.0 for a in auto_arms})}


@pytest.mark.parametrize("fixture", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["ngram-lookup", "ngram-adaptive", "ngram-adaptive-1", "retrieval",
                                  "retrieval-tree", "retrieval-tree-full", "auto"])
def test_greedy_lossless(fixture, name, request):
    model = request.getfixturevalue(fixture)
    plain = generate(model, PROMPT, max_new_tokens=40)
    drafter = drafters_for(model, plain.token_ids)[name]
    spec = generate(model, PROMPT, max_new_tokens=40, drafter=drafter)
    assert_lossless(plain.token_ids, spec.token_ids, name)
    assert spec.stats.drafted > 0, name
    if name in ("retrieval", "retrieval-tree", "retrieval-tree-full", "auto"):
        assert spec.stats.accepted > 0  # the corpus holds the answer


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("wide"), ctx_size=64)


@pytest.mark.parametrize("name", ["ngram-adaptive", "retrieval"])
def test_sampled_matches_target_distribution(wide, name):
    """As tests/test_speculative.py: the second token's distribution against the exact one. The
    prompt starts with the 50 likeliest first tokens and the store holds every token, so that for
    most first tokens the drafters match it and draft the second."""
    params = SAMPLING_CASES["temperature-1"]
    likely = exact_second_token(wide, PROMPT[:5], params).topk(50).indices.sort().values.tolist()
    prompt = likely + PROMPT[:6]
    corpus = [[t, (3 * t + 1) % 160, (5 * t + 2) % 160] for t in range(160)]
    p = exact_second_token(wide, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    drafter = {"ngram-adaptive": AdaptiveNgramDrafter(ngram_min=1, max_draft=3),
               "retrieval": RetrievalDrafter(store_of(corpus, model=wide), min_len=1, max_draft=3)}[name]
    proposals = []
    propose = drafter.propose
    drafter.propose = lambda ctx, k: proposals.append(propose(ctx, k)) or proposals[-1]
    counts = second_token_samples(wide, prompt, params, drafter, N_SAMPLES)
    assert sum(len(d) > 0 for d in proposals) > 0.2 * N_SAMPLES  # the drafts were there to be checked
    tv = total_variation(counts, p)
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


# ----------------------------------------------------------------------------- auto
class Grounded(CappedDrafter):
    """A grounded drafter whose match length the test sets; proposes 4 zeros (none at level 0)."""

    name = "grounded"

    def __init__(self):
        super().__init__(max_draft=4, adaptive=False)
        self.level = 0

    def propose(self, ctx, max_tokens):
        self.last_level = self.level
        return Draft(torch.zeros(min(self.cap, max_tokens) if self.level else 0, dtype=torch.long))


class ModelArm(CappedDrafter):
    """A model drafter (no `last_level`: judged by its overall acceptance); proposes ones."""

    name = "model-arm"

    def __init__(self):
        super().__init__(max_draft=8, adaptive=False)
        del self.last_level

    def propose(self, ctx, max_tokens):
        return Draft(torch.ones(max_tokens, dtype=torch.long))


def test_auto_judges_grounded_drafts_by_match_length():
    """Level-4 matches are always accepted, level-1 matches never: after a few rounds auto takes
    the grounded draft at level 4 and the model drafter's at level 1."""
    g = Grounded()
    costs = CostModel([0.05 * (1 + 0.05 * k) for k in range(9)], source="synthetic")
    auto = AutoDrafter([g, ModelArm()], costs, draft_cost_guess={"grounded": 0.0, "model-arm": 0.2 * 0.05})
    for r in range(40):
        g.level = 4 if r % 2 else 1
        d = auto.propose(None, 8)
        chosen = auto._arm.name if auto._arm else "none"
        if chosen == "grounded":
            auto.update(len(d) if g.level == 4 else 0, len(d))
        else:
            auto.update(len(d) // 2, len(d))  # the model arm: half its drafts
    levels = auto.arms[0].levels
    assert levels[4].rate > 0.9 and levels[1].rate < 0.3
    g.level = 4
    auto.propose(None, 8)
    assert auto._arm.name == "grounded"
    auto.update(4, 4)
    g.level = 1
    auto.propose(None, 8)
    assert auto._arm.name == "model-arm"
    auto.update(0, 8)
    g.level = 0  # no match at all: the model arm
    auto.propose(None, 8)
    assert auto._arm.name == "model-arm"


def test_auto_for_model_has_the_new_arms(llama, tmp_path):
    st = store_of([[1, 2, 3]], model=llama)
    st.save(tmp_path / "s")
    costs = CostModel([0.05] * 9, source="synthetic")
    names = [a.name for a in AutoDrafter.for_model(llama, costs=costs).arms]
    assert names[:2] == ["ngram", "ngram-adaptive"] and "retrieval" not in names
    names = [a.name for a in AutoDrafter.for_model(llama, costs=costs, datastore=str(tmp_path / "s")).arms]
    assert "retrieval" in names


# ----------------------------------------------------------------------------- names and CLI
def test_method_options_for_the_new_drafters(llama, tmp_path):
    specs = parse_methods("ngram:mode=adaptive,max_draft=5,retrieval:store=/x,ngram")
    assert [(s.kind, s.options) for s in specs] == [
        ("ngram", {"ngram_mode": "adaptive", "max_draft": 5}), ("retrieval", {"datastore": "/x"}), ("ngram", {})]
    with pytest.raises(InvalidParameterError, match="lookup, adaptive"):
        parse_methods("ngram:mode=fast")
    d = build_drafter("ngram", llama, ngram_mode="adaptive", max_draft=5)
    assert isinstance(d, AdaptiveNgramDrafter) and d.max_draft == 5 and d.index.levels == (4, 3, 2)
    assert isinstance(build_drafter("ngram", llama), NgramDrafter)
    store_of([[1, 2, 3]], model=llama).save(tmp_path / "s")
    assert isinstance(build_drafter("retrieval", llama, datastore=str(tmp_path / "s")), RetrievalDrafter)


def test_datastore_build_cli(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (corpus / "b.bin").write_bytes(b"\xff\xfe\x00binary")
    (corpus / ".hidden").write_text("skipped")
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "datastore", "build", "--model", "smollm2-135m",
                           "--corpus", str(corpus), "--out", str(tmp_path / "store"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["files"] == 1 and report["n_skipped"] == 1 and report["tokens"] > 100
    assert "built in" in proc.stderr
    st = Datastore.load(tmp_path / "store")
    assert st.meta["model"] == "smollm2-135m" and np.all(st.tokens[st.suffixes[:-1]] <= st.tokens[st.suffixes[1:]])
    bad = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "datastore", "build", "--corpus", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_datastore_flag_needs_a_drafter_that_reads_it():
    proc = subprocess.run([sys.executable, "-m", "selfspec.cli.main", "generate", "--prompt", "hi", "--draft", "ngram",
                           "--datastore", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--datastore is for --draft retrieval" in proc.stderr
