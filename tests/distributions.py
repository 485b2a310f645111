"""Shared by the tests of the speculative loop and of the drafters: tiny-model fixtures (import
them into a test module to use them there), a scripted drafter, and the exact-vs-sampled check of
speculative sampling's output distribution (DESIGN.md: losslessness under sampling is tested
statistically)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from selfspec.drafters.base import EMPTY, Draft, DraftContext
from selfspec.generation import generate
from selfspec.sampling import SamplingParams, make_generator, presence_mask, probs_from_logits
from tiny import one_thread, tiny_model

PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8]


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


def second_token_samples(model, prompt, params, drafter, n):
    gen_params = dataclasses.replace(params, seed=None)
    out = torch.zeros(model.config.vocab_size)
    g = make_generator(1234)
    for i in range(n):
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        r = generate(model, prompt, max_new_tokens=3, drafter=drafter,
                     sampling=dataclasses.replace(gen_params, seed=seed))
        out[r.token_ids[1]] += 1
    return out


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
N_SAMPLES = 2000


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """The tiny Llama: ~13 effective next tokens at temperature 1. With attention 1 skipped, its
    draft differs from the target by TV ~0.7 per position, and resampling from p instead of the
    residual moves the second token's distribution by TV ~0.1 (computed exactly), far above the
    noise floor of 2000 samples (~0.03)."""
    return tiny_model("llama", tmp_path_factory.mktemp("peaky"), ctx_size=64)
