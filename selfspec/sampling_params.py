"""`SamplingParams`, the sampling settings of a request, and their checks: torch-free, so that the
command line checks them before importing torch or loading a model (the transforms that use them
are in selfspec/sampling.py, which re-exports this class)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from selfspec.errors import InvalidParameterError

_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def _real(name: str, value: object) -> float:
    # bool is an int subclass, but `temperature=True` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}."
        )
    as_float = float(value)
    if not math.isfinite(as_float):
        raise InvalidParameterError(f"{name} must be a finite number, got {value!r}.")
    return as_float


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(
            f"{name} must be an integer, got {value!r} of type {type(value).__name__}."
        )
    return int(value)


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    as_int = _integer("seed", seed)
    if not 0 <= as_int < _SEED_LIMIT:
        raise InvalidParameterError(f"seed must be in [0, 2**64), got {seed!r}.")
    return as_int


@dataclass(frozen=True)
class SamplingParams:
    """How to choose the next token. The defaults give plain greedy decoding.

    temperature: 0 means greedy, otherwise logits are divided by it (must be >= 0).
    top_k: keep only the k most likely tokens; 0 turns it off (must be >= 0).
    top_p: keep the smallest set of most likely tokens whose probability sums to at least
        top_p (0 < top_p <= 1; 1 turns it off).
    min_p: drop tokens whose probability is below min_p times the largest one
        (0 <= min_p < 1; 0 turns it off).
    repetition_penalty: for tokens already in the history, a positive logit is divided by it and
        a negative one multiplied by it (CTRL / Hugging Face convention; must be > 0, 1 = off).
    seed: seed of the sampling generator; None draws a fresh one.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise InvalidParameterError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}."
            )
        top_k = _integer("top_k", self.top_k)
        if top_k < 0:
            raise InvalidParameterError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}.")
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise InvalidParameterError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        min_p = _real("min_p", self.min_p)
        if not 0 <= min_p < 1:
            raise InvalidParameterError(
                f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}."
            )
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise InvalidParameterError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}."
            )
        seed = _check_seed(self.seed)
        # Store plain Python numbers so that numpy scalars or ints don't leak into the transforms.
        for name, value in (
            ("temperature", temperature),
            ("top_k", top_k),
            ("top_p", top_p),
            ("min_p", min_p),
            ("repetition_penalty", penalty),
            ("seed", seed),
        ):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a repetition penalty: each next token is the argmax of its row's raw
        logits, which a forward can return itself (Transformer.forward's `argmax`)."""
        return self.greedy and self.repetition_penalty == 1.0


