"""What a forward pass costs on this machine, measured: on a CPU it grows with the tokens per pass
in steps that differ per machine and dtype, so `auto` decides from measurements, not a formula.

`CostModel.verify[k]` is the time of one forward over 1 + k tokens (k drafts plus the pending
token), so `verify[0]` is one plain decode step. It is calibrated at load with a few forward passes
(cached per machine + model + dtype + kernel + threads under the cache folder) and refined online
from the verify rounds the generation loop actually runs.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfspec.paths import atomic_write_json
from selfspec.hardware import machine_busy, synchronize

MAX_K = 8
EMA = 0.1  # weight of one online observation
# Recorded in each entry with the selfspec version, so `selfspec cache prune` can tell entries no
# lookup will find (older versions keyed without ISA and version, and recorded neither). Bump it
# when `_key` changes.
KEY_FORMAT = 2


@dataclass
class CostModel:
    verify: list[float]  # seconds of a forward over 1 + k tokens, k = 0..MAX_K
    source: str = "calibrated"
    observed: list[int] = field(default_factory=list)
    path: Path | None = None  # where calibrate() cached it; save() writes refined costs back

    def __post_init__(self) -> None:
        if len(self.verify) < 2 or any(not (c > 0) for c in self.verify):
            raise ValueError(f"a cost model needs positive costs for k = 0..K, got {self.verify}")
        self.verify = [float(c) for c in self.verify]
        self.observed = self.observed or [0] * len(self.verify)
        # A forward over more tokens never costs less. A cost measured while another process held
        # the CPU can break that (a cached SmolLM2 step of 356 ms beside 44 ms for two tokens made
        # every draft look 10x better than plain decoding); the cheaper neighbour is the truth.
        for k in range(self.max_k - 1, -1, -1):
            self.verify[k] = min(self.verify[k], self.verify[k + 1])

    @property
    def step(self) -> float:
        return self.verify[0]

    @property
    def max_k(self) -> int:
        return len(self.verify) - 1

    def observe(self, k: int, seconds: float) -> None:
        """Refine verify[k] with a measured round; a wildly slow one (another process stole the
        CPU, a page fault) moves the estimate by at most a bounded amount."""
        if not 0 <= k <= self.max_k or seconds <= 0:
            return
        old = self.verify[k]
        seconds = min(seconds, 3 * old)
        self.verify[k] = new = old + EMA * (seconds - old)
        self.observed[k] += 1
        # Keep the costs non-decreasing in k around the newest observation.
        self.verify[:k] = [min(c, new) for c in self.verify[:k]]
        self.verify[k + 1:] = [max(c, new) for c in self.verify[k + 1:]]

    def ratios(self) -> list[float]:
        return [c / self.step for c in self.verify]

    def save(self) -> None:
        """Write the (refined) costs to the cache entry, so the next run starts from them: a
        calibration taken while another process loaded the CPU does not stick. Not while the
        machine is busy (`machine_busy`): costs measured then would mislead every later run."""
        if self.path is not None:
            write_entry(self.path, {"verify": self.verify})


def write_entry(path: Path, fields: dict) -> None:
    """A costs-folder entry: `fields` with the version fields `selfspec cache prune` checks. Not
    while the machine is busy (`machine_busy`): timings taken then would mislead every later run."""
    if machine_busy():
        return
    from selfspec import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**fields, "selfspec": __version__, "format": KEY_FORMAT}, indent=None)


def _key(model, threads: int) -> str:
    from selfspec import __version__, kernels
    from selfspec.hardware import cpu_info, isa_key
    from selfspec.models.loading import file_key

    info = cpu_info()
    # The effective instruction set (forced-AVX2 switches included) and our version are part of
    # the key: a forced-AVX2 run or a new release never reuses another's measurements.
    # ...and so is the build of our kernels (its file name carries the hash of their sources):
    # costs measured before a kernel changed would misjudge every draft after it.
    parts = [info["cpu"], isa_key(), __version__, info["torch"], file_key(Path(model.path)),
             model.dtype, model.kernel, str(threads), str(model.ctx_size), kernels.build_name()]
    device = getattr(model, "device", None)
    if device is not None and device.type != "cpu":  # a GPU's costs are its own (CPU keys unchanged)
        parts.append(str(device))
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _path(model) -> Path:
    from selfspec.paths import cache_dir

    return cache_dir() / "costs" / f"{_key(model, torch.get_num_threads())}.json"


def cached_costs(model, max_k: int | None = None) -> CostModel | None:
    """The costs an earlier calibration of this model file, dtype, kernel, thread count and
    context measured on this machine, if cached (and of `max_k` when given); None otherwise."""
    path = _path(model)
    try:
        verify = json.loads(path.read_text())["verify"]
        if max_k is not None and len(verify) != max_k + 1:
            return None
        return CostModel(verify, source="cached", path=path)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or a damaged entry (measured again by calibrate)


def calibrate(model, max_k: int = MAX_K, repeats: int = 3, use_cache: bool = True) -> CostModel:
    """Median time of forwards over 1..max_k+1 tokens after a short context; cached on disk."""
    path = _path(model)
    if use_cache:
        cached = cached_costs(model, max_k)
        if cached is not None:
            return cached
    tr = model.transformer
    # A private cache: calibrating (e.g. an `auto` built on first use, when a generation starts)
    # never touches the model's own cache, whoever is using it.
    context = min(32, max(1, model.ctx_size - max_k - 2))
    cache = tr.new_cache(context + max_k + 1)
    vocab = model.config.vocab_size
    ids = torch.arange(context + max_k + 1, dtype=torch.long, device=tr.device) % vocab
    from selfspec.progress import Bar

    with torch.inference_mode(), Bar(f"measuring forward-pass costs for drafting (once per model, context and "
                                     f"thread count)", (repeats + 1) * (max_k + 1), delay=1.0) as bar:
        tr.forward(ids[:context], 0, cache, last_only=True)
        times: list[list[float]] = [[] for _ in range(max_k + 1)]
        for rep in range(repeats + 1):
            for k in range(max_k + 1):
                bar.advance()
                synchronize(tr.device)
                t = time.perf_counter()
                # a greedy verify pass, as decoding runs it by default (its argmax: a native
                # model's greedy head; sampling's full logits cost more there, and online
                # refinement learns what the rounds really cost)
                tr.forward(ids[context: context + k + 1], context, cache, argmax=True)
                synchronize(tr.device)  # a GPU forward returns before it has run
                dt = time.perf_counter() - t
                cache.rollback(context)
                if rep:  # the first sweep warms kernels and allocator
                    times[k].append(dt)
    costs = CostModel([statistics.median(t) for t in times], path=path if use_cache else None)
    costs.save()
    return costs
