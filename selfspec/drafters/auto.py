"""Cost-aware speculation (`--draft auto`): per round, pick the drafter and draft length k that
maximise expected tokens per second on this machine, and fall back to plain decoding (k = 0)
whenever no drafter is expected to pay.

For a drafter whose drafts are accepted token by token with probability a, a round with k drafts
yields E(k) = 1 + a + ... + a^k tokens (the bonus or correction token included) and costs
T(k) = k * c_draft + c_verify(k). Plain decoding yields 1 token per c_verify(0) = c_step. We take
argmax_k E(k) / T(k) over k = 0..K with the costs of `selfspec.drafters.costs` (calibrated at load, refined
from every round the loop runs: the time between a proposal and its verdict is that round's
verify) and a per drafter estimate of a that forgets old rounds, so a change of task moves it
within a few rounds. A drafter whose best k is 0 is switched off and re-probed with a short draft
after `probe_every` rounds, the interval doubling while it keeps losing (bounded cost), and not
at all while it could not pay even at 90% acceptance (its measured draft cost against the
measured verify costs).

Grounded drafters (prompt lookup, the adaptive n-gram model, retrieval: they expose `last_level`,
the length of the match behind their proposal) cost microseconds, so every one of them proposes
every round, and each is judged by its acceptance *at that match length* (a 4-token match is
copied right far more often than a 1-token one). The round takes the proposal with the best
expected tokens per second, comparing it with the model drafters' predictions: grounded text gets
n-gram drafts, free text layer-skip drafts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from selfspec.drafters.costs import MAX_K, CostModel
from selfspec.drafters.base import EMPTY, Draft, DraftContext, Drafter, declared

MAX_LEVEL = 8  # match lengths from here on share one acceptance estimate
# A switched-off drafter is re-probed only if it would pay at this acceptance: on a load whose
# verify pass costs ~2 steps for 9 tokens (GGUF-native blocks) a layer-skip draft at half a
# step per token cannot pay even when 9 in 10 drafts are right, and its probes cost SmolLM2
# 8-14% against plain decoding on free text (docs/benchmarks.md).
PLAUSIBLE_ACCEPTANCE = 0.9
# A drafter may declare its own (`plausible_acceptance`): a precision self-draft is the model
# itself in fewer bits and agrees with it on 91-99% of drafted tokens (Qwen 1.5B, native blocks,
# docs/benchmarks.md); judged at 0.9 it was never tried there, though alone it decoded 1.35x.


def expected_tokens(a: float, k: int) -> float:
    """1 + a + ... + a^k: tokens of a round with k drafts, each accepted with probability a."""
    return float(sum(a ** i for i in range(k + 1)))


def best_k(a: float, c_draft: float, costs: CostModel, k_max: int) -> tuple[int, float]:
    """The draft length with the most expected tokens per second, and its predicted speedup over
    plain decoding (1.0 for k = 0)."""
    best, best_rate = 0, 1.0 / costs.step
    for k in range(1, min(k_max, costs.max_k) + 1):
        rate = expected_tokens(a, k) / (k * c_draft + costs.verify[k])
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best, best_rate * costs.step


def could_pay(plausible: float, c_draft: float, costs: CostModel, k_max: int) -> bool:
    """Whether a drafter at `c_draft` seconds per token would beat plain decoding at its
    plausible acceptance: if not, trying it only costs."""
    return best_k(plausible, c_draft, costs, k_max)[0] > 0


@dataclass
class Acceptance:
    """Per-token acceptance probability from recent rounds: accepted drafts over accepted drafts
    plus rejections (a round ending at a rejection counts one), both forgetting by `decay` per
    round. The prior (a = 0.6, worth about two rounds) lets a new drafter be tried."""

    decay: float = 0.7
    accepted: float = 1.2
    rejected: float = 0.8

    @classmethod
    def prior(cls, rate: float | None) -> "Acceptance":
        """The default prior, or one at `rate` worth the same two rounds (a drafter's own
        `prior_acceptance`)."""
        return cls() if rate is None else cls(accepted=2 * rate, rejected=2 * (1 - rate))

    def update(self, accepted: int, proposed: int) -> None:
        if proposed <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < proposed else 0.0)

    @property
    def rate(self) -> float:
        return min(0.99, self.accepted / (self.accepted + self.rejected))


@dataclass
class Arm:
    """One drafter under the policy."""

    drafter: object
    c_draft: float  # seconds per drafted token (EMA)
    acceptance: Acceptance = field(default_factory=Acceptance)
    plausible: float = PLAUSIBLE_ACCEPTANCE  # the acceptance at which `_could_pay` judges it
    idle: int = 0  # rounds since it last drafted
    probe_interval: int = 16
    rounds: int = 0
    probes: int = 0
    levels: dict = field(default_factory=dict)  # grounded drafters: match length -> Acceptance
    level: int = 0  # the match length of this round's proposal

    @property
    def name(self) -> str:
        return self.drafter.name

    @property
    def grounded(self) -> bool:
        return declared(self.drafter, "last_level") is not None

    def level_acceptance(self, level: int) -> Acceptance:
        return self.levels.setdefault(min(level, MAX_LEVEL), Acceptance())


class AutoDrafter(Drafter):
    """Chooses among `drafters` (cheapest first) and k each round; see the module docstring."""

    name = "auto"

    def __init__(self, drafters: list, costs: CostModel, max_draft: int = 8, probe_every: int = 16,
                 probe_max: int = 256, probe_k: int = 2, draft_cost_guess: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not drafters:
            raise ValueError("auto needs at least one drafter")
        guess = draft_cost_guess or {}
        self.arms = [Arm(d, guess.get(d.name, 0.5 * costs.step), probe_interval=probe_every,
                         plausible=getattr(d, "plausible_acceptance", PLAUSIBLE_ACCEPTANCE),
                         acceptance=Acceptance.prior(getattr(d, "prior_acceptance", None)))
                     for d in drafters]
        self.costs = costs
        self.max_draft = max_draft
        self.probe_every, self.probe_max, self.probe_k = probe_every, probe_max, probe_k
        self.clock = clock
        self._reset_round()
        self._reset_counts()

    def _reset_counts(self) -> None:
        """Per-generation statistics (what was learnt, costs and acceptance, carries over)."""
        self.k_hist: dict[int, int] = {}
        self.drafter_rounds: dict[str, int] = {}
        self.predicted_tokens = self.predicted_seconds = 0.0
        self.real_tokens = 0
        self.real_seconds = 0.0
        for arm in self.arms:
            arm.probes = 0

    def _reset_round(self) -> None:
        self._arm: Arm | None = None
        self._t_proposed: float | None = None
        self._t_start: float | None = None
        self._probing = False

    def _candidates(self, k_cap: int) -> list[tuple[Arm, int, bool, float]]:
        """The model arms to try this round, with their k and predicted speedup: those due for a
        probe first (a short draft), then those expected to pay, the best predicted speedup first
        (ties: the earlier arm)."""
        due, paying = [], []
        for i, arm in enumerate(self.arms):
            if arm.grounded:
                continue  # judged by this round's proposal (_grounded)
            k, speedup = best_k(arm.acceptance.rate, arm.c_draft, self.costs, k_cap)
            if k > 0:
                paying.append((-speedup, i, arm, k))
                continue
            arm.idle += 1
            if arm.idle >= arm.probe_interval and k_cap >= 1 and self._could_pay(arm, k_cap):
                due.append((arm, min(self.probe_k, k_cap), True, 0.0))
        return due + [(arm, k, False, -s) for s, _, arm, k in sorted(paying, key=lambda c: c[:2])]

    def _could_pay(self, arm: Arm, k_cap: int) -> bool:
        """Whether `arm` would beat plain decoding at its plausible acceptance (PLAUSIBLE_ACCEPTANCE
        unless its drafter says otherwise) with its measured draft cost and the measured verify
        costs: if not, probing it only costs."""
        return could_pay(arm.plausible, arm.c_draft, self.costs, k_cap)

    def _grounded(self, ctx: DraftContext, k_cap: int) -> tuple[list, tuple | None]:
        """Every grounded arm's proposal, cut to its best k at its match length: (the due probes
        [(arm, draft)], the best of those expected to pay (speedup, arm, draft) or None)."""
        due, best = [], None
        for arm in self.arms:
            if not arm.grounded or k_cap < 1:
                continue
            t = self.clock()
            d = arm.drafter.propose(ctx, k_cap)
            if len(d) == 0:
                continue
            arm.c_draft += 0.3 * ((self.clock() - t) / len(d) - arm.c_draft)
            arm.level = arm.drafter.last_level
            k, speedup = best_k(arm.level_acceptance(arm.level).rate, arm.c_draft, self.costs, len(d))
            if k > 0:
                if best is None or speedup > best[0]:  # ties: the earlier arm
                    best = (speedup, arm, Draft(d.tokens[:k]))
                continue
            arm.idle += 1
            if arm.idle >= arm.probe_interval and self._could_pay(arm, len(d)):
                due.append((arm, Draft(d.tokens[: self.probe_k])))
        return due, best

    # ------------------------------------------------------------------------- Drafter protocol
    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        t_start = self.clock()
        k_cap = min(self.max_draft, max_tokens)
        chosen, draft, predicted = None, Draft(EMPTY), (1.0, self.costs.step)
        grounded_due, best = self._grounded(ctx, k_cap)
        candidates = [(arm, len(d), True, 0.0, d) for arm, d in grounded_due] + [
            (*c, None) for c in self._candidates(k_cap)]
        for arm, k, probing, speedup, d in candidates:
            if best is not None and not probing and best[0] >= speedup:
                break  # the best grounded proposal is expected to beat this and every later arm
            if d is None:
                t = self.clock()
                d = arm.drafter.propose(ctx, k)
                spent = self.clock() - t
                if len(d) == 0:  # nothing drafted: try the next drafter
                    continue
                arm.c_draft += 0.3 * (spent / len(d) - arm.c_draft)
            chosen, draft, self._probing = arm, d, probing
            break
        if chosen is None and best is not None:
            (_, chosen, draft), self._probing = best, False
        if chosen is not None:
            a = (chosen.level_acceptance(chosen.level) if chosen.grounded else chosen.acceptance).rate
            predicted = (expected_tokens(a, len(draft)),
                         len(draft) * chosen.c_draft + self.costs.verify[min(len(draft), self.costs.max_k)])
        self._arm = chosen
        self._t_start = t_start
        self._t_proposed = self.clock()
        self.predicted_tokens += predicted[0]
        self.predicted_seconds += predicted[1]
        return draft

    def update(self, accepted: int, proposed: int) -> None:
        now = self.clock()
        if self._t_proposed is not None:
            self.costs.observe(proposed, now - self._t_proposed)
            self.real_seconds += now - self._t_start
        self.real_tokens += accepted + 1
        self.k_hist[proposed] = self.k_hist.get(proposed, 0) + 1
        arm = self._arm
        name = arm.name if arm is not None and proposed else "none"
        self.drafter_rounds[name] = self.drafter_rounds.get(name, 0) + 1
        if arm is not None and proposed:
            arm.acceptance.update(accepted, proposed)
            if arm.grounded:
                arm.level_acceptance(arm.level).update(accepted, proposed)
            arm.drafter.update(accepted, proposed)
            arm.idle, arm.rounds = 0, arm.rounds + 1
            if self._probing:
                arm.probes += 1
                acc = arm.level_acceptance(arm.level) if arm.grounded else arm.acceptance
                still_off = best_k(acc.rate, arm.c_draft, self.costs, self.max_draft)[0] == 0
                arm.probe_interval = min(self.probe_max, arm.probe_interval * 2) if still_off else self.probe_every
        self._reset_round()

    def reset(self) -> None:
        if sum(self.costs.observed) >= 32:  # refined by a whole generation: keep it for next time
            self.costs.save()
        for arm in self.arms:
            arm.drafter.reset()
        self._reset_round()
        self._reset_counts()

    def extra_stats(self) -> dict:
        step = self.costs.step
        stats = {
            "auto_k_rounds": {str(k): n for k, n in sorted(self.k_hist.items())},
            "auto_drafter_rounds": dict(self.drafter_rounds),
            "auto_probes": {a.name: a.probes for a in self.arms},
            "auto_acceptance": {a.name: round(a.acceptance.rate, 3) for a in self.arms},
            "predicted_speedup": (self.predicted_tokens / self.predicted_seconds * step) if self.predicted_seconds else None,
            "realised_speedup": (self.real_tokens / self.real_seconds * step) if self.real_seconds else None,
            "cost_verify_ratios": [round(r, 3) for r in self.costs.ratios()],
            "cost_source": self.costs.source,
        }
        for arm in self.arms:
            stats.update({f"{arm.name}_{k}": v for k, v in arm.drafter.extra_stats().items()})
        return stats

    @classmethod
    def for_model(cls, model, skip_config=None, draft_model=None, max_draft: int = 8, costs: CostModel | None = None,
                  draft_bits: int | None = None, quantized_exit=None, datastore: str | None = None,
                  **layer_skip_kwargs) -> "AutoDrafter":
        """n-gram lookup and the adaptive n-gram model (free to draft), retrieval from `datastore`
        when one is given, the model's layer-skip config (given or shipped), a precision
        self-draft (`draft_bits`; default 8, or 4 on an int8 model, none on an int4 one; on GGUF-
        native blocks 4, none where no cheaper native form exists) and a draft model when one is
        named."""
        from selfspec.drafters.costs import calibrate
        from selfspec.drafters.anpd import AdaptiveNgramDrafter
        from selfspec.drafters.layerskip import LayerSkipDrafter, shipped_config
        from selfspec.drafters.ngram import NgramDrafter
        from selfspec.drafters.quantized import QuantizedSelfDrafter
        from selfspec.models import native_draft
        from selfspec.models.native_draft import is_native
        from selfspec.models.quant import weight_bits

        costs = costs or calibrate(model, max_k=max(MAX_K, max_draft))
        drafters = [NgramDrafter(max_draft=max_draft, adaptive=False),
                    AdaptiveNgramDrafter(max_draft=max_draft, adaptive=False)]
        guess = {"ngram": 0.002 * costs.step, "ngram-adaptive": 0.002 * costs.step, "retrieval": 0.005 * costs.step}
        if datastore is not None:
            from selfspec.drafters.retrieval import RetrievalDrafter

            drafters.append(RetrievalDrafter.for_model(model, datastore, max_draft=max_draft, adaptive=False))
        if skip_config is not None or shipped_config(model.name) is not None:
            ls = LayerSkipDrafter.for_model(model, skip_config, max_draft=max_draft, **layer_skip_kwargs)
            drafters.append(ls)
            n = 2 * model.config.n_layers
            kept = 1 - (len(ls.skip.attention) + len(ls.skip.mlp)) / n
            guess["layer-skip"] = max(0.05, kept) * costs.step
        have = weight_bits(model.transformer) or 32
        native = is_native(model.transformer)
        # On GGUF-native blocks the precision draft is the same blocks on int8 activations, with
        # copies in Q4_K/Q4_0 of the parts stored with more bits (models/native_draft.py); a
        # native-q8 model already in those formats has none, and drafts without it.
        bits = draft_bits or (4 if native or have <= 8 else 8)
        ratio = None
        if native:
            plan = native_draft.plan(model.transformer, bits)
            useful = bool(plan["copies"]) or plan["int8_activations"]
            # Its step is 0.4-0.9 of the model's on the registry models (docs/kernels.md):
            # measured once per machine, and where it could not pay even at the drafter's
            # plausible acceptance the draft is not built (SmolLM2: 0.8 s of copies saved).
            ratio = native_draft.cached_relative_cost(model, bits) if useful else None
            if ratio is not None and not could_pay(QuantizedSelfDrafter.plausible_acceptance, ratio * costs.step,
                                                   costs, max_draft):
                useful = False
        else:
            useful = bits < have
        if useful and model.device.type == "cpu":
            kwargs = {**layer_skip_kwargs, "exit": quantized_exit}  # its own draft-exit state
            drafters.append(QuantizedSelfDrafter.for_model(model, bits=bits, max_draft=max_draft, **kwargs))
            guess["quantized"] = 0.5 * costs.step  # int8 or int4 GEMV: about half an fp32 step (README)
            if native:
                if ratio is None:
                    view = drafters[-1].draft_transformer(model.transformer)
                    ratio = native_draft.measure_relative_cost(model, bits, view)
                guess["quantized"] = ratio * costs.step
        if draft_model is not None:
            drafters.append(draft_model)
        return cls(drafters, costs, max_draft=max_draft, draft_cost_guess=guess)
