"""The bottom layer: pure-torch diffusion math (schedules, corruption, loss terms, attention
annealing and block masks), the diffusion config record, seeding and the one error type.

Nothing here imports Lightning, transformers or any other lightning_dlm package
(``tests/test_layering.py`` keeps it so).
"""

import importlib

# The re-exports are imported on first use, so that importing one small module of the core (say
# lightning_dlm.core.errors, which `dlm --help` needs) does not import torch.
_WHERE = {
    **dict.fromkeys([
        "ANNEAL_MASKS", "AnnealMask", "RandomAnnealMask", "RightContextAnnealMask", "additive_attention_mask", "anneal_ratio",
        "annealing_allowed", "annealing_mask", "attention_allowed", "causal_allowed",
    ], "annealing"),
    **dict.fromkeys([
        "block_attention_allowed", "block_mask_mod", "block_size_at", "block_sources",
    ], "blocks"),
    **dict.fromkeys([
        "corrupt", "maskable_positions",
    ], "corruption"),
    **dict.fromkeys([
        "LossTerms", "loss_terms_from_rows", "scored_rows",
    ], "loss"),
    **dict.fromkeys([
        "CosineSchedule", "LinearSchedule", "LogLinearSchedule", "NoiseSchedule", "PolynomialSchedule", "SCHEDULES",
        "T_SAMPLERS", "get_schedule", "sample_t", "t_grid",
    ], "schedules"),
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"lightning_dlm.core.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lightning_dlm.core' has no attribute {name!r}")
