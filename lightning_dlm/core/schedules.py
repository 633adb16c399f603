"""Noise schedules of absorbing-state (masked) diffusion.

``alpha(t)`` is the probability that a token is still clean at time ``t`` in (0, 1]; a token is
masked with probability ``1 - alpha(t)``. The continuous-time ELBO weights the masked
cross-entropy by ``w(t) = -alpha'(t) / (1 - alpha(t))``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Type, Union

import torch

from lightning_dlm.core.errors import DLMError


class NoiseSchedule:
    """Base class: subclasses define ``alpha`` and ``alpha_prime`` on tensors of times."""

    name: str = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability ``1 - alpha(t)`` that a maskable token is masked at time ``t``."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight ``-alpha'(t) / (1 - alpha(t))``."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class LinearSchedule(NoiseSchedule):
    """``alpha(t) = 1 - t`` (the paper's choice); ``w(t) = 1 / t``."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def mask_prob(self, t):
        """``t`` itself: ``1 - (1 - t)`` would round away low digits of a small ``t``."""
        return t.clone()

    def weight(self, t):
        return 1.0 / t


class CosineSchedule(NoiseSchedule):
    """``alpha(t) = cos(pi t / 2)``; ``w(t) = (pi / 2) cot(pi t / 4)``.

    ``1 - cos(x)`` cancels for small ``x``; the half-angle forms ``1 - cos(x) = 2 sin^2(x / 2)``
    and ``sin(x) / (1 - cos(x)) = cot(x / 2)`` keep full float32 precision down to small ``t``.
    """

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def mask_prob(self, t):
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2

    def weight(self, t):
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)


class PolynomialSchedule(NoiseSchedule):
    """``alpha(t) = 1 - t**power``; ``w(t) = power / t``."""

    name = "polynomial"

    def __init__(self, power: float = 2.0):
        if power <= 0:
            raise DLMError(f"polynomial schedule power must be > 0, got {power}: use e.g. power: 2")
        self.power = float(power)

    def alpha(self, t):
        return 1.0 - t**self.power

    def alpha_prime(self, t):
        return -self.power * t ** (self.power - 1.0)

    def mask_prob(self, t):
        """``t**power`` directly: ``1 - alpha(t)`` cancels for small ``t``."""
        return t**self.power

    def weight(self, t):
        return self.power / t


class LogLinearSchedule(NoiseSchedule):
    """MDLM's log-linear schedule ``alpha(t) = 1 - (1 - eps) t`` (never fully masked)."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0 <= eps < 1:
            raise DLMError(f"loglinear schedule eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.eps))

    def mask_prob(self, t):
        """``(1 - eps) t`` directly: ``1 - alpha(t)`` cancels for small ``t``."""
        return (1.0 - self.eps) * t

    def weight(self, t):
        return 1.0 / t


SCHEDULES: Dict[str, Type[NoiseSchedule]] = {
    cls.name: cls for cls in (LinearSchedule, CosineSchedule, PolynomialSchedule, LogLinearSchedule)
}

ScheduleLike = Union[str, NoiseSchedule]


def get_schedule(schedule: ScheduleLike, **kwargs) -> NoiseSchedule:
    """A schedule object from a name in :data:`SCHEDULES` (with constructor kwargs) or as is."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    cls = SCHEDULES.get(str(schedule))
    if cls is None:
        raise DLMError(f"unknown noise schedule '{schedule}': choose one of {sorted(SCHEDULES)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise DLMError(f"bad arguments {kwargs} for the '{schedule}' schedule: {err}") from None


# --- time sampling --------------------------------------------------------------------------

def _uniform(u: torch.Tensor) -> torch.Tensor:
    return u


def _antithetic(u: torch.Tensor) -> torch.Tensor:
    half = (u.shape[0] + 1) // 2
    return torch.cat([u[:half], 1.0 - u[: u.shape[0] - half]])


def _stratified(u: torch.Tensor) -> torch.Tensor:
    n = u.shape[0]
    return (torch.arange(n, device=u.device, dtype=u.dtype) + u) / n


T_SAMPLERS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "uniform": _uniform,
    "antithetic": _antithetic,
    "stratified": _stratified,
}


def sample_t(
    batch_size: int,
    eps: float = 1e-3,
    method: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    high: float = 1.0,
) -> torch.Tensor:
    """Draw one time per sequence in ``[eps, high)`` (``high`` 1 unless a caller floors 1 - t too,
    e.g. the complementary masks: ``high = 1 - eps``).

    ``uniform``: i.i.d. U(eps, high); ``antithetic``: pairs (u, 1 - u) across the batch;
    ``stratified``: one draw in each of ``batch_size`` equal strata. All three are unbiased for
    E_t; the last two lower the variance of the batch estimate. Note: BD3-LM's ``antithetic``
    option is what is called ``stratified`` here (its draws are (k + u) / n, one per stratum);
    ours is the classic antithetic pairing.
    """
    if method not in T_SAMPLERS:
        raise DLMError(f"unknown t sampling '{method}': choose one of {sorted(T_SAMPLERS)}")
    if not 0 <= eps < high <= 1:
        raise DLMError(f"t must be drawn from [eps, high) with 0 <= eps < high <= 1, got eps {eps}, high {high}")
    u = torch.rand(batch_size, generator=generator, device=device)
    return eps + (high - eps) * T_SAMPLERS[method](u)


def t_grid(levels: int, eps: float = 1e-3) -> torch.Tensor:
    """``levels`` midpoints of equal strata of [eps, 1]: a fixed quadrature grid for E_t."""
    k = torch.arange(levels, dtype=torch.float64)
    return (eps + (1.0 - eps) * (k + 0.5) / levels).float()
