"""Cost-aware speculation: the draft-length policy under synthetic cost models, switching off and
re-probing, calibration, and losslessness of `--draft auto`."""
from __future__ import annotations

import pytest
import torch

from distributions import StubDrafter
from selfspec.drafters.costs import CostModel, calibrate
from selfspec.drafters.auto import Acceptance, AutoDrafter, best_k, expected_tokens
from selfspec.drafters.base import Draft
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import NgramDrafter
from selfspec.generation import generate
from selfspec.sampling import SamplingParams
from tiny import one_thread, tiny_model

STEP = 0.05
PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8, 5, 17, 33]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def free_verify(k_max: int = 8) -> CostModel:
    return CostModel([STEP] * (k_max + 1), source="synthetic")


def linear_verify(k_max: int = 8) -> CostModel:
    return CostModel([STEP * (k + 1) for k in range(k_max + 1)], source="synthetic")


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


@pytest.mark.parametrize("a", [0.3, 0.6, 0.9, 0.99])
def test_free_verification_means_long_drafts(a):
    k, gain = best_k(a, c_draft=0.0, costs=free_verify(), k_max=8)
    assert k == 8 and gain == pytest.approx(expected_tokens(a, 8), rel=1e-9)


@pytest.mark.parametrize("a", [0.0, 0.5, 0.9, 0.99])
def test_verify_costing_k_steps_means_never_draft(a):
    k, gain = best_k(a, c_draft=0.01 * STEP, costs=linear_verify(), k_max=8)
    assert k == 0 and gain == 1.0


def test_cheap_verify_and_moderate_acceptance_picks_a_middle_length():
    costs = CostModel([STEP * (1 + 0.04 * k) for k in range(9)])  # verify 8 = 1.32 steps
    k_low, _ = best_k(0.5, 0.3 * STEP, costs, 8)
    k_high, _ = best_k(0.9, 0.3 * STEP, costs, 8)
    assert 1 <= k_low < k_high  # better acceptance, longer drafts
    assert best_k(0.2, 0.3 * STEP, costs, 8)[0] == 0  # a weak draft is not worth its cost


def test_acceptance_estimate_forgets():
    acc = Acceptance()
    for _ in range(10):
        acc.update(4, 4)
    assert acc.rate > 0.9
    for _ in range(10):
        acc.update(0, 4)
    assert acc.rate < 0.2
    before = acc.rate
    acc.update(0, 0)  # rounds without drafts change nothing
    assert acc.rate == before


class Scripted(StubDrafter):
    """Proposes k tokens; whether they will be accepted is decided by the simulation."""

    name = "scripted"

    def __init__(self, clock, c_draft):
        self.proposed, self.clock, self.c_draft = [], clock, c_draft

    def propose(self, ctx, max_tokens):
        self.proposed.append(max_tokens)
        self.clock.t += self.c_draft * max_tokens
        return Draft(torch.zeros(max_tokens, dtype=torch.long))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def simulate(auto, clock, costs_true, good, rounds):
    """Rounds of propose -> verify with a known truth: drafts all accepted when `good(r)`, else none.
    Returns the k of each round."""
    ks = []
    for r in range(rounds):
        k = len(auto.propose(None, 8))
        clock.t += costs_true.verify[k]
        auto.update(k if good(r) else 0, k)
        ks.append(k)
    return ks


def test_drafting_stops_when_acceptance_falls_and_resumes_after_reprobing():
    clock = Clock()
    drafter = Scripted(clock, 0.2 * STEP)
    truth = CostModel([STEP * (1 + 0.03 * k) for k in range(9)])
    auto = AutoDrafter([drafter], CostModel(list(truth.verify)), probe_every=8, probe_max=64, clock=clock)
    ks = simulate(auto, clock, truth, good=lambda r: r < 30 or r >= 130, rounds=200)
    assert min(ks[5:30]) >= 4  # accepted drafts: long drafts
    assert sum(ks[30:45]) < sum(ks[15:30]) / 2  # drafts shrink within a few failed rounds
    bad = ks[45:130]
    assert sum(k > 0 for k in bad) <= 6  # switched off: only occasional short probes
    assert max(bad) <= 2
    assert max(ks[170:]) >= 4  # acceptance came back: a probe found it, long drafts again
    stats = auto.extra_stats()
    assert stats["auto_drafter_rounds"]["none"] > 50 and stats["auto_probes"]["scripted"] >= 2


def test_probe_interval_backs_off_and_costs_little():
    clock = Clock()
    drafter = Scripted(clock, 0.5 * STEP)
    truth = CostModel([STEP * (1 + 0.03 * k) for k in range(9)])
    auto = AutoDrafter([drafter], CostModel(list(truth.verify)), probe_every=8, probe_max=64, clock=clock)
    ks = simulate(auto, clock, truth, good=lambda r: False, rounds=400)
    drafted_rounds = sum(k > 0 for k in ks)
    assert drafted_rounds <= 12  # 8, 16, 32, 64, 64, ... rounds apart
    # Tokens per unit time stays within 3% of plain decoding despite the probes.
    assert 400 / clock.t >= 0.97 / STEP


def test_realised_and_predicted_speedup_are_reported():
    clock = Clock()
    drafter = Scripted(clock, 0.1 * STEP)
    truth = CostModel([STEP * (1 + 0.03 * k) for k in range(9)])
    auto = AutoDrafter([drafter], CostModel(list(truth.verify)), clock=clock)
    simulate(auto, clock, truth, good=lambda r: True, rounds=50)
    s = auto.extra_stats()
    assert s["realised_speedup"] > 3 and s["predicted_speedup"] > 2
    assert s["auto_k_rounds"]["8"] > 40


def test_online_refinement_moves_costs_towards_observations():
    costs = CostModel([STEP] * 9)
    for _ in range(60):
        costs.observe(4, 2 * STEP)
    assert costs.verify[4] == pytest.approx(2 * STEP, rel=0.01) and costs.verify[3] == STEP
    costs.observe(4, 1000.0)  # an outlier moves it by a bounded amount
    assert costs.verify[4] < 2.5 * STEP


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("llama"), ctx_size=128)


def test_calibration_measures_and_caches(llama, tmp_path, monkeypatch):
    from selfspec.drafters import costs as costs_module

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(costs_module, "machine_busy", lambda: False)  # the suite's own workers load the CPU
    mine = llama.fresh_cache()
    llama.transformer.forward(torch.arange(5), 0, mine)  # a sequence in the model's cache
    costs = calibrate(llama, max_k=4)
    assert costs.source == "calibrated" and len(costs.verify) == 5 and all(c > 0 for c in costs.verify)
    again = calibrate(llama, max_k=4)
    assert again.source == "cached" and again.verify == costs.verify
    assert llama.kv_cache() is mine and mine.length == 5  # calibration runs on a cache of its own
    # another build of our kernels (their sources changed) measures again
    from selfspec import kernels

    monkeypatch.setattr(kernels, "library", lambda: type("Lib", (), {"_name": "/x/libselfspec-0000.so"})())
    assert calibrate(llama, max_k=4).source == "calibrated"


def test_costs_measured_on_a_busy_machine_are_not_cached(llama, tmp_path, monkeypatch):
    """Costs measured while other programs load the CPU would mislead every later run: they serve
    this run only, and the next one measures again."""
    from selfspec.drafters import costs as costs_module
    from selfspec import hardware

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "load_average", lambda: 64.0)
    assert hardware.machine_busy()
    costs = calibrate(llama, max_k=4)
    assert costs.source == "calibrated" and not list(tmp_path.rglob("*.json"))
    costs.observed = [40] * 5
    costs.save()  # a refined model is not written either
    assert not list(tmp_path.rglob("*.json"))
    assert calibrate(llama, max_k=4).source == "calibrated"


def _auto(model, costs):
    n = model.config.n_layers
    ls = LayerSkipDrafter(SkipConfig(model=model.name, n_layers=n, attention=(1,), mlp=(2,)), max_draft=6)
    # A clock that stands still: the synthetic costs stay as they are (no round is observed).
    return AutoDrafter([NgramDrafter(adaptive=False), ls], costs, draft_cost_guess={"ngram": 0.0, "layer-skip": 0.0},
                       clock=lambda: 0.0)


@pytest.mark.parametrize("costs", [free_verify, linear_verify], ids=["drafting", "never-drafting"])
def test_auto_is_lossless_greedy(llama, costs):
    plain = generate(llama, PROMPT, max_new_tokens=40)
    auto = _auto(llama, costs())
    spec = generate(llama, PROMPT, max_new_tokens=40, drafter=auto)
    assert spec.token_ids == plain.token_ids
    rounds = spec.stats.extras["auto_drafter_rounds"]
    if costs is free_verify:
        assert spec.stats.drafted > 0 and rounds.get("layer-skip", 0) > 0
    else:
        assert spec.stats.drafted <= 2 * 3  # only the bounded probes


def test_auto_sampled_matches_target_distribution(llama):
    """The second generated token (drafted and verified by auto's drafters) has the target's exact
    distribution, within the noise floor of the sample count (the statistic of test_speculative)."""
    import copy

    from distributions import exact_second_token, noise_floor, second_token_samples, total_variation

    params = SamplingParams(temperature=1.0)
    prompt = PROMPT[:5]
    p = exact_second_token(llama, prompt, params)
    n = 1000  # auto proposes afresh for every sample (its choice depends on its state): ~2 ms each
    floor = noise_floor(p, n)
    auto = _auto(llama, free_verify())
    # generate() runs with a copy of auto in the same state.
    counts = second_token_samples(llama, prompt, params, auto, n, twin=copy.deepcopy)
    assert auto.extra_stats()["auto_drafter_rounds"].get("layer-skip", 0) > 0
    tv = total_variation(counts, p)
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


def test_costs_stay_non_decreasing_in_k():
    """A step measured while the CPU was busy (here 10x two tokens' cost) cannot make drafting
    look better than it is: loaded or observed costs are kept non-decreasing in k."""
    costs = CostModel([0.356, 0.044, 0.045, 0.055, 0.064])
    assert costs.verify == sorted(costs.verify) and costs.step == pytest.approx(0.044)
    costs.observe(2, 0.02)  # a fast round pulls the cheaper k down with it
    assert costs.verify == sorted(costs.verify) and costs.verify[0] <= costs.verify[2]
    costs.observe(0, 0.1)  # a slow plain step pushes the dearer k up with it
    assert costs.verify == sorted(costs.verify)


def test_precision_draft_on_native_blocks_starts_from_its_measured_cost(smollm_in, monkeypatch, tmp_path):
    """On --dtype native the precision draft is the file's blocks (Q4_1 -> Q4_0/Q4_K copies) on
    int8 activations (models/native_draft.py), and auto's estimate of its cost starts from a
    measurement of its step against the model's, cached per machine: a draft that could not pay
    at its plausible acceptance is then not even built. The fp32 load keeps its int8 copy."""
    from selfspec import kernels
    from selfspec.drafters import costs as costs_module
    from selfspec.models import native_draft

    if kernels.library() is None:
        pytest.skip(f"no compiled kernel: {kernels.kernel_status()}")
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    # the suite's own workers load the CPU: on a busy machine write_entry keeps nothing (failed
    # here on a 2-core AVX2 EPYC while another build ran)
    monkeypatch.setattr(costs_module, "machine_busy", lambda: False)
    native = smollm_in("native")
    costs = CostModel(verify=[0.01 * (1 + 0.3 * k) for k in range(9)], source="test")
    assert native_draft.cached_relative_cost(native, 4) is None
    arm = {a.name: a for a in AutoDrafter.for_model(native, costs=costs).arms}["quantized"]
    view = arm.drafter.draft_transformer(native.transformer)
    assert view.draft_plan["int8_activations"] and view.lm_head.q8 and arm.drafter.config.draft_bits == 4
    ratio = arm.c_draft / costs.step
    assert 0.2 < ratio < 2.0  # a step of its own: SmolLM2 measured 0.76-0.92
    assert native_draft.cached_relative_cost(native, 4) == pytest.approx(ratio)  # kept for the next run
    from selfspec import prune

    assert list(tmp_path.glob("costs/*.native-draft4.json")) and prune._costs(tmp_path) == []  # not stale
    # the precision draft's own prior and plausible acceptance, not an unknown drafter's 0.6 / 0.9
    assert arm.acceptance.rate == pytest.approx(0.9) and arm.plausible == 0.97
    monkeypatch.setattr(native_draft, "cached_relative_cost", lambda model, bits: 0.9)
    monkeypatch.setattr(native_draft, "draft_view", lambda *a, **k: pytest.fail("built a draft that cannot pay"))
    assert "quantized" not in [a.name for a in AutoDrafter.for_model(native, costs=costs).arms]
    monkeypatch.undo()
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(native_draft, "cached_relative_cost", lambda model, bits: 0.2)
    auto = AutoDrafter.for_model(native, costs=costs)
    arm = {a.name: a for a in auto.arms}["quantized"]
    assert arm.c_draft == pytest.approx(0.2 * costs.step) and auto._could_pay(arm, 8)
    assert "quantized" in [a.name for a in AutoDrafter.for_model(smollm_in("fp32"), costs=costs).arms]


def test_no_probes_for_a_drafter_that_could_not_pay():
    """A switched-off drafter is re-probed only if it would beat plain decoding at 90% acceptance:
    with verify costing like the Qwen 1.5B's native load (1.6 steps for 2 tokens, 2.3 for 9) and
    drafts at 0.6 of a step each it never could, so after a probe or two (made while its draft
    cost is still the guess, half a step, which they correct) no probe is spent; with near-flat
    verify costs (fp32) the same drafter keeps being probed."""
    native = lambda k: STEP * (1.5 + 0.1 * k) if k else STEP  # noqa: E731
    for verify, probes in ((native, range(0, 3)), (lambda k: STEP * (1 + 0.03 * k), range(5, 20))):
        clock = Clock()
        drafter = Scripted(clock, 0.6 * STEP)
        truth = CostModel([verify(k) for k in range(9)])
        auto = AutoDrafter([drafter], CostModel(list(truth.verify)), probe_every=8, probe_max=64, clock=clock)
        ks = simulate(auto, clock, truth, good=lambda r: False, rounds=300)
        assert sum(k > 0 for k in ks) in probes, ks


def test_a_drafters_own_prior_lets_it_draft_from_the_first_round():
    """A drafter that declares `prior_acceptance` (the precision self-draft: 0.9) is judged by it
    before it has drafted: at half a step per draft (the guess) and verify costs like a native load's, the
    generic prior (0.6) leaves it idle until a probe, its own has it drafting at once; and a
    drafter at a plausible acceptance of 0.97 is still probed where 0.9 would rule it out."""
    verify = CostModel([STEP * (1 + 0.2 * k) for k in range(9)])
    first = {}
    for prior in (None, 0.9):
        clock = Clock()
        drafter = Scripted(clock, 0.35 * STEP)
        drafter.prior_acceptance = prior
        auto = AutoDrafter([drafter], CostModel(list(verify.verify)), probe_every=16, clock=clock)
        first[prior] = simulate(auto, clock, verify, good=lambda r: True, rounds=12)
    assert first[None] == [0] * 12 and min(first[0.9]) >= 2, first
    drafter = Scripted(Clock(), 0.7 * STEP)
    guess = {"scripted": 0.7 * STEP}
    auto = AutoDrafter([drafter], CostModel(list(verify.verify)), clock=Clock(), draft_cost_guess=guess)
    assert not auto._could_pay(auto.arms[0], 8)
    drafter.plausible_acceptance = 0.97
    auto = AutoDrafter([drafter], CostModel(list(verify.verify)), clock=Clock(), draft_cost_guess=guess)
    assert auto._could_pay(auto.arms[0], 8)
