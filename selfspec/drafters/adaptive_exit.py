"""The adaptive draft exit of layer-skip and the trained drafters (torch-free, so that the command
line checks --gamma, --alpha, ... before importing torch; re-exported by layerskip.py)."""
from __future__ import annotations

from dataclasses import dataclass

from selfspec.errors import InvalidParameterError


@dataclass
class AdaptiveExit:
    """Adaptive draft-exiting of Draft & Verify (Sec. 3.3): stop drafting when the draft's top
    probability falls below gamma, and move gamma after each round towards a target acceptance
    rate alpha:
        AR~ <- beta1 AR~ + (1 - beta1) AR_e
        gamma~ <- gamma + eps if AR~ <= alpha else gamma - eps
        gamma <- beta2 gamma + (1 - beta2) gamma~
    Defaults follow the Draft & Verify code (gamma0 0.8 there, 0.6 in its evaluations; beta1 0.5,
    alpha 0.9, eps 0.01, beta2 0.9). gamma and AR~ carry over between requests, as in its evaluation.
    """

    gamma: float = 0.6
    alpha: float = 0.9
    epsilon: float = 0.01
    beta1: float = 0.5
    beta2: float = 0.9
    adaptive: bool = True
    smoothed_ar: float | None = None

    def __post_init__(self) -> None:
        for name in ("gamma", "alpha", "beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InvalidParameterError(f"--{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise InvalidParameterError(f"--epsilon must be in [0, 1], got {self.epsilon}")
        if self.smoothed_ar is None:
            self.smoothed_ar = self.alpha

    def update(self, accepted: int, proposed: int, hit_max: bool) -> None:
        if not self.adaptive or proposed == 0 or hit_max:
            return
        ar = accepted / proposed
        self.smoothed_ar = self.beta1 * self.smoothed_ar + (1 - self.beta1) * ar
        step = self.epsilon if self.smoothed_ar <= self.alpha else -self.epsilon
        self.gamma = self.beta2 * self.gamma + (1 - self.beta2) * (self.gamma + step)
