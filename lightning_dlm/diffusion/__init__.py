"""Pure-torch diffusion math: schedules, corruption, loss and attention annealing.

Nothing here imports Lightning or transformers.
"""

from lightning_dlm.diffusion.annealing import (
    ANNEAL_MASKS,
    AnnealMask,
    RandomAnnealMask,
    RightContextAnnealMask,
    additive_attention_mask,
    anneal_ratio,
    annealing_allowed,
    annealing_mask,
    attention_allowed,
    causal_allowed,
)
from lightning_dlm.diffusion.blocks import block_attention_allowed, block_mask_mod, block_size_at, block_sources
from lightning_dlm.diffusion.corruption import corrupt, maskable_positions
from lightning_dlm.diffusion.loss import LossTerms, diffusion_loss, diffusion_loss_terms, loss_terms_from_rows, scored_rows
from lightning_dlm.diffusion.schedules import (
    SCHEDULES,
    T_SAMPLERS,
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    NoiseSchedule,
    PolynomialSchedule,
    get_schedule,
    sample_t,
    t_grid,
)

__all__ = [
    "ANNEAL_MASKS", "AnnealMask", "RandomAnnealMask", "RightContextAnnealMask", "SCHEDULES", "T_SAMPLERS",
    "CosineSchedule", "LinearSchedule", "LogLinearSchedule",
    "LossTerms", "NoiseSchedule", "PolynomialSchedule", "additive_attention_mask",
    "block_attention_allowed", "block_mask_mod", "block_size_at", "block_sources",
    "anneal_ratio", "annealing_allowed", "annealing_mask", "attention_allowed", "causal_allowed", "corrupt", "diffusion_loss",
    "diffusion_loss_terms", "get_schedule", "loss_terms_from_rows", "scored_rows", "maskable_positions", "sample_t", "t_grid",
]
