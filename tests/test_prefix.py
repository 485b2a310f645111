"""Prompt-prefix KV reuse (selfspec/prefix.py) on tiny random models: a request sharing a prefix
with an earlier sequence processes only its suffix (counted at the decoder) and gives the output of
a cold run, with sliding windows, every kind of drafter and sampling; copies within a budget (LRU);
a foreign use of the model's cache or an interrupted generation never leaves stale KV in use."""
from __future__ import annotations

import pytest
import torch

from lossless import truncated_copy
from selfspec.drafters.draft_model import DraftModelDrafter
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import NgramDrafter
from selfspec.generation import generate, stream
from selfspec.prefix import PrefixCache, common_prefix
from selfspec.sampling import SamplingParams
from tiny import WINDOW, one_thread, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma3"])
def model(request, tmp_path_factory):
    """Llama (global attention), Mistral (every layer a window of 8), Gemma-3 (local + global)."""
    return tiny_model(request.param, tmp_path_factory.mktemp(request.param), ctx_size=128)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Counter:
    """Wraps the decoder's forward and records (start, tokens) of every call."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        forward = model.transformer.forward

        def counted(tokens, start, cache, **kw):
            self.calls.append((start, int(tokens.shape[0])))
            return forward(tokens, start, cache, **kw)

        monkeypatch.setattr(model.transformer, "forward", counted)


def _drafter(kind: str, model):
    if kind == "none":
        return None
    if kind == "ngram":
        return NgramDrafter()
    if kind == "layer-skip":  # writes draft KV into the shared cache beyond the pending token
        return LayerSkipDrafter(SkipConfig(model=model.name, n_layers=4, attention=(1,), mlp=(2,)), max_draft=4)
    return DraftModelDrafter(truncated_copy(model, 2), max_draft=3)  # keeps its own KV, re-synced


@pytest.mark.parametrize("kind", ["none", "ngram", "layer-skip", "model"])
def test_second_turn_processes_only_its_suffix_and_equals_a_cold_run(model, kind, monkeypatch):
    drafter = _drafter(kind, model)
    prefix = PrefixCache(model)
    first = _ids(3 * WINDOW, seed=1)  # crosses the sliding window
    one = generate(model, first, drafter=drafter, max_new_tokens=12, prefix=prefix)
    assert one.stats.extras["cached_prompt_tokens"] == 0 and one.stats.extras["prefill_tokens"] == len(first)
    held = list(prefix.tokens)
    assert held[: len(first) + 11] == first + one.token_ids[:11]  # the prompt and the output but the pending token
    second = first + one.token_ids + _ids(5, seed=2)
    counter = Counter(model, monkeypatch)
    warm = generate(model, second, drafter=drafter, max_new_tokens=16, prefix=prefix)
    reused = common_prefix(held, second, len(second) - 1)
    assert reused >= len(first) + len(one.token_ids) - 1
    assert warm.stats.extras["cached_prompt_tokens"] == reused
    assert warm.stats.extras["prefill_tokens"] == len(second) - reused
    assert counter.calls[0] == (reused, len(second) - reused)  # what the decoder really processed
    monkeypatch.undo()
    cold = generate(model, second, drafter=drafter, max_new_tokens=16)
    assert warm.token_ids == cold.token_ids and len(cold.token_ids) == 16


def test_suffix_prefill_logits_match_a_whole_prefill(model):
    """The KV of a shared prefix is what a cold prefill computes (to summation order)."""
    tr = model.transformer
    seq = torch.tensor(_ids(40, seed=3))
    whole = tr.forward(seq, 0, tr.new_cache(64))
    cache = tr.new_cache(64)
    tr.forward(seq[:27], 0, cache)
    part = tr.forward(seq[27:], 27, cache)
    assert (part - whole[27:]).abs().max().item() < 1e-4
    assert torch.equal(part.argmax(-1), whole[27:].argmax(-1))


def test_sampled_generation_reuses_and_reproduces(model):
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=7)
    prefix = PrefixCache(model)
    base = _ids(20, seed=4)
    generate(model, base, sampling=sampling, max_new_tokens=6, prefix=prefix)
    second = base + _ids(6, seed=5)
    warm = generate(model, second, sampling=sampling, drafter=NgramDrafter(), max_new_tokens=12, prefix=prefix)
    assert warm.stats.extras["cached_prompt_tokens"] == 20
    cold = generate(model, second, sampling=sampling, drafter=NgramDrafter(), max_new_tokens=12)
    assert warm.token_ids == cold.token_ids


def test_identical_prompt_reprocesses_only_its_last_token(model):
    prefix = PrefixCache(model)
    prompt = _ids(24, seed=6)
    a = generate(model, prompt, max_new_tokens=5, prefix=prefix)
    b = generate(model, prompt, max_new_tokens=5, prefix=prefix)
    assert b.stats.extras["cached_prompt_tokens"] == 23 and b.stats.extras["prefill_tokens"] == 1
    assert a.token_ids == b.token_ids


def test_foreign_use_of_the_cache_is_never_trusted(model):
    prefix = PrefixCache(model)  # no budget: nothing stored, only the live cache
    prompt = _ids(24, seed=8)
    generate(model, prompt, max_new_tokens=4, prefix=prefix)
    other = generate(model, _ids(30, seed=9), max_new_tokens=4)  # model.fresh_cache(): resets and overwrites
    again = generate(model, prompt + [1, 2], max_new_tokens=4, prefix=prefix)
    assert again.stats.extras["cached_prompt_tokens"] == 0
    assert again.token_ids == generate(model, prompt + [1, 2], max_new_tokens=4).token_ids
    assert other.stats.extras["cached_prompt_tokens"] == 0


def test_interrupted_generation_leaves_only_valid_kv(model):
    drafter = LayerSkipDrafter(SkipConfig(model=model.name, n_layers=4, attention=(1,), mlp=(2,)), max_draft=4)
    prefix = PrefixCache(model)
    prompt = _ids(22, seed=10)
    gen = stream(model, prompt, drafter=drafter, max_new_tokens=40, prefix=prefix)
    it = iter(gen)
    got = next(it).token_ids + next(it).token_ids
    it.close()  # a client that left, or Ctrl-C between rounds
    assert prefix.tokens[: len(prompt)] == prompt and len(prefix.tokens) >= len(prompt) + len(got) - 1
    follow = prompt + got + _ids(3, seed=11)
    warm = generate(model, follow, drafter=drafter, max_new_tokens=10, prefix=prefix)
    assert warm.stats.extras["cached_prompt_tokens"] >= len(prompt) + len(got) - 1
    assert warm.token_ids == generate(model, follow, drafter=drafter, max_new_tokens=10).token_ids


def test_stored_copies_lru_within_the_budget(model):
    tr = model.transformer
    c = model.config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * tr.dtype.itemsize
    prefix = PrefixCache(model, budget_bytes=70 * per_token)  # room for two 30-token sequences, not three
    convs = {name: _ids(26, seed=20 + i) for i, name in enumerate("abc")}
    outs = {}
    for name, ids in convs.items():  # each new conversation pushes the previous live one into the store
        outs[name] = generate(model, ids, max_new_tokens=5, prefix=prefix).token_ids
        assert prefix.stored_bytes <= prefix.budget
    assert [e.tokens[:26] for e in prefix.stored.values()] == [convs["a"], convs["b"]]
    # Back to conversation a: its KV comes back from the store (copied into the live cache).
    follow = convs["a"] + outs["a"] + [3, 4]
    warm = generate(model, follow, max_new_tokens=6, prefix=prefix)
    assert warm.stats.extras["cached_prompt_tokens"] >= 26 + 5 - 1
    assert prefix.stored_bytes <= prefix.budget
    # c (live until now) was stored, which evicted b, the least recently used.
    assert [e.tokens[:26] for e in prefix.stored.values()] == [convs["a"], convs["c"]]
    assert warm.token_ids == generate(model, follow, max_new_tokens=6).token_ids
    b = generate(model, convs["b"] + [5], max_new_tokens=3, prefix=prefix)
    assert b.stats.extras["cached_prompt_tokens"] == 0  # evicted: processed cold, still right
    assert b.token_ids == generate(model, convs["b"] + [5], max_new_tokens=3).token_ids


def test_a_sequence_larger_than_the_budget_is_not_stored(model):
    prefix = PrefixCache(model, budget_bytes=1000)
    generate(model, _ids(20, seed=30), max_new_tokens=3, prefix=prefix)
    generate(model, _ids(20, seed=31), max_new_tokens=3, prefix=prefix)
    assert not prefix.stored and prefix.stored_bytes == 0
    with pytest.raises(ValueError):
        PrefixCache(model, budget_bytes=-1)
