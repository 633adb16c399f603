"""Decoding strategies: which masked slots to commit at a step, and to which tokens.

A strategy is a small class registered under a name in :data:`STRATEGIES`; the sampler
(:mod:`lightning_dlm.sampling.engine`) calls ``strategy.step(ctx)`` once per denoising step with
a :class:`StepContext` that holds the slots still to decode in the current block, lazy access to
the model's slot-aligned logits (the forward pass runs only when a strategy asks for them) and
one random generator per row. ``step`` returns a boolean commit mask and the tokens of the
committed slots, both ``(B, block length)``, or ``None`` when it commits nothing.

Contract: at the last step of a block (``ctx.steps_left == 1``) a strategy commits every
eligible slot, so a block always finishes within its steps. Randomness is drawn only for rows
that still have eligible slots, from that row's own generator, so a row's result does not depend
on the other rows of the batch.

* ``random``: the paper's ancestral sampler. Going from t to s < t every still-masked slot is
  committed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) (1/k on a uniform linear
  grid); tokens are drawn with temperature / top-k / top-p. A step that commits nothing skips
  the forward pass.
* ``confidence``: commit the ``ceil(remaining / steps left)`` most confident slots; confidence is
  the probability of the chosen token (``probability``), the gap between the two most likely
  tokens (``margin``) or the negative entropy (``entropy``); tokens are argmax at temperature 0,
  sampled otherwise; ``rank_noise`` > 0 adds Gumbel noise of that scale to the ranking.
* ``threshold``: confidence order that also commits every slot whose confidence exceeds
  ``threshold`` (Fast-dLLM's parallel decoding); with T equal to the length the floor is one slot
  per step, exactly Fast-dLLM's rule.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.schedules import NoiseSchedule
from lightning_dlm.sampling.filtering import filter_logits

Commit = Tuple[torch.Tensor, torch.Tensor]  # (commit mask (B, Lb) bool, tokens (B, Lb) long)


@dataclass
class StepContext:
    """What a strategy sees at one step of one block."""

    eligible: torch.Tensor  # (B, Lb) bool: masked slots of the current block in rows still decoding
    step: int  # step index inside the block
    steps: int  # the block's number of steps
    schedule: NoiseSchedule
    generators: List[torch.Generator]  # one per row
    temperature: float
    top_k: int
    top_p: float
    _logits_fn: Callable[[], torch.Tensor]
    _logits_at_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    _logits: Optional[torch.Tensor] = None

    @property
    def steps_left(self) -> int:
        return self.steps - self.step

    @property
    def is_last(self) -> bool:
        return self.steps_left <= 1

    def logits(self) -> torch.Tensor:
        """Slot-aligned float logits (B, Lb, V) of the current block (runs the forward pass once)."""
        if self._logits is None:
            self._logits = self._logits_fn()
        return self._logits

    def logits_at(self, mask: torch.Tensor) -> torch.Tensor:
        """``logits()[mask]`` (N, V), with the LM head run only at the columns of ``mask``.

        One forward pass per step: after this call, asking for more logits is an error (a strategy
        that needs several views calls :meth:`logits` first).
        """
        if self._logits is not None or self._logits_at_fn is None:
            return self.logits()[mask]
        at, self._logits_at_fn, self._logits_fn = self._logits_at_fn, None, _refuse_second_pass
        return at(mask)

    def rows_with_work(self) -> List[int]:
        return self.eligible.any(1).nonzero().flatten().tolist()

    # --- per-row random draws -------------------------------------------------------------------
    def uniform(self, row: int, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generators[row], device=self.eligible.device)

    def gumbel(self, row: int, n: int) -> torch.Tensor:
        u = self.uniform(row, n).clamp(1e-20, 1.0 - 1e-7)
        return -torch.log(-torch.log(u))

    def choose_tokens(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """One token per row of ``logits`` (N, V); ``rows`` (N,) says whose generator draws it."""
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(filter_logits(logits / self.temperature, self.top_k, self.top_p), dim=-1)
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for b in rows.unique().tolist():
            sel = rows == b
            out[sel] = torch.multinomial(probs[sel], 1, generator=self.generators[b]).squeeze(-1)
        return out


def _refuse_second_pass() -> torch.Tensor:
    raise RuntimeError("a strategy asked for the full logits after logits_at(): call logits() first instead")


class Strategy:
    """Base class: subclasses set ``name`` and implement :meth:`step`."""

    name: ClassVar[str] = ""

    def step(self, ctx: StepContext) -> Optional[Commit]:
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        return {"strategy": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


STRATEGIES: Dict[str, Type[Strategy]] = {}


def register(cls: Type[Strategy]) -> Type[Strategy]:
    """Add a strategy class under its ``name``; a name already taken by another class is refused."""
    taken = STRATEGIES.get(cls.name)
    if taken is not None and taken is not cls:
        raise DLMError(
            f"a sampling strategy named '{cls.name}' is already registered ({taken.__module__}.{taken.__qualname__}): "
            f"give {cls.__qualname__} another name"
        )
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(strategy, **options) -> Strategy:
    """A :class:`Strategy` from its registered name (and options), or the instance itself."""
    if isinstance(strategy, Strategy):
        if options:
            raise DLMError("give strategy options either to the strategy object or by name, not both")
        return strategy
    if strategy not in STRATEGIES:
        raise DLMError(f"unknown sampling strategy '{strategy}': choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[strategy]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DLMError(f"strategy '{strategy}' takes no option {unknown}: its options are {accepted or 'none'}")
    return cls(**options)


# --- confidence measures --------------------------------------------------------------------------
def _probability(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _margin(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def _neg_entropy(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


CONFIDENCES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "probability": _probability,
    "margin": _margin,
    "entropy": _neg_entropy,
}


def reveal_probability(schedule: NoiseSchedule, step: int, steps: int) -> float:
    """Probability that a masked slot is committed going from grid point ``step`` to ``step + 1``."""
    if step >= steps - 1:
        return 1.0
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alpha_t, alpha_s = schedule.alpha(grid[step]), schedule.alpha(grid[step + 1])
    return float((alpha_s - alpha_t) / (1.0 - alpha_t))


# --- strategies -----------------------------------------------------------------------------------
@register
class RandomOrder(Strategy):
    """The paper's ancestral sampler (random order, schedule-driven reveal probability)."""

    name = "random"

    def step(self, ctx: StepContext) -> Optional[Commit]:
        p = reveal_probability(ctx.schedule, ctx.step, ctx.steps)
        commit = torch.zeros_like(ctx.eligible)
        for b in ctx.rows_with_work():
            commit[b] = ctx.eligible[b] & (ctx.uniform(b, ctx.eligible.shape[1]) < p)
        if not commit.any():
            return None  # no forward pass needed
        tokens = torch.zeros(commit.shape, dtype=torch.long, device=commit.device)
        tokens[commit] = ctx.choose_tokens(ctx.logits_at(commit), commit.nonzero()[:, 0])
        return commit, tokens


@register
class ConfidenceOrder(Strategy):
    """Commit the most confident slots first, ``ceil(remaining / steps left)`` per step and row."""

    name = "confidence"

    def __init__(self, confidence: str = "probability", rank_noise: float = 0.0):
        if confidence not in CONFIDENCES:
            raise DLMError(f"unknown confidence '{confidence}': choose one of {sorted(CONFIDENCES)}")
        if rank_noise < 0:
            raise DLMError(f"rank_noise must be >= 0, got {rank_noise}")
        self.confidence = confidence
        self.rank_noise = float(rank_noise)

    def _extra(self, conf: torch.Tensor) -> Optional[torch.Tensor]:
        """Slots committed beyond the count (the threshold strategy's hook), on the flat slots."""
        return None

    def step(self, ctx: StepContext) -> Optional[Commit]:
        eligible = ctx.eligible
        if not eligible.any():
            return None
        flat_rows = eligible.nonzero()[:, 0]
        logits = ctx.logits()[eligible]  # (N, V)
        tokens_flat = ctx.choose_tokens(logits, flat_rows)
        probs = torch.softmax(logits, dim=-1)
        conf_flat = CONFIDENCES[self.confidence](probs, tokens_flat)
        score = torch.full(eligible.shape, float("-inf"), device=eligible.device)
        score[eligible] = conf_flat.float()
        if self.rank_noise > 0:
            for b in ctx.rows_with_work():
                n = int(eligible[b].sum())
                score[b, eligible[b]] += self.rank_noise * ctx.gumbel(b, n)
        remaining = eligible.sum(1)
        count = torch.div(remaining + ctx.steps_left - 1, ctx.steps_left, rounding_mode="floor")
        if ctx.is_last:
            count = remaining
        order = score.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        commit = eligible & (ranks < count.unsqueeze(1))
        extra = self._extra(conf_flat)
        if extra is not None:
            more = torch.zeros_like(eligible)
            more[eligible] = extra
            commit |= more
        tokens = torch.zeros(eligible.shape, dtype=torch.long, device=eligible.device)
        tokens[eligible] = tokens_flat
        return commit, tokens


@register
class ThresholdParallel(ConfidenceOrder):
    """Confidence order that also commits every slot whose confidence exceeds ``threshold``."""

    name = "threshold"

    def __init__(self, threshold: float = 0.9, confidence: str = "probability", rank_noise: float = 0.0):
        super().__init__(confidence, rank_noise)
        if not math.isfinite(threshold):
            raise DLMError(f"threshold must be a finite number, got {threshold}")
        self.threshold = float(threshold)

    def _extra(self, conf: torch.Tensor) -> Optional[torch.Tensor]:
        return conf > self.threshold
