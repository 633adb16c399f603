"""What an objective is, and the registry of them by ``model.objective`` name.

An :class:`Objective` owns the loss of a run: :meth:`~Objective.train_terms` (one training batch:
the loss terms, which positions were masked, extra scalars to log) and
:meth:`~Objective.eval_nll` (the NLL, or its bound, per target token of an evaluation batch).
``DiffusionLM`` builds one with :func:`build_objective` and runs nothing else.

Noise is a pure function of (seed, batch counter, rank): a training batch draws t and its masks
from ``make_generator(seed, counter, rank)`` and its annealing mask from the hash seeded by
``derive_seed(seed, counter, rank, 2)``; evaluation draws from ``make_generator(seed, batch_key,
level, 7)`` (or ``(seed, row_key, level, 8)`` per row), so a resumed run and a repeated evaluation
draw exactly what the first one drew.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.loss import LossTerms
from lightning_dlm.core.schedules import get_schedule, t_grid
from lightning_dlm.core.seeding import make_generator


@dataclass
class StepTerms:
    """What one training batch gives: the loss terms, the masked and maskable positions (B, L) (the
    masked fraction is logged), the annealing ratio and extra per-step scalars to log by name."""

    terms: LossTerms
    masked: torch.Tensor
    maskable: torch.Tensor
    anneal_ratio: float
    logs: Dict[str, float] = field(default_factory=dict)


class Objective:
    """The loss of a run, built from the diffusion config (its schedule), the seed and the number
    of validation levels of t. Subclasses implement :meth:`train_terms` and :meth:`eval_nll`."""

    name = ""

    def __init__(self, diffusion: DiffusionConfig, seed: int = 0, val_t_levels: int = 8):
        self.cfg = diffusion
        self.seed = seed
        self.val_t_levels = val_t_levels
        self.schedule = get_schedule(diffusion.schedule, **(diffusion.schedule_kwargs or {}))

    def train_terms(self, net, batch: Dict[str, torch.Tensor], *, step: int, counter: int, rank: int) -> StepTerms:
        """The terms of one training batch at optimiser step ``step``; ``counter`` (the batch's index)
        and ``rank`` seed its noise."""
        raise NotImplementedError

    def eval_nll(self, net, x0: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, batch_key: int = 0,
                 levels: Optional[int] = None, document_ids: Optional[torch.Tensor] = None,
                 row_keys: Optional[torch.Tensor] = None,
                 protected: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
        """(NLL or its bound per target token, number of target tokens) of an evaluation batch."""
        raise NotImplementedError


class GridObjective(Objective):
    """An objective whose evaluation NLL is a bound estimated on a fixed grid of t with fixed masks
    (the diffusion objectives): subclasses give the terms at one level, :meth:`level_terms`."""

    def level_terms(self, net, x0: torch.Tensor, t: torch.Tensor, attention_mask, generator, document_ids,
                    protected) -> LossTerms:
        """The loss terms of ``x0`` noised at times ``t`` (B,), masks drawn from ``generator``."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_nll(self, net, x0, attention_mask=None, *, batch_key=0, levels=None, document_ids=None, row_keys=None,
                 protected=None):
        """Negative ELBO per target token of a batch, on a fixed grid of t with fixed masks.

        The estimate is a pure function of the weights, the batch and ``batch_key``: two
        evaluations of the same weights agree exactly. With ``row_keys`` (B,) (e.g. the global
        index of each evaluation block) every row draws its masks from its own key instead, so
        the result does not depend on how rows are batched or sharded across ranks.
        """
        levels = levels or self.val_t_levels
        total = torch.zeros((), device=x0.device)
        num_targets = 0
        for k, level in enumerate(t_grid(levels, self.cfg.eps).tolist()):
            if row_keys is None:
                generator = make_generator(self.seed, batch_key, k, 7, device=x0.device)
            else:
                generator = [make_generator(self.seed, int(key), k, 8, device=x0.device) for key in row_keys.tolist()]
            t = torch.full((x0.shape[0],), level, device=x0.device)
            terms = self.level_terms(net, x0, t, attention_mask, generator, document_ids, protected)
            total = total + terms.weighted_sum
            num_targets = terms.num_targets
        return total / (levels * num_targets), int(num_targets)  # one host sync per batch: an int weight


def subs_drop_id(diffusion: DiffusionConfig, net) -> Optional[int]:
    """The token id SUBS leaves out of the softmax of every target's log-probability (the added
    mask token), or None when SUBS is off (``diffusion.subs``; auto: on for an added mask token)."""
    return net.mask_token_id if diffusion.subs_on(net.mask_token_added) else None


#: ``model.objective`` name -> {``diffusion.attention`` it is for (None: any) -> Objective class}
OBJECTIVES: Dict[str, Dict[Optional[str], Type[Objective]]] = {}


def register_objective(name: str, attention: Optional[str] = None) -> Callable[[Type[Objective]], Type[Objective]]:
    """Class decorator: the objective of ``model.objective: name`` (with ``attention``, only under
    that ``diffusion.attention``, e.g. the block objective of ``diffusion``)."""

    def add(cls: Type[Objective]) -> Type[Objective]:
        variants = OBJECTIVES.setdefault(name, {})
        if attention in variants:
            raise DLMError(f"objective '{name}' (attention {attention}) is registered twice")
        variants[attention] = cls
        cls.name = name
        return cls

    return add


def build_objective(name: str, diffusion: DiffusionConfig, seed: int = 0, val_t_levels: int = 8) -> Objective:
    """The objective a run of ``model.objective: name`` trains under ``diffusion``."""
    variants = OBJECTIVES.get(name)
    if variants is None:
        raise DLMError(f"unknown model.objective '{name}': choose one of {', '.join(OBJECTIVES)}")
    cls = variants.get(diffusion.attention, variants.get(None))
    if cls is None:
        raise DLMError(f"model.objective '{name}' has no objective for diffusion.attention '{diffusion.attention}'")
    return cls(diffusion, seed=seed, val_t_levels=val_t_levels)
