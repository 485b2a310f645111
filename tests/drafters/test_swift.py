"""On-the-fly layer skipping (`--skip-config online`, SWIFT): lossless greedy and sampled while the
skip set changes under it, matchness against an explicit per-position computation, the cache left
bit-identical, the stop rules, the per-model cache and the saved config, spec parsing, the CLI."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from lossless import assert_lossless
from selfspec.drafters.base import DraftContext
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.swift import OnlineSettings, OnlineSkipDrafter, UcbGp, _random_rows, _swaps, cache_file
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.drafters.factory import build_drafter
from selfspec.models.transformer import SkipSet
from selfspec.sampling import SamplingParams, make_generator
from selfspec.search.study import model_identity
from distributions import (N_SAMPLES, PROMPT, SAMPLING_CASES, exact_second_token, gemma3, llama,  # noqa: F401
                              noise_floor, peaky, second_token_samples, total_variation)
from tiny import build_tiny_chat, one_thread

# Small enough for tiny models: a window the prompt fills, GP proposals every third iteration.
SPEC = "online:window=8:ratio=0.5:bayes_every=3:max_iter=12:patience=100:threshold=1"


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    yield from one_thread()


# ---------------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("fixture", ["llama", "gemma3"])
def test_greedy_output_equals_plain_while_optimising(fixture, request):
    model = request.getfixturevalue(fixture)
    plain = generate(model, PROMPT, max_new_tokens=40)
    drafter = build_drafter("layer-skip", model, skip_config=SPEC, max_draft=4)
    assert isinstance(drafter, OnlineSkipDrafter)
    spec = generate(model, PROMPT, max_new_tokens=40, drafter=drafter)
    assert_lossless(plain.token_ids, spec.token_ids, fixture)
    s = spec.stats.extras
    # The optimisation ran inside this generation and ended: at the cap, GP proposals included (the
    # tiny Gemma-3 repeats itself: its first set already matches on every position).
    assert s["phase"] == "accelerate" and s["iterations_this_request"] >= 1
    if fixture == "llama":
        assert s["iterations_this_request"] == 12 and s["gp_proposals"] >= 2 and s["best_matchness"] < 1
    assert s["found_by"] == "online" and 0 < s["optimise_seconds"] <= spec.stats.draft_seconds
    assert spec.stats.drafted > 0
    again = generate(model, PROMPT, max_new_tokens=40, drafter=drafter)  # acceleration phase
    assert_lossless(plain.token_ids, again.token_ids, fixture)
    assert again.stats.extras["iterations_this_request"] == 0


@pytest.mark.slow  # ~20 s per case; the layer-skip drafting it reuses is distribution-tested in make test
@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_matches_target_distribution_while_optimising(peaky, case):
    """test_speculative's distribution check with the online drafter: window 2, so every sample's
    generation runs optimisation iterations (the set changes between samples) before drafting, so
    every sample proposes afresh (no memoised q): ~7 ms a sample, ~20 s for N_SAMPLES, hence
    `make test-full` only."""
    params = SAMPLING_CASES[case]
    prompt = PROMPT[:5]
    p = exact_second_token(peaky, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    drafter = OnlineSkipDrafter(peaky, OnlineSettings(window=2, skip_ratio=0.2, max_iter=10**6, patience=10**6,
                                                      bayes_every=50, cache=False), max_draft=2)
    drafter.exit.gamma, drafter.exit.adaptive = 0.0, False
    # The skip set changes between samples: generate() runs with a copy in the same state.
    counts = second_token_samples(peaky, prompt, params, drafter, N_SAMPLES, twin=copy.deepcopy)
    tv = total_variation(counts, p)
    assert drafter.iterations >= N_SAMPLES and drafter.phase == "optimise"
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


# --------------------------------------------------------------------------------- matchness
def _context(model, tokens, sampling):
    """A DraftContext as the loop hands it over: the cache holds the full model's KV of all
    tokens but the pending last one."""
    cache = model.transformer.new_cache(len(tokens) + 8)
    model.transformer.forward(torch.tensor(tokens[:-1]), 0, cache)
    return DraftContext(model=model, cache=cache, tokens=list(tokens), sampling=sampling,
                        generator=make_generator(0))


def _per_position(model, tokens, start, end, skip):
    """Top-1 of the draft and of the full model at positions start..end-1, one single-token
    forward per position: the draft from the full KV of the positions before `start`, then
    its own KV (as drafting token after token does); the full model from the full KV."""
    tr = model.transformer
    draft_cache, full_cache = tr.new_cache(end + 1), tr.new_cache(end + 1)
    for cache in (draft_cache, full_cache):
        tr.forward(torch.tensor(tokens[:start]), 0, cache)
    draft, full, gaps = [], [], []
    for j in range(start, end):
        d = tr.forward(torch.tensor([tokens[j]]), j, draft_cache, skip=skip)[0]
        draft.append(int(d.argmax()))
        top2 = d.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        full.append(int(tr.forward(torch.tensor([tokens[j]]), j, full_cache)[0].argmax()))
    return torch.tensor(draft), torch.tensor(full), gaps


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0),
                                      SamplingParams(repetition_penalty=1.3)], ids=["greedy", "sampled", "penalty"])
def test_matchness_equals_a_per_position_comparison(llama, sampling):
    plain = generate(llama, PROMPT, max_new_tokens=12)
    tokens = PROMPT + plain.token_ids
    drafter = OnlineSkipDrafter(llama, OnlineSettings(window=16, cache=False))
    drafter._prompt_len = len(PROMPT)  # as at the first proposal: positions >= 8 were generated
    ctx = _context(llama, tokens, sampling)
    k, v, length = ctx.cache.k.clone(), ctx.cache.v.clone(), ctx.cache.length
    skip = SkipSet.of([1], [2])
    end = len(tokens) - 1
    start = end - 16  # the window spans prompt positions (start..7) and generated ones
    assert start < len(PROMPT) - 1
    draft_top, full_top = drafter.agreement(ctx, skip)
    # The target's cache is exactly as it was, bit for bit.
    assert torch.equal(ctx.cache.k, k) and torch.equal(ctx.cache.v, v) and ctx.cache.length == length
    ref_draft, ref_full, gaps = _per_position(llama, tokens, start, end, skip)
    assert torch.equal(full_top, ref_full)
    differ = (draft_top != ref_draft).nonzero()[:, 0].tolist()
    assert all(gaps[i] < 1e-3 for i in differ), f"parallel and sequential drafts differ at {differ}"
    assert 0 < int((draft_top == full_top).sum()) < 16  # neither trivially all nor none
    if sampling.greedy and sampling.repetition_penalty == 1.0:
        # The free path's premise: a generated token is the full model's top-1 at its position.
        assert full_top[len(PROMPT) - 1 - start:].tolist() == plain.token_ids[:end - len(PROMPT) + 1]


def test_matchness_counts_only_real_agreement(llama):
    """Skipping nothing is the full model: matchness 1 on every position."""
    tokens = PROMPT + generate(llama, PROMPT, max_new_tokens=12).token_ids
    drafter = OnlineSkipDrafter(llama, OnlineSettings(window=10, cache=False))
    drafter._prompt_len = len(PROMPT)
    draft_top, full_top = drafter.agreement(_context(llama, tokens, SamplingParams(temperature=1.0)), SkipSet())
    assert torch.equal(draft_top, full_top) and len(draft_top) == 10


# ------------------------------------------------------------------------------ stop rules
def _scripted(model, scores, **settings):
    drafter = OnlineSkipDrafter(model, OnlineSettings(window=4, cache=False, **settings), max_draft=2)
    script = iter(scores)

    def agreement(ctx, skip):
        hits = round(4 * next(script))
        return torch.tensor([1] * hits + [0] * (4 - hits)), torch.ones(4, dtype=torch.long)

    drafter.agreement = agreement
    return drafter


@pytest.mark.parametrize("scores, settings, iterations, best", [
    ([0.25, 0.5, 1.0, 0.0], dict(threshold=0.9), 3, 1.0),                 # reaches the threshold
    ([0.5, 0.25, 0.25, 0.5, 1.0], dict(patience=3), 4, 0.5),              # 3 without improvement
    ([0.25, 0.5, 0.75, 1.0], dict(max_iter=2), 2, 0.5),                   # the cap
])
def test_optimisation_stops(llama, scores, settings, iterations, best):
    drafter = _scripted(llama, scores, **settings)
    generate(llama, PROMPT, max_new_tokens=40, drafter=drafter)
    assert drafter.phase == "accelerate" and drafter.iterations == iterations and drafter.best_score == best
    assert drafter.skip == drafter.best and len(drafter.skip) == drafter.size


def test_iterations_run_every_nth_round_and_wait_for_the_window(llama, monkeypatch):
    window = len(PROMPT) + 5
    drafter = OnlineSkipDrafter(llama, OnlineSettings(window=window, every=2, cache=False), max_draft=2)
    seen = []
    monkeypatch.setattr(drafter, "_iterate", lambda ctx: seen.append((drafter._rounds, len(ctx.tokens))))
    generate(llama, PROMPT, max_new_tokens=40, drafter=drafter)
    assert seen and all(r % 2 == 1 and n - 1 >= window for r, n in seen)
    assert len(seen) >= 5


# ---------------------------------------------------------------------------- GP proposals
def test_candidate_sets_have_the_fixed_size():
    g = torch.Generator().manual_seed(0)
    rows = _random_rows(50, 10, 4, g)
    assert (rows.sum(1) == 4).all()
    swaps = _swaps(rows[0])
    assert swaps.shape == (4 * 6, 10) and (swaps.sum(1) == 4).all()
    assert ((swaps != rows[0]).sum(1) == 2).all() and len({tuple(r.tolist()) for r in swaps}) == 24


def test_gp_ucb_finds_a_good_set():
    """Score = skipped sub-layers among the first half: the posterior mean (kappa 0) must lead to
    a set at least as good as any observed, and better than a random one."""
    g = torch.Generator().manual_seed(1)
    dim, size = 20, 6
    xs = _random_rows(30, dim, size, g)
    ys = xs[:, :10].sum(1).float() / size
    best = xs[int(ys.argmax())]
    pick = UcbGp(kappa=0.0).propose(xs, ys, best, size, g)
    assert int(pick.sum()) == size
    assert float(pick[:10].sum()) / size >= float(ys.max())
    explore = UcbGp(kappa=50.0).propose(xs, ys, best, size, g)  # huge kappa: an unseen set
    assert not any(torch.equal(explore, x) for x in xs)


# ------------------------------------------------------------------------- cache and config
def test_cache_resumes_and_saved_config_is_a_normal_one(llama, tmp_path):
    first = build_drafter("layer-skip", llama, skip_config=SPEC)
    generate(llama, PROMPT, max_new_tokens=40, drafter=first)
    assert first.phase == "accelerate" and first.cache_path.is_file()
    assert first.cache_path == cache_file(*model_identity(llama), OnlineSettings.parse(SPEC), "fp32")
    second = build_drafter("layer-skip", llama, skip_config=SPEC)  # a later request: from the cache
    assert second.cached and second.phase == "accelerate" and second.skip == first.skip
    r = generate(llama, PROMPT, max_new_tokens=20, drafter=second)
    assert r.stats.extras["iterations_this_request"] == 0 and r.stats.extras["from_cache"]
    # Another skip ratio is another entry; cache=0 neither reads nor writes.
    assert not build_drafter("layer-skip", llama, skip_config=SPEC + ":ratio=0.25").cached
    fresh = build_drafter("layer-skip", llama, skip_config=SPEC + ":cache=0")
    assert not fresh.cached and fresh.cache_path is None
    # The saved state is a normal skip config that --skip-config FILE accepts.
    saved = tmp_path / "skip.json"
    second.config.save(saved)
    config = SkipConfig.load(saved)
    assert config.found_by == "online" and config.skip == first.skip and config.objective["name"] == "matchness"
    plain = generate(llama, PROMPT, max_new_tokens=20)
    static = build_drafter("layer-skip", llama, skip_config=str(saved))
    assert type(static) is LayerSkipDrafter and static.skip == first.skip
    assert generate(llama, PROMPT, max_new_tokens=20, drafter=static).token_ids == plain.token_ids
    # A damaged cache is ignored, never fatal.
    first.cache_path.write_text("{not json")
    assert not build_drafter("layer-skip", llama, skip_config=SPEC).cached


def test_optimisation_resumes_from_a_checkpoint(llama):
    """Stopped mid-optimisation (a checkpoint every bayes_every iterations), a new process goes on."""
    spec = "online:window=8:ratio=0.5:bayes_every=3:max_iter=1000:patience=1000"
    first = build_drafter("layer-skip", llama, skip_config=spec)
    generate(llama, PROMPT, max_new_tokens=12, drafter=first)
    assert first.phase == "optimise" and first.iterations >= 3
    second = build_drafter("layer-skip", llama, skip_config=spec)
    done = first.iterations - first.iterations % 3
    assert second.cached and second.phase == "optimise" and second.iterations == done
    generate(llama, PROMPT, max_new_tokens=12, drafter=second)
    assert second.iterations > done


# ------------------------------------------------------------------------------ user input
@pytest.mark.parametrize("spec, needle", [
    ("online:ratio=1.5", "ratio must be in (0, 1)"),
    ("online:window=0", "window must be >= 1"),
    ("online:speed=2", "bad option 'speed=2'"),
    ("online:ratio=x", "must be a number"),
    ("online:cache=maybe", "must be a 0 or 1"),
    ("online:threshold=2", "threshold must be in [0, 1]"),
])
def test_bad_online_specs(spec, needle):
    with pytest.raises(InvalidParameterError, match=needle.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        OnlineSettings.parse(spec)


def test_spec_options_and_other_drafters(llama):
    s = OnlineSettings.parse("online:ratio=0.3:window=32:threshold=0.9:patience=5:max_iter=9:bayes_every=4:every=2")
    assert (s.skip_ratio, s.window, s.threshold, s.patience, s.max_iter, s.bayes_every, s.every) == \
        (0.3, 32, 0.9, 5, 9, 4, 2)
    assert OnlineSettings.parse("online") == OnlineSettings()
    for draft in ("auto", "quantized"):
        with pytest.raises(InvalidParameterError, match="online is for --draft layer-skip"):
            build_drafter(draft, llama, skip_config="online")
    with pytest.raises(InvalidParameterError, match="leave no layer"):
        build_drafter("layer-skip", llama, skip_config="online:keep_first=2:keep_last=2")


def test_bench_method_spec_carries_online_options():
    from selfspec.drafters.factory import parse_methods

    specs = parse_methods("ar,layer-skip:skip=online:ratio=0.3:window=32,vocab=0,ngram")
    assert [s.kind for s in specs] == ["none", "layer-skip", "ngram"]
    assert specs[1].options == {"skip_config": "online:ratio=0.3:window=32", "draft_vocab": 0}


@pytest.mark.slow  # 19 s: a subprocess loading a model twice
def test_cli_generate_online_and_save(tmp_path):
    folder = build_tiny_chat(tmp_path)
    out = tmp_path / "found.json"
    env = {**os.environ, "SELFSPEC_CACHE": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "selfspec.cli.main", "generate", "--model", str(folder),
                               "--prompt", "Tell me a story about a cat and a dog.", "-n", "24", "--dtype", "fp32",
                               "--draft", "layer-skip", *args], capture_output=True, text=True, env=env, timeout=300)

    proc = run("--skip-config", "online:window=8:max_iter=6", "--save-skip-config", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])["stats"]
    assert stats["found_by"] == "online" and stats["iterations_this_request"] == 6 and stats["phase"] == "accelerate"
    assert SkipConfig.load(out).found_by == "online"  # a normal config (drafted with: test above)
    proc = run("--draft", "ngram", "--save-skip-config", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --save-skip-config needs")
