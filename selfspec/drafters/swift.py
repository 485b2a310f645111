"""On-the-fly layer skipping (`--skip-config online`; SWIFT, Xia et al., ICLR 2025): no offline
search. While it generates, the drafter alternates an optimisation phase and an acceleration phase:

- optimisation: before each draft (every `every` rounds), one iteration proposes a candidate skip
  set of a fixed size (skip ratio x the skippable sub-layers: random sets, and every `bayes_every`-th
  iteration the GP-UCB choice), scores it by *matchness* and keeps the best. It stops at a score of
  `threshold`, after `patience` iterations without improvement, or after `max_iter` iterations;
- acceleration: from then on it drafts with the best set, like `--draft layer-skip` with a config.

Drafting itself is `LayerSkipDrafter`'s (adaptive draft exit included) with the best set found so
far, so every round stays lossless whatever the optimisation does. Its iterations run inside
`propose`, so their time is draft time: every reported tokens/s pays for the optimisation.

The state (best set, score, iterations, observations) is cached per model under the cache folder
(`online/`, keyed by the model's sha256, dtype, skip ratio and kept layers), written whenever the
optimisation ends and every `bayes_every` iterations: the next request, in this process or a later
one, resumes the optimisation or starts in the acceleration phase. The cache file is a normal skip
config (`found_by: "online"`), as is what `--save-skip-config` writes.

Matchness: the fraction of the last `window` context positions j where the draft's top token at j
equals the full model's top token at j (both over raw logits, the token that follows j being
predicted). The draft runs once over those positions in one parallel forward pass, from the full
model's KV of everything before them: position j attends to the draft's own KV of the window's
earlier positions, i.e. exactly what drafting token after token from the window's start would
see. That pass writes KV into the target's cache; the slice is saved and restored bit for bit.
The full model's top token at j:
- greedy decoding without repetition penalty, generated positions: the sequence's next token. The
  verify pass chose it as the full model's argmax, so it costs nothing (SWIFT's choice);
- prompt positions (the prompt's next token is the user's text, not the model's choice), and every
  position under sampling or a repetition penalty (the next token is a sample, or the argmax of
  penalised logits): the argmax of one full forward pass over those positions, computed once per
  sequence and kept. So matchness always means the same thing: agreement of the two top-1 tokens.
Optimisation waits until the context holds `window` positions (SWIFT waits for as many generated
tokens). Scores of different iterations come from different (sliding) windows; SWIFT, which carries
its best score across requests, compares them the same way.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from selfspec.drafters.base import Draft, DraftContext
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.errors import InvalidParameterError, SkipConfigError
from selfspec.models.transformer import SkipSet

ONLINE = "online"
GP_MAX_POINTS = 256  # observations the GP is fitted on (the best half and the most recent half)


def is_online(skip_config) -> bool:
    """`--skip-config online[:key=value...]`: the reserved word (CONVENTIONS.md, "Skip config")."""
    return isinstance(skip_config, str) and skip_config.split(":", 1)[0] == ONLINE


@dataclass(frozen=True)
class OnlineSettings:
    """Defaults of SWIFT's paper and code, except where noted. Spec keys in `KEYS`."""

    skip_ratio: float = 0.45  # of the skippable sub-layers (those of the layers not kept)
    window: int = 50  # context positions matchness is scored on
    threshold: float = 0.93  # stop optimising at this matchness
    patience: int = 300  # stop after this many iterations without a better set
    max_iter: int = 1000  # stop after this many iterations (over all requests)
    bayes_every: int = 25  # every Nth iteration proposes by GP-UCB, the others at random
    every: int = 1  # one iteration every N draft rounds (SWIFT's opt_interval)
    keep_first: int = 1  # never skip the first / last N layers (SWIFT keeps the first and last)
    keep_last: int = 1
    kappa: float = 2.5  # UCB exploration weight (SWIFT's)
    seed: int = 0
    cache: bool = True  # read and write the per-model cache

    KEYS = {"ratio": "skip_ratio", "window": "window", "threshold": "threshold", "patience": "patience",
            "max_iter": "max_iter", "bayes_every": "bayes_every", "every": "every", "keep_first": "keep_first",
            "keep_last": "keep_last", "kappa": "kappa", "seed": "seed", "cache": "cache"}

    @classmethod
    def parse(cls, spec: str = ONLINE) -> "OnlineSettings":
        """`online` or `online:ratio=0.3:window=32` (colons, not commas: a bench method spec such as
        `layer-skip:skip=online:ratio=0.3` separates its own options with commas)."""
        head, *items = spec.split(":")
        if head != ONLINE:
            raise InvalidParameterError(f"not an online skip spec: {spec!r}")
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or key not in cls.KEYS:
                raise InvalidParameterError(
                    f"bad option {item!r} in --skip-config {spec!r}; options are key=value with key in "
                    f"{', '.join(cls.KEYS)}, e.g. online:ratio=0.3:window=32")
            name = cls.KEYS[key]
            try:
                if types[name] == "bool":
                    if value not in ("0", "1", "true", "false"):
                        raise ValueError
                    values[name] = value in ("1", "true")
                else:
                    values[name] = float(value) if types[name] == "float" else int(value)
            except ValueError:
                raise InvalidParameterError(f"option {key} of --skip-config {spec!r} must be a "
                                            f"{'0 or 1' if types[name] == 'bool' else 'number'}, got {value!r}") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0.0 < self.skip_ratio < 1.0:
            raise InvalidParameterError(f"online ratio must be in (0, 1), got {self.skip_ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InvalidParameterError(f"online threshold must be in [0, 1], got {self.threshold}")
        for name in ("window", "patience", "max_iter", "bayes_every", "every"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"online {name} must be >= 1, got {getattr(self, name)}")
        for name in ("keep_first", "keep_last"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"online {name} must be >= 0, got {getattr(self, name)}")
        if self.kappa < 0:
            raise InvalidParameterError(f"online kappa must be >= 0, got {self.kappa}")


class UcbGp:
    """GP-UCB over fixed-size skip sets, SWIFT's Bayesian proposal. A small GP of our own rather
    than Optuna: Optuna's GPSampler maximises expected improvement (not UCB) over free 0/1
    parameters, so a fixed skip count would only come from rounding, and each ask/tell goes
    through a study; here the acquisition is maximised directly over sets of the right size
    (random ones and single swaps of the best), in a few milliseconds inside the decode loop.
    Squared-exponential kernel on the 0/1 vectors with length-scale^2 = set size (one swap keeps
    ~e^(-1/k) correlation), scores normalised, noise 1e-2 as in SWIFT's GP."""

    def __init__(self, kappa: float, noise: float = 1e-2, pool: int = 256) -> None:
        self.kappa, self.noise, self.pool = kappa, noise, pool

    def propose(self, xs: torch.Tensor, ys: torch.Tensor, best: torch.Tensor, size: int,
                generator: torch.Generator) -> torch.Tensor:
        """The candidate (a 0/1 row with `size` ones) of highest mean + kappa * std."""
        X, y = xs.double(), ys.double()
        y = (y - y.mean()) / (y.std() if len(y) > 1 and y.std() > 0 else 1.0)
        cands = torch.cat((_random_rows(self.pool, xs.shape[1], size, generator), _swaps(best)))
        ell2 = 2.0 * size  # 2 l^2 with l^2 = size
        K = torch.exp(-torch.cdist(X, X).pow(2) / ell2) + self.noise * torch.eye(len(X), dtype=X.dtype)
        L = torch.linalg.cholesky(K)
        Ks = torch.exp(-torch.cdist(X, cands.double()).pow(2) / ell2)  # [n, m]
        mean = Ks.T @ torch.cholesky_solve(y[:, None], L)[:, 0]
        var = (1.0 - torch.linalg.solve_triangular(L, Ks, upper=False).pow(2).sum(0)).clamp_min(0)
        return cands[int(torch.argmax(mean + self.kappa * var.sqrt()))]


def _random_rows(n: int, dim: int, size: int, generator: torch.Generator) -> torch.Tensor:
    rows = torch.zeros(n, dim, dtype=torch.uint8, device="cpu")
    picks = torch.rand(n, dim, generator=generator).argsort(dim=1)[:, :size]
    return rows.scatter_(1, picks, 1)


def _swaps(row: torch.Tensor) -> torch.Tensor:
    """Every set that differs from `row` by one skipped sub-layer traded for a kept one."""
    on, off = row.nonzero()[:, 0], (row == 0).nonzero()[:, 0]
    out = row.repeat(len(on) * len(off), 1)
    i = torch.arange(len(out))
    out[i, on.repeat_interleave(len(off))] = 0
    out[i, off.repeat(len(on))] = 1
    return out


class OnlineSkipDrafter(LayerSkipDrafter):
    """Layer-skip drafting whose skip set is searched while generating; see the module docstring."""

    name = "layer-skip"

    def __init__(self, model, settings: OnlineSettings | None = None, **kwargs) -> None:
        from selfspec.drafters.skipspace import SkipSpace, model_identity, seed_sets

        self.settings = s = settings or OnlineSettings()
        s.check()
        n = model.config.n_layers
        self.space = SkipSpace(n, s.keep_first, s.keep_last)
        self.layers = list(self.space.layers)
        if not self.layers:
            raise InvalidParameterError(f"online keep_first {s.keep_first} and keep_last {s.keep_last} leave "
                                        f"no layer of {n} to skip")
        self.dim = 2 * len(self.layers)  # attention sub-layers, then MLP sub-layers
        self.size = max(1, int(s.skip_ratio * self.dim + 1e-9))  # SWIFT: int(ratio * skippable)
        self.model_name, self.sha = model_identity(model)
        self.model_path = model.path
        self.cache_path = cache_file(self.model_name, self.sha, s, model.dtype) if s.cache else None
        self.generator = torch.Generator().manual_seed(s.seed)
        self.gp = UcbGp(s.kappa)
        self.phase = "optimise"
        self.best: SkipSet | None = None
        self.best_score = -1.0
        self.iterations = 0  # over all requests
        self.since_best = 0  # iterations since the best improved
        self.observations: list[tuple[str, float]] = []  # (0/1 string of the set, matchness)
        # Evenly spread sets of the right size first (every other layer, a middle block,
        # attention only), then random ones.
        self._seeds = [x for x in seed_sets(self.space, self.size) if len(x) == self.size]
        start = self._seeds[0] if self._seeds else self._decode(_random_rows(1, self.dim, self.size, self.generator)[0])
        self.cached = False  # the state came from the cache
        self.gp_proposals = 0  # in this process
        super().__init__(self._config(start), **kwargs)
        if self.cache_path is not None:
            self._restore(self._cached_state(model.dtype))
        self.reset()

    @classmethod
    def for_model(cls, model, spec: str = ONLINE, **kwargs) -> "OnlineSkipDrafter":
        return cls(model, OnlineSettings.parse(spec), **kwargs)

    # ------------------------------------------------------------------------------ drafting
    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        if self._prompt_len is None:
            self._prompt_len = len(ctx.tokens) - 1
        if self.phase == "optimise":
            self._rounds += 1
            if (self._rounds - 1) % self.settings.every == 0 and len(ctx.tokens) - 1 >= self.settings.window:
                t = time.perf_counter()
                self._iterate(ctx)
                self._opt_seconds += time.perf_counter() - t
        return super().propose(ctx, max_tokens)

    def reset(self) -> None:
        super().reset()
        self._prompt_len: int | None = None
        self._full_top: torch.Tensor | None = None  # [max_len] full model's top token per position, -1 unknown
        self._rounds = 0
        self._opt_seconds = 0.0
        self._iterations_now = 0

    def extra_stats(self) -> dict:
        return {**super().extra_stats(), "found_by": ONLINE, "phase": self.phase, "iterations": self.iterations,
                "iterations_this_request": self._iterations_now, "optimise_seconds": round(self._opt_seconds, 4),
                "best_matchness": round(self.best_score, 4) if self.best is not None else None,
                "skip_ratio": round(len(self.skip) / self.dim, 4), "gp_proposals": self.gp_proposals,
                "from_cache": self.cached}

    # -------------------------------------------------------------------------- optimisation
    def _iterate(self, ctx: DraftContext) -> None:
        candidate = self._next_candidate()
        draft_top, full_top = self.agreement(ctx, candidate)
        score = float((draft_top == full_top).float().mean())
        self.iterations += 1
        self._iterations_now += 1
        self.observations.append((self._bits(candidate), score))
        if score > self.best_score:
            self.best, self.best_score, self.since_best = candidate, score, 0
            self.skip = candidate
        else:
            self.since_best += 1
        s = self.settings
        if self.best_score >= s.threshold or self.since_best >= s.patience or self.iterations >= s.max_iter:
            self.phase = "accelerate"
        if self.phase == "accelerate" or len(self.observations) > 2 * GP_MAX_POINTS:
            self.observations = self._gp_points()  # all the GP would look at: a small cache file
        self.config = self._config(self.best)  # what --save-skip-config writes: always the current state
        if self.phase == "accelerate" or self.iterations % s.bayes_every == 0:
            self._save()

    def _next_candidate(self) -> SkipSet:
        if self._seeds:
            return self._seeds.pop(0)
        if self.iterations % self.settings.bayes_every == self.settings.bayes_every - 1 and len(self.observations) >= 2:
            points = self._gp_points()
            xs = torch.tensor([[int(c) for c in b] for b, _ in points], dtype=torch.uint8, device="cpu")
            ys = torch.tensor([y for _, y in points], device="cpu")
            best = torch.tensor([int(c) for c in self._bits(self.best)], dtype=torch.uint8, device="cpu")
            self.gp_proposals += 1
            return self._decode(self.gp.propose(xs, ys, best, self.size, self.generator))
        return self._decode(_random_rows(1, self.dim, self.size, self.generator)[0])

    def _gp_points(self) -> list[tuple[str, float]]:
        obs = self.observations
        if len(obs) <= GP_MAX_POINTS:
            return list(obs)
        recent = obs[-GP_MAX_POINTS // 2:]
        best = sorted(obs[: -GP_MAX_POINTS // 2], key=lambda o: -o[1])[: GP_MAX_POINTS - len(recent)]
        return best + recent

    def agreement(self, ctx: DraftContext, skip: SkipSet) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft top-1, full model's top-1) `[W]` at the last W = min(window, len - 1) positions of
        the context: one parallel draft pass; the cache is left exactly as it was."""
        tr, cache, tokens = ctx.model.transformer, ctx.cache, ctx.tokens
        end = len(tokens) - 1  # positions [start, end): their next token is known
        start = max(0, end - self.settings.window)
        full_top = self._full_tops(ctx, start, end)
        with cache.snapshot(start, end):
            draft_top = tr.forward(torch.tensor(tokens[start:end], device=tr.device), start, cache, skip=skip).argmax(-1)
        return draft_top, full_top

    def _full_tops(self, ctx: DraftContext, start: int, end: int) -> torch.Tensor:
        """The full model's top-1 at positions [start, end) (module docstring: which and why)."""
        tops, tokens = self._full_top, ctx.tokens
        if tops is None or len(tops) < end:
            tops = self._full_top = torch.full((max(end, ctx.cache.max_len),), -1, dtype=torch.long,
                                              device=ctx.model.transformer.device)
        if ctx.sampling.plain_greedy:
            first = max(start, self._prompt_len - 1)  # from here on, the next token is the verify's argmax
            if first < end:
                tops[first:end] = torch.tensor(tokens[first + 1: end + 1], device=tops.device)
        missing = (tops[start:end] < 0).nonzero()[:, 0]
        if len(missing):
            a, b = start + int(missing[0]), start + int(missing[-1]) + 1
            with ctx.cache.snapshot(a, b):
                tops[a:b] = ctx.model.transformer.forward(torch.tensor(tokens[a:b], device=tops.device), a, ctx.cache).argmax(-1)
        return tops[start:end]

    # ------------------------------------------------------------------------- sets and state
    def _bits(self, skip: SkipSet) -> str:
        return "".join(str(int(i in skip.attention)) for i in self.layers) + \
            "".join(str(int(i in skip.mlp)) for i in self.layers)

    def _decode(self, row: torch.Tensor) -> SkipSet:
        n = len(self.layers)
        return SkipSet.of([i for j, i in enumerate(self.layers) if row[j]],
                          [i for j, i in enumerate(self.layers) if row[n + j]])

    def _config(self, skip: SkipSet) -> SkipConfig:
        """The state as a normal skip config (what --save-skip-config and the cache write)."""
        s = self.settings
        return SkipConfig(
            model=self.model_name, model_sha256=self.sha, n_layers=self.space.n_layers,
            attention=tuple(sorted(skip.attention)), mlp=tuple(sorted(skip.mlp)), found_by=ONLINE,
            objective={"name": "matchness", "value": round(max(self.best_score, 0.0), 4)},
            search={"online": {"settings": {k: v for k, v in asdict(s).items() if k != "cache"},
                               "phase": self.phase, "iterations": self.iterations, "since_best": self.since_best,
                               "scored": self.best is not None, "observations": list(self.observations)}},
            note=f"Found on the fly (SWIFT matchness over the last {s.window} context positions, "
                 f"{self.iterations} iterations).")

    def _save(self) -> None:
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.config.save(self.cache_path)

    def _cached_state(self, dtype: str) -> Path | None:
        """The cache file of this model's online state; for an HF folder, also one an older
        selfspec wrote under an older hash of the folder (moved to today's name on first save)."""
        from selfspec.models.registry import legacy_identities

        if self.cache_path.is_file():
            return self.cache_path
        for sha in legacy_identities(self.model_path):  # under any folder name: the hash decides
            tail = cache_file("", sha, self.settings, dtype).name
            found = sorted(self.cache_path.parent.glob(f"*{tail}"))
            if found:
                return found[0]
        return None

    def _restore(self, path: Path | None) -> None:
        """Resume from the cache; a cache that cannot be read is ignored (it never breaks a run)."""
        from selfspec.models.registry import identity_matches

        if path is None:
            return
        try:
            config = SkipConfig.load(path)
            state = config.search["online"]
            if (config.n_layers != self.space.n_layers or not state["scored"]
                    or not identity_matches(config.model_sha256, self.model_path, "the online skip cache")):
                return
            skip = config.skip
            observations = [(str(b), float(y)) for b, y in state["observations"]]
            if len(skip) != self.size or any(len(b) != self.dim for b, _ in observations):
                return
            phase, iterations, since_best = state["phase"], int(state["iterations"]), int(state["since_best"])
        except (SkipConfigError, KeyError, TypeError, ValueError):
            return
        self.best, self.best_score, self.skip = skip, float(config.objective["value"]), skip
        self.phase, self.iterations, self.since_best = phase, iterations, since_best
        self.observations, self._seeds, self.cached = observations, [], True
        self.config = replace(config, model_sha256=self.sha)  # saved under today's hash
        if path != self.cache_path:
            self._save()
            path.unlink(missing_ok=True)
        # Fresh draws after a restart: not the same random sets as the run that wrote the cache.
        self.generator.manual_seed(self.settings.seed + iterations)


def cache_file(name: str, sha: str, settings: OnlineSettings, dtype: str) -> Path:
    """Where the online state of a model (name, sha256) at this dtype and skip ratio lives in the
    cache folder."""
    from selfspec.paths import cache_dir

    key = json.dumps([settings.skip_ratio, settings.keep_first, settings.keep_last])
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir() / "online" / f"{safe}-{sha[:12]}-{dtype}-{digest}.json"
