"""Bayesian search for the skip set of self-speculative decoding (Draft & Verify, Zhang et al.,
ACL 2024, Sec. 3.2): one boolean per attention and per MLP sub-layer, optimised with Optuna (GP
sampler by default, TPE on request) over real measurements on calibration prompts.

Objectives:
- `tokens_per_s`: decode tokens/s of self-speculative generation on the calibration prompts,
  short generations, the user's sampling settings; what Draft & Verify's own search measures.
- `match_rate` (SWIFT, Xia et al., ICLR 2025): how often the draft's top token equals the full
  model's over the generated part of real context, scored in one parallel forward pass of the
  draft. Skipping nothing scores 1.0, so, as in SWIFT, the skip ratio is fixed: a trial must skip
  at least `skip_fraction` of the sub-layers.

A trial that breaks a constraint is not measured: it scores 0 and is marked infeasible, which
teaches the sampler where not to go. The study lives in an RDB storage (SQLite by default), so a
killed search resumes where it stopped and several processes can share one study; the trial
count is a total over all of them. Each trial reseeds the sampler with seed + trial number: one
worker is reproducible, two workers never draw the same random proposals.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import optuna
import torch
from optuna.trial import TrialState

from selfspec.search.calibration import Calibration, calibration_prompts  # noqa: F401 (calibration_prompts: API)
from selfspec.drafters.layerskip import SkipConfig, shipped_config  # noqa: F401
from selfspec.drafters.skipspace import SkipSpace, model_identity, seed_sets  # noqa: F401 (search API)
from selfspec.errors import InvalidParameterError, SelfspecError
from selfspec.paths import check_writable, pid_alive
from selfspec.models.transformer import SkipSet
from selfspec.sampling import SamplingParams

OBJECTIVES = ("tokens_per_s", "match_rate")
SAMPLERS = ("gp", "tpe")


class SearchError(SelfspecError):
    """A search cannot start: bad storage, a study made for another model or other settings..."""


@dataclass(frozen=True)
class SearchSettings:
    trials: int = 40  # total finished trials wanted in the study, over all runs and workers
    objective: str = "tokens_per_s"
    sampler: str = "gp"
    keep_first: int = 1  # never skip a sub-layer of the first N layers
    keep_last: int = 1
    max_skip_fraction: float = 0.5  # of all 2 * n_layers sub-layers
    skip_fraction: float = 0.25  # match_rate's fixed skip ratio; also the size of the seeded sets
    seed: int = 0
    max_new_tokens: int = 32  # per calibration prompt and trial
    max_draft: int = 8
    draft_vocab: int | None = None
    draft_bits: int | None = None  # set: search the skip set of a precision self-draft (--draft quantized)
    timeout_minutes: float | None = None

    def check(self, n_layers: int | None = None) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise InvalidParameterError(f"--trials must be an integer >= 1, got {self.trials!r}")
        if self.objective not in OBJECTIVES:
            raise InvalidParameterError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.sampler not in SAMPLERS:
            raise InvalidParameterError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        for name in ("keep_first", "keep_last"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("max_skip_fraction", "skip_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise InvalidParameterError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if self.draft_bits not in (None, 8, 4):
            raise InvalidParameterError(f"--draft-bits must be 8 or 4, got {self.draft_bits}")
        if self.objective == "match_rate" and self.skip_fraction > self.max_skip_fraction:
            raise InvalidParameterError(
                f"--skip-fraction {self.skip_fraction} exceeds --max-skip-fraction {self.max_skip_fraction}")
        if self.max_new_tokens < 2:
            raise InvalidParameterError(f"--max-new-tokens must be >= 2, got {self.max_new_tokens}")
        if self.timeout_minutes is not None and self.timeout_minutes <= 0:
            raise InvalidParameterError(f"--timeout must be > 0 minutes, got {self.timeout_minutes}")
        if n_layers is not None and n_layers - self.keep_first - self.keep_last < 1:
            raise InvalidParameterError(
                f"--keep-first {self.keep_first} and --keep-last {self.keep_last} leave no layer of "
                f"{n_layers} to skip")


# ------------------------------------------------------------------------- storage and study
def default_storage() -> str:
    from selfspec.paths import cache_dir

    return f"sqlite:///{cache_dir() / 'studies.db'}"


def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str, heartbeat_seconds: int = 10):
    """An Optuna RDB storage; heartbeats let a restarted or parallel worker fail the trials of a
    killed one (after 3 heartbeats) instead of waiting for them forever."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir():
            raise SearchError(f"cannot open --storage {url}: the folder {folder} does not exist")
    for attempt in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_seconds,
                                                  grace_period=3 * heartbeat_seconds)
            except Exception as e:
                error = e
        if not any(m in str(error) for m in ("already exists", "locked", "UNIQUE constraint", "Duplicate")):
            break
        time.sleep(0.2 * (attempt + 1))  # another worker is creating the same tables right now
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise SearchError(f"cannot open --storage {redact(url)}: {reason} "
                      "(use sqlite:///FILE.db, or a postgresql:// or mysql:// URL)")


def _same_model(recorded, name: str, sha: str, path) -> bool:
    from selfspec.models.registry import REGISTRY, identity_matches

    return recorded == sha or (name not in REGISTRY and path is not None
                               and identity_matches(recorded, path, "search study"))


def study_key(settings: SearchSettings, sampling: SamplingParams, prompts_digest: str, dtype: str) -> dict:
    """What makes trial values comparable: a study is only resumed or shared under equal keys."""
    key = {k: v for k, v in asdict(settings).items() if k not in ("trials", "seed", "timeout_minutes")}
    if settings.objective != "match_rate":
        key.pop("skip_fraction")
    key.update(sampling={k: v for k, v in asdict(sampling).items() if k != "seed"} if not sampling.greedy
               else {"temperature": 0.0, "repetition_penalty": sampling.repetition_penalty},
               prompts=prompts_digest, dtype=dtype)
    return key


def default_study_name(model_name: str, sha: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{model_name}-{sha[:8]}-{key['objective']}-{digest}"


def check_study(storage, study_name: str, name: str, sha: str, key: dict, path=None):
    """The existing study of that name, or None; refuses one made for another model (`path`: its
    file or folder, to accept an older hash of an HF folder) or settings."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
    attrs = study.user_attrs
    if "key" not in attrs:  # another worker created it a moment ago and is still recording its
        return study        # settings (one attribute at a time, "key" last: see run_search)
    if not _same_model(attrs.get("model_sha256"), name, sha, path):
        raise SearchError(
            f"study {study_name!r} was made for model {attrs.get('model')!r} (sha256 "
            f"{str(attrs.get('model_sha256'))[:12]}...), not {name!r} (sha256 {sha[:12]}...); "
            f"choose another --study-name or --storage")
    theirs = attrs.get("key", {})
    diff = sorted(k for k in set(theirs) | set(key) if theirs.get(k) != key.get(k))
    if diff:
        raise SearchError(f"study {study_name!r} was made with other settings ({', '.join(diff)} differ); "
                          f"choose another --study-name, or rerun with its settings")
    return study


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """Refuse an --out that cannot be written, before any trial runs."""
    return check_writable(out, flag, error=SearchError)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Rebuilds the real sampler for each trial, seeded by seed + trial number."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.seed = kind, seed
        self._inner = self._make(seed)

    def _make(self, seed: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.kind == "gp":
                return optuna.samplers.GPSampler(seed=seed, n_startup_trials=8, warn_independent_sampling=False)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8,
                                              warn_independent_sampling=False)

    def before_trial(self, study, trial) -> None:
        self._inner = self._make(self.seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)


# ---------------------------------------------------------------------------------- results
@dataclass
class Progress:
    """What the caller may show after each step: `event` is "baseline" (plain decoding measured:
    `value` tokens/s), "start" (a trial begins), "trial" (one finished) or "wait" (other workers
    hold the last trials)."""

    event: str
    done: int
    total: int
    best: float | None = None
    skip_fraction: float | None = None
    value: float | None = None


@dataclass
class SearchResult:
    config: SkipConfig
    study_name: str
    trials: int  # finished trials in the study
    ran: int  # trials this call ran
    baseline_tokens_per_s: float
    tokens_per_s: float  # the chosen set, measured again at the end of this run
    stats: dict = field(default_factory=dict)

    @property
    def warning(self) -> str | None:
        """Why the written config is no better than plain decoding, if it is not (None: it is).
        A fixed-fraction match_rate search can score 0: skipping a quarter of a small model's
        sub-layers may leave a draft that never agrees with the full model, and with few trials
        only the first seeded sets are measured."""
        objective = self.config.objective
        speedup = self.tokens_per_s / self.baseline_tokens_per_s if self.baseline_tokens_per_s else 0.0
        tau = self.stats.get("tau", 0.0)
        if objective["value"] > 0 and speedup > 1.0 and tau > 1.0:
            return None
        why = (f"{objective['name']} {objective['value']:.4g}, tau {tau:.2f}, {speedup:.2f}x plain decoding")
        return (f"the written skip config is NO BETTER THAN PLAIN DECODING ({why} after {self.trials} trial{'' if self.trials == 1 else 's'}); "
                "--draft layer-skip with it would be slower: run more --trials (40 or more), or lower "
                "--skip-fraction / --max-skip-fraction")


def feasible_trials(study) -> list:
    """Finished trials that kept the constraints, best first."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted((t for t in trials if t.user_attrs.get("feasible")), key=lambda t: -t.value)


def run_search(model, prompts: Sequence[str | Sequence[int]], settings: SearchSettings,
               sampling: SamplingParams | None = None, *, out: str | Path | None = None,
               storage: str | None = None, study_name: str | None = None, prompts_source: str = "",
               on_progress: Callable[[Progress], None] | None = None, heartbeat_seconds: int = 10,
               poll_seconds: float = 2.0) -> SearchResult:
    """Run (or resume, or join) the study until it holds `settings.trials` finished trials, then
    write the best skip set to `out` (atomically). Every input is checked before the first
    measurement; the model stays loaded across trials."""
    from selfspec.generation import check_request

    sampling = sampling or SamplingParams()
    n = model.config.n_layers
    settings.check(n)
    out_path = check_out(out) if out is not None else None
    ids = [model.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if not ids:
        raise InvalidParameterError("no calibration prompts")
    for p in ids:
        check_request(model, p, settings.max_new_tokens)
    url = storage or default_storage()
    store = open_storage(url, heartbeat_seconds)
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    name, sha = model_identity(model)
    key = study_key(settings, sampling, digest, model.dtype if model.device.type == "cpu"
                    else f"{model.dtype}@{model.device.type}")  # a GPU's tokens/s are not the CPU's
    study_name = study_name or default_study_name(name, sha, key)
    check_study(store, study_name, name, sha, key, model.path)

    space = SkipSpace(n, settings.keep_first, settings.keep_last)
    n_sub = 2 * n
    max_count = math.floor(settings.max_skip_fraction * n_sub + 1e-9)
    target = min(max(1, round(settings.skip_fraction * n_sub)), max_count, 2 * len(space.layers))
    low = target if settings.objective == "match_rate" else 0
    study = optuna.create_study(study_name=study_name, storage=store, direction="maximize",
                                sampler=TrialSeededSampler(settings.sampler, settings.seed), load_if_exists=True)
    if not study.user_attrs:  # "key" last: check_study reads a study without it as still being recorded
        for k, v in {"model": name, "model_sha256": sha, "n_layers": n, "objective": settings.objective,
                     "key": key}.items():
            study.set_user_attr(k, v)
    if not study.get_trials(deepcopy=False):
        for s in seed_sets(space, target, name):
            if low <= len(s) <= max_count:
                study.enqueue_trial(space.params(s), skip_if_exists=True)
        if low == 0:
            study.enqueue_trial(space.params(SkipSet()), skip_if_exists=True)

    calib = Calibration(model, ids, sampling, settings)
    baseline = calib.baseline()
    study.set_user_attr("baseline_tokens_per_s", baseline)
    measure = calib.tokens_per_s if settings.objective == "tokens_per_s" else calib.match_rate
    worker = f"{os.uname().nodename}:{os.getpid()}"

    def best_value() -> float | None:
        best = feasible_trials(study)
        return best[0].value if best else None

    def notify(event: str, done: int, **kw) -> None:
        if on_progress is not None:
            on_progress(Progress(event, done, settings.trials, best_value(), **kw))

    last: dict = {}

    def objective(trial) -> float:
        last.clear()
        skip = space.suggest(trial)
        fraction = len(skip) / n_sub
        trial.set_user_attr("skip_fraction", fraction)
        trial.set_user_attr("worker", worker)
        notify("start", done, skip_fraction=fraction)
        if not low <= len(skip) <= max_count:
            trial.set_user_attr("feasible", False)
            last["value"] = 0.0
            return 0.0  # not measured: a penalty the sampler learns from
        trial.set_user_attr("feasible", True)
        twin = _twin(study, trial, poll_seconds, 3 * heartbeat_seconds)
        if twin is not None:  # the set was measured already (by any worker): reuse the value
            trial.set_user_attr("repeat_of", twin.number)
            for k, v in twin.user_attrs.items():
                if k not in ("worker", "repeat_of"):
                    trial.set_user_attr(k, v)
            last["value"] = twin.value
            return twin.value
        t0 = time.perf_counter()
        value, stats = measure(skip)
        stats["seconds"] = time.perf_counter() - t0  # wall time of the measurement
        for k, v in stats.items():
            trial.set_user_attr(k, v)
        last["value"] = value
        return value

    notify("baseline", len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), value=baseline)
    deadline = time.monotonic() + 60 * settings.timeout_minutes if settings.timeout_minutes else None
    ran = 0
    while True:
        _fail_stale(study, 3 * heartbeat_seconds)  # trials of killed workers: FAIL, not counted
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
        if done >= settings.trials or (deadline is not None and time.monotonic() >= deadline):
            break
        if done + running >= settings.trials:  # others hold the last trials: wait for them
            notify("wait", done)
            time.sleep(poll_seconds)
            continue
        try:
            study.optimize(objective, n_trials=1)  # heartbeats; an error or Ctrl-C marks the trial FAIL
        except ValueError as e:
            # Two workers on SQLite can pop the same enqueued trial (its WAITING -> RUNNING update
            # is not exclusive there); the one that finishes second cannot record it again. The
            # value is in the study already: go on.
            if not str(e).startswith("Cannot tell a COMPLETE trial"):
                raise
        ran += 1
        notify("trial", done + 1, value=last.get("value"))

    while any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        notify("wait", done)  # other workers' last trials: every worker then picks the same best
        time.sleep(poll_seconds)
        _fail_stale(study, 3 * heartbeat_seconds)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    ranked = feasible_trials(study)
    if not ranked:
        raise SearchError(f"study {study_name!r} has no finished trial that keeps the constraints; "
                          "run more trials or loosen --max-skip-fraction")
    best = ranked[0]
    skip = space.decode(best.params)
    # The chosen set and plain decoding measured again, back to back: the speedup must not compare
    # a baseline taken while the machine was busy with one taken when it was quiet.
    baseline = calib.baseline()
    final = calib.tokens_per_s(skip)[1]
    config = SkipConfig(
        model=name, model_sha256=sha, n_layers=n, attention=tuple(sorted(skip.attention)),
        mlp=tuple(sorted(skip.mlp)), draft_bits=settings.draft_bits, found_by="search",
        objective={"name": settings.objective, "value": round(best.value, 4)},
        baseline_tokens_per_s=round(baseline, 2),
        search={"trials": done, "best_trial": best.number, "study": study_name, "storage": redact(url),
                "tokens_per_s": round(final["tokens_per_s"], 2),
                "speedup": round(final["tokens_per_s"] / baseline, 3) if baseline else None,
                "tau": round(final["tau"], 3), "acceptance_rate": round(final["acceptance_rate"], 3),
                "settings": {**{k: v for k, v in asdict(settings).items() if k != "trials"},
                             "sampling": asdict(sampling), "dtype": model.dtype,
                             "threads": torch.get_num_threads(),
                             "prompts": {"source": prompts_source, "count": len(ids), "sha256": digest}}},
        note=f"Found by `selfspec search` ({settings.objective}, {done} trials); tokens/s measured on "
             f"the calibration prompts, {settings.max_new_tokens} new tokens each.")
    if out_path is not None:
        config.save(out_path)
    return SearchResult(config=config, study_name=study_name, trials=done, ran=ran,
                        baseline_tokens_per_s=baseline, tokens_per_s=final["tokens_per_s"], stats=final)


def _twin(study, trial, poll_seconds: float, grace_seconds: float):
    """A finished trial with the same parameters; waits while another worker measures them."""
    while True:
        busy = False
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number != trial.number and t.params == trial.params:
                if t.state == TrialState.COMPLETE:
                    return t
                busy = busy or t.number < trial.number  # the earlier trial measures, the later waits
        if not busy:
            return None
        time.sleep(poll_seconds)
        _fail_stale(study, grace_seconds)


def _fail_stale(study, grace_seconds: float) -> None:
    """Mark the running trials of dead workers FAIL: those whose heartbeat stopped (Optuna), and,
    since a worker killed before its first heartbeat leaves none, those of a process of this
    machine that is gone, or that never said which worker runs them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host, now = os.uname().nodename, datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = t.user_attrs.get("worker", "").partition(":")
        old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_seconds
        gone = worker_host == host and pid.isdigit() and not pid_alive(int(pid))
        if gone or (old and not worker_host):
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except Exception:
                pass  # finished meanwhile


def check_spec_study(storage, study_name: str | None, spec: str) -> None:
    """Before loading a model: refuse a named study that was made for another model."""
    if study_name is None:
        return  # the default name carries the model's hash
    from types import SimpleNamespace

    from selfspec.models.loading import model_path

    try:
        path, name = model_path(spec)
    except SelfspecError:
        return  # load_model will say what is wrong with the spec
    name, sha = model_identity(SimpleNamespace(name=name, path=path))
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    recorded = study.user_attrs.get("model_sha256")
    if recorded is not None and not _same_model(recorded, name, sha, path):
        raise SearchError(
            f"study {study_name!r} was made for model {study.user_attrs.get('model')!r} (sha256 "
            f"{str(study.user_attrs.get('model_sha256'))[:12]}...), not {name!r} (sha256 {sha[:12]}...); "
            f"choose another --study-name or --storage")
