"""Shared by the tests of the speculative loop and of the drafters: tiny-model fixtures (import
them into a test module to use them there), a scripted drafter, and the exact-vs-sampled check of
speculative sampling's output distribution (DESIGN.md: losslessness under sampling is tested
statistically)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from selfspec.drafters.base import EMPTY, Draft, DraftContext, declared
import selfspec.generation as loop  # the loop's own functions, looked up at call time (monkeypatches apply)
from selfspec.generation import generate
from selfspec.sampling import SamplingParams, make_generator, presence_mask, probs_from_logits, sample
from tiny import one_thread, tiny_model

PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8]
E2E_SEEDS = 10  # seeds on which each replay is checked equal to generate()


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("llama"), ctx_size=128)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return tiny_model("gemma3", tmp_path_factory.mktemp("gemma3"), ctx_size=128)


class StubDrafter:
    """The Drafter protocol's bookkeeping as no-ops, for test drafters that only propose."""

    def update(self, accepted, proposed):
        pass

    def reset(self):
        pass

    def extra_stats(self):
        return {}


class ScriptedDrafter(StubDrafter):
    """Proposes from a fixed continuation: right tokens (oracle), or wrong ones (garbage)."""

    name = "scripted"

    def __init__(self, prompt_len: int, script: list[int], k: int, corrupt: bool = False, vocab: int = 160):
        self.prompt_len, self.script, self.k, self.corrupt, self.vocab = prompt_len, script, k, corrupt, vocab
        self.rounds = 0

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        self.rounds += 1
        done = len(ctx.tokens) - self.prompt_len
        toks = self.script[done: done + min(self.k, max_tokens)]
        if self.corrupt or (self.corrupt is None and self.rounds % 2):
            toks = [(t + 1) % self.vocab for t in toks]
        return Draft(torch.tensor(toks, dtype=torch.long))

    def reset(self):
        self.rounds = 0


def exact_second_token(model, prompt, params):
    """P(second generated token) = sum_t1 P(t1) P(t2 | t1), computed exactly (vocab is tiny)."""
    tr = model.transformer
    vocab = model.config.vocab_size
    cache = tr.new_cache(64)
    seen = presence_mask(torch.tensor(prompt), EMPTY, vocab)
    p1 = probs_from_logits(tr.forward(torch.tensor(prompt), 0, cache, last_only=True), params, seen)[0]
    total = torch.zeros_like(p1)
    for t1 in torch.nonzero(p1 > 0).flatten().tolist():
        cache.rollback(len(prompt))
        seen2 = presence_mask(torch.tensor(prompt + [t1]), EMPTY, vocab)
        p2 = probs_from_logits(tr.forward(torch.tensor([t1]), len(prompt), cache), params, seen2)[0]
        total += p1[t1] * p2
    return total


def exact_pairs(model, prompt, params) -> dict[tuple[int, int], float]:
    """P(2nd, 3rd generated token) = sum_t1 P(t1) P(t2 | t1) P(t3 | t1, t2), exactly: the pair
    covers a tree's first level and (when it was accepted) its second, or a chain's first two
    drafts (the second scored with the first in the penalty's history). Keep the top-k small."""
    tr, vocab = model.transformer, model.config.vocab_size

    def dist(ids):
        logits = tr.forward(torch.tensor(ids), 0, tr.new_cache(len(ids)), last_only=True)
        return probs_from_logits(logits, params, presence_mask(torch.tensor(ids), EMPTY, vocab))[0]

    pairs: dict[tuple[int, int], float] = {}
    p1 = dist(prompt)
    for t1 in torch.nonzero(p1 > 0).flatten().tolist():
        p2 = dist(prompt + [t1])
        for t2 in torch.nonzero(p2 > 0).flatten().tolist():
            p3 = dist(prompt + [t1, t2])
            for t3 in torch.nonzero(p3 > 0).flatten().tolist():
                key = (t2, t3)
                pairs[key] = pairs.get(key, 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    return pairs


class ReplaySampler:
    """The first `n_tokens` tokens of `generate(model, prompt, max_new_tokens, drafter=drafter,
    sampling=params with seed)`, for many seeds, without re-running what does not depend on the
    seed. It replays the decode loop's rounds through the loop's own pure functions
    (`target_choice`, `verify_chain` / `verify_tree`) and the drafter's real `reset` / `propose` /
    `update`, on one cache:

      * the prefill (the target's p after the prompt) is computed once;
      * the first token is `verify_chain` of an empty draft, as in the loop;
      * each round the drafter proposes from a DraftContext like the loop's (the cache holds the
        KV of the sequence but its pending last token; `hidden` for draft heads in round 2);
      * the target's verify forward of [pending token, drafts] (a chain, or a tree with its
        layout) is memoised row by row per path (`_logits`), and so is the KV of each committed
        sequence (put back with `KVCache.restore`): the forward is row-invariant, so memoised
        logits and KV are bit-identical to fresh ones; the penalised p comes from `target_choice`
        with the round's drafts (or tree layout) on those logits, exactly as in the loop;
      * `verify_chain` / `verify_tree` decides, and `drafter.update` hears the verdict.

    The generator calls are the loop's, in the loop's order, so `sample(seed)` equals generate()'s
    first tokens for the same seed: `check_against_generate` asserts it on a few seeds (the
    end-to-end wiring: penalty, residual, bonus token), and the statistics run on the replay.

    `memo_drafts=True` also memoises the drafter's q per context (for drafters whose q is a pure
    function of the context: layer skipping, quantized drafts, draft heads) and draws the draft
    token from that q with the round's generator, as `DraftContext.choose` does; the first
    propose() per context is the drafter's own. Then only the verifier runs per sample. That the
    drafter really samples from the q it reports is checked by `assert_draws_follow_q` and by the
    equality with generate() (there the drafter samples itself)."""

    def __init__(self, model, prompt, params, drafter, memo_drafts: bool = False, max_new_tokens: int = 3,
                 n_tokens: int = 2):
        self.model, self.prompt, self.drafter, self.memo_drafts = model, list(prompt), drafter, memo_drafts
        self.max_new_tokens, self.n_tokens = max_new_tokens, n_tokens
        self.params = dataclasses.replace(params, seed=None)
        tr = model.transformer
        self.cache = tr.new_cache(model.ctx_size)  # our own: generate() reuses the model's
        self.wants_hidden = drafter is not None and bool(declared(drafter, "wants_hidden"))
        assert not (self.wants_hidden and n_tokens > 2), "hidden states are replayed for round 2 only"
        kw = {"return_hidden": True} if self.wants_hidden else {}
        out = tr.forward(torch.tensor(self.prompt), 0, self.cache, last_only=True, **kw)
        logits, self.hidden = out if self.wants_hidden else (out, None)
        self.first = loop.target_choice(logits, self.params, self.prompt)
        self.choices: dict[tuple, object] = {}  # (tokens after the prompt, drafts, parents) -> the target's choice
        self.drafts: dict[tuple, Draft] = {}  # memo_drafts: context -> the drafter's Draft (its q)
        self.kv: dict[tuple, tuple] = {}  # committed tokens after the prompt -> the cache's k, v
        self.rows: dict[tuple, torch.Tensor] = {}  # a verify row's path after the prompt -> its logits

    def _hold(self, committed: tuple) -> None:
        """Make the cache hold the KV of prompt + committed (the loop's cache at a round's start)."""
        base, n = len(self.prompt), len(self.prompt) + len(committed)
        if not committed:
            self.cache.rollback(base)
            return
        saved = self.kv.get(committed)
        if saved is None:
            self._hold(committed[:-1])
            self.model.transformer.forward(torch.tensor([committed[-1]]), n - 1, self.cache)
            self.kv[committed] = (self.cache.k[:, :, :n].clone(), self.cache.v[:, :, :n].clone())
        else:
            self.cache.rollback(base)
            self.cache.restore(n, *saved, start=base)

    def _logits(self, tokens, drafts, layout, start) -> torch.Tensor:
        """The verify forward's logits `[k+1, vocab]` over [pending token, drafts] (a chain, or a
        tree by `layout`). A row's logits depend only on the tokens of its own path (the forward
        is row-invariant and a tree row sees only its ancestors: tests above check both), so rows
        are memoised per path and the forward runs only when a row is new."""
        after = tuple(tokens[len(self.prompt):])
        if layout is None:
            paths = [after + tuple(drafts[:r]) for r in range(len(drafts) + 1)]
        else:
            paths = [after + tuple(drafts[x - 1] for x in layout.path(r)) for r in range(len(drafts) + 1)]
        if not all(p in self.rows for p in paths):
            kw = {} if layout is None else {"tree": layout}
            logits = self.model.transformer.forward(torch.tensor([tokens[-1]] + drafts), start, self.cache, **kw)
            self.cache.rollback(start)
            for p, row in zip(paths, logits):
                self.rows.setdefault(p, row)
        return torch.stack([self.rows[p] for p in paths])

    def _propose(self, ctx, room, generator) -> Draft:
        if not self.memo_drafts:
            return self.drafter.propose(ctx, room)
        key = (tuple(ctx.tokens), room)
        draft = self.drafts.get(key)
        if draft is None:
            draft = self.drafts[key] = self.drafter.propose(ctx, room)
            return draft
        if draft.q_draft is None or len(draft) == 0:
            return draft
        # Rows after the first depend on the drafted prefix: only one row is memoisable as is.
        assert len(draft) == 1 and draft.parents is None, "memo_drafts replays one-token chains only"
        return Draft(sample(draft.q_draft, generator), draft.q_draft)

    def sample(self, seed: int) -> tuple[int, ...]:
        model, prompt, params, drafter, cache = self.model, self.prompt, self.params, self.drafter, self.cache
        vocab = model.config.vocab_size
        generator = make_generator(seed)
        sampling = dataclasses.replace(params, seed=seed)
        if drafter is not None:
            drafter.reset()
        out = [int(loop.verify_chain(EMPTY, None, self.first, generator).tokens[0])]
        tokens = prompt + out
        while len(out) < self.n_tokens:
            start = len(tokens) - 1
            self._hold(tuple(tokens[len(prompt): start]))
            hidden = self.wants_hidden and len(out) == 1
            ctx = DraftContext(model=model, cache=cache, tokens=tokens, sampling=sampling, generator=generator,
                               hidden=self.hidden[0] if hidden else None, hidden_for=len(tokens) if hidden else -1)
            room = min(self.max_new_tokens - len(out) - 1, cache.max_len - len(tokens))
            draft = Draft(EMPTY)
            if drafter is not None and room > 0:
                draft = self._propose(ctx, room, generator)
                cache.rollback(start)
            drafts = draft.tokens.tolist()
            key = (tuple(tokens[len(prompt):]), tuple(drafts), None if draft.parents is None else tuple(draft.parents.tolist()))
            choice = self.choices.get(key)
            layout = loop.check_tree(draft, vocab) if draft.parents is not None else None
            if choice is None:
                logits = self._logits(tokens, drafts, layout, start)
                choice = self.choices[key] = loop.target_choice(logits, params, tokens, draft.tokens, layout)
            if layout is not None:
                verdict = loop.verify_tree(layout, draft, choice, generator)
            else:
                verdict = loop.verify_chain(draft.tokens, draft.q_draft, choice, generator)
            if drafter is not None:
                drafter.update(verdict.accepted, len(draft))
            new = verdict.tokens.tolist()
            out += new
            tokens = tokens + new
        return tuple(out[: self.n_tokens])

    def check_against_generate(self, seeds, twin=None) -> None:
        """The replay is the decode loop: generate()'s first tokens for the same seeds. generate()
        runs with `twin(drafter)` (e.g. copy.deepcopy: a copy in the drafter's current state, for
        drafters whose state changes what they propose, such as online optimisation), by default
        with the drafter itself."""
        for seed in seeds:
            other = self.drafter if twin is None else twin(self.drafter)
            r = generate(self.model, self.prompt, max_new_tokens=self.max_new_tokens, drafter=other,
                         sampling=dataclasses.replace(self.params, seed=seed))
            assert tuple(r.token_ids[: self.n_tokens]) == self.sample(seed), f"replay differs from generate() at seed {seed}"


def seeds(n: int, start: int = 1234) -> list[int]:
    g = make_generator(start)
    return torch.randint(0, 2**31, (n,), generator=g).tolist()


def second_token_samples(model, prompt, params, drafter, n, memo_drafts=False, check=E2E_SEEDS, twin=None):
    """Counts of the second generated token over n seeds (the replay of `ReplaySampler`), after
    checking on `check` other seeds that the replay equals generate() (`twin`: see there)."""
    sampler = ReplaySampler(model, prompt, params, drafter, memo_drafts)
    sampler.check_against_generate(seeds(check, start=99), twin)
    out = torch.zeros(model.config.vocab_size)
    for seed in seeds(n):
        out[sampler.sample(seed)[1]] += 1
    return out


def pair_tv(model, prompt, params, drafter, n, max_new_tokens=16):
    """(TV, noise floor, samples of pairs the target cannot produce) of the (2nd, 3rd) tokens of n
    replayed generations against `exact_pairs`, after checking the replay equal to generate() on
    E2E_SEEDS other seeds."""
    exact = exact_pairs(model, prompt, params)
    sampler = ReplaySampler(model, prompt, params, drafter, max_new_tokens=max_new_tokens, n_tokens=3)
    sampler.check_against_generate(seeds(E2E_SEEDS, start=99))
    counts: dict[tuple[int, int], int] = {}
    for seed in seeds(n):
        key = sampler.sample(seed)[1:]
        counts[key] = counts.get(key, 0) + 1
    impossible = sum(c for k, c in counts.items() if k not in exact)
    keys = list(exact) + [k for k in counts if k not in exact]
    p = torch.tensor([exact.get(k, 0.0) for k in keys])
    c = torch.tensor([float(counts.get(k, 0)) for k in keys])
    return total_variation(c, p), noise_floor(p, n), impossible


def assert_draws_follow_q(model, prompt, params, drafter, n=400):
    """The drafter's token at one context follows the q it reports (and reports the same q every
    time): TV of n draws against q within its noise floor. A drafter that reports a q it did not
    sample from fails here even where memo_drafts replays q."""
    sampler = ReplaySampler(model, prompt, params, drafter)
    cache, t1 = sampler.cache, int(sampler.first.p[0].argmax())
    tokens = list(prompt) + [t1]
    counts, q0 = torch.zeros(model.config.vocab_size), None
    for seed in seeds(n, start=7):
        cache.rollback(len(prompt))
        drafter.reset()
        ctx = DraftContext(model=model, cache=cache, tokens=tokens, sampling=dataclasses.replace(params, seed=seed),
                           generator=make_generator(seed))
        draft = drafter.propose(ctx, 1)
        assert len(draft) == 1 and draft.q_draft is not None
        q0 = draft.q_draft[0] if q0 is None else q0
        assert torch.equal(draft.q_draft[0], q0), "q changed between proposals from one context"
        counts[int(draft.tokens[0])] += 1
    assert float(q0[counts > 0].min()) > 0, "a draft token q gives no mass"
    tv, floor = total_variation(counts, q0), noise_floor(q0, n)
    assert tv < 1.6 * floor + 0.01, f"draft tokens vs the reported q: TV {tv:.4f}, floor {floor:.4f}"


def noise_floor(p, n):
    """E[TV] of n multinomial draws from p is about sum_i sqrt(p_i (1 - p_i) / (2 pi n))."""
    return float(torch.sqrt(p * (1 - p) / (2 * torch.pi * n)).sum())


def total_variation(counts, p):
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


SAMPLING_CASES = {
    "temperature-1": SamplingParams(temperature=1.0),
    "top-k": SamplingParams(temperature=0.8, top_k=20),
    "top-p": SamplingParams(temperature=1.0, top_p=0.8),
    "min-p": SamplingParams(temperature=1.0, min_p=0.1),
    # The penalty at each drafted position must see the earlier drafts of the same round; the
    # prompt repeats tokens 5 and 17, so the penalty changes the distribution.
    "repetition-penalty": SamplingParams(temperature=1.0, repetition_penalty=1.5),
}
# The second token's TV against the exact distribution is compared with 1.6 x the noise floor
# (`noise_floor`) + 0.01. On `peaky` at temperature 1 the floor of 3000 samples is ~0.042
# (threshold ~0.077); a correct verifier measures ~0.03, a verifier that resamples from p instead
# of the residual ~0.125 (test_distribution_check_catches_a_broken_residual). 3000 replayed
# samples cost ~1 s where 2000 generate() calls cost ~40 s.
N_SAMPLES = 3000


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """The tiny Llama: ~13 effective next tokens at temperature 1. With attention 1 skipped, its
    draft differs from the target by TV ~0.7 per position, and resampling from p instead of the
    residual moves the second token's distribution by TV ~0.1, far above the noise floor of
    N_SAMPLES (see there)."""
    return tiny_model("llama", tmp_path_factory.mktemp("peaky"), ctx_size=64)
