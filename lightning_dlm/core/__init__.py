"""The bottom layer: pure-torch diffusion math (schedules, corruption, loss terms, attention
annealing and block masks), the diffusion config record, seeding and the one error type.

Nothing here imports Lightning, transformers or any other lightning_dlm package
(``tests/test_layering.py`` keeps it so).
"""

from lightning_dlm.core.annealing import (
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
from lightning_dlm.core.blocks import block_attention_allowed, block_mask_mod, block_size_at, block_sources
from lightning_dlm.core.corruption import corrupt, maskable_positions
from lightning_dlm.core.loss import LossTerms, loss_terms_from_rows, scored_rows
from lightning_dlm.core.schedules import (
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
    "anneal_ratio", "annealing_allowed", "annealing_mask", "attention_allowed", "causal_allowed", "corrupt",
    "get_schedule", "loss_terms_from_rows", "scored_rows", "maskable_positions", "sample_t", "t_grid",
]
