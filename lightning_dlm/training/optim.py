"""AdamW with decoupled weight decay and a warm-up + decay learning-rate schedule (plain torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional, Tuple

import torch
from torch import nn

from lightning_dlm.core.errors import DLMError


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW decay, applied to matrices only (not to biases, norms, embeddings' 1-D params).
        betas, adam_eps: AdamW constants.
        warmup_steps: linear warm-up from 0.
        lr_schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        min_lr_ratio: the decay's floor as a fraction of ``lr``.
        total_steps: length of the decay; default ``trainer.max_steps`` (read from the config,
            never from ``estimated_stepping_batches``, which would drop restored loader state).
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    total_steps: Optional[int] = None

    def check(self) -> "OptimConfig":
        """Refuse impossible values in one line each (before anything is built or written)."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DLMError(f"model.optim.lr must be a positive number, got {self.lr}: e.g. --model.optim.lr 1e-4")
        if self.weight_decay < 0:
            raise DLMError(f"model.optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise DLMError(f"model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise DLMError(f"model.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None and self.total_steps < 1:
            raise DLMError(f"model.optim.total_steps must be >= 1 (or unset for trainer.max_steps), got {self.total_steps}")
        if self.lr_schedule not in DECAYS:
            raise DLMError(f"unknown model.optim.lr_schedule '{self.lr_schedule}': choose one of {sorted(DECAYS)}")
        return self


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, floor: float) -> float:
    return floor + (1 - floor) * (1 - progress)


def _constant(progress: float, floor: float) -> float:
    return 1.0


DECAYS: Dict[str, Callable[[float, float], float]] = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return DECAYS[cfg.lr_schedule](progress, cfg.min_lr_ratio)


def param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices; leave biases, norms and other 1-D parameters undecayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw(params) -> Optional[bool]:
    """``fused=True`` (one multi-tensor CUDA kernel for the whole update, what torchtitan uses) when
    every parameter is a floating-point CUDA tensor (DTensor shards of FSDP2 included); else None,
    torch's default (the foreach implementation on CUDA, the loop on the CPU: the update a CPU run
    or test has always made)."""
    params = list(params)
    if params and all(p.device.type == "cuda" and torch.is_floating_point(p) for p in params):
        return True
    return None


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: Optional[int]):
    """AdamW and a per-step LambdaLR; ``total_steps`` is required unless the schedule is constant."""
    if cfg.lr_schedule not in DECAYS:
        raise DLMError(f"unknown lr_schedule '{cfg.lr_schedule}': choose one of {sorted(DECAYS)}")
    total = cfg.total_steps or total_steps
    if (total is None or total <= 0) and cfg.lr_schedule != "constant":
        raise DLMError(
            f"the {cfg.lr_schedule} lr schedule needs a length: set trainer.max_steps or model.optim.total_steps"
        )
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                  fused=fused_adamw([p for g in groups for p in g["params"]]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total or 1))
    return optimizer, scheduler
