"""Configuration record of the diffusion objective (parsed by the CLI from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from lightning_dlm.core.errors import DLMError


@dataclass
class DiffusionConfig:
    """The training objective.

    Args:
        schedule: noise schedule name (linear, cosine, polynomial, loglinear).
        schedule_kwargs: its constructor arguments (e.g. ``{power: 2}`` for polynomial).
        eps: t is drawn from U(eps, 1) (paper: 1e-3).
        t_sampling: uniform, antithetic or stratified draws of t across the batch.
        shift: predict token i from the hidden state at i-1 (keeps the AR alignment).
        normalization: ``elbo`` (negative ELBO per token) or ``masked`` (reference code's choice).
        anneal_steps: optimiser steps of causal-to-bidirectional annealing (0 = bidirectional).
        anneal_mask: ``random`` (reference) or ``right_context`` (structured) annealing mask.
        attention: ``bidirectional`` (the paper) or ``block`` (block diffusion: bidirectional inside
            blocks of ``block_size`` tokens, causal across them; see lightning_dlm.core.blocks).
        block_size: the block size of a block model (sampling, validation, export).
        block_size_schedule: training block sizes by step, ``{step: size}`` or ``[[step, size], ...]``,
            non-decreasing, ending at ``block_size`` (the block mode's annealing); None = constant.
        block_t: ``sequence`` (one t per sequence) or ``block`` (one t per block) in block mode.
        complementary_masks: also train every sequence with the complementary mask (Fast-dLLM v2;
            linear schedule only).
    """

    schedule: str = "linear"
    schedule_kwargs: Dict[str, Any] = field(default_factory=dict)
    eps: float = 1e-3
    t_sampling: Literal["uniform", "antithetic", "stratified"] = "uniform"
    shift: bool = True
    normalization: Literal["elbo", "masked"] = "elbo"
    anneal_steps: int = 0
    anneal_mask: Literal["random", "right_context"] = "random"
    attention: Literal["bidirectional", "block"] = "bidirectional"
    block_size: int = 32
    block_size_schedule: Optional[Union[Dict[int, int], List[List[int]]]] = None
    block_t: Literal["sequence", "block"] = "sequence"
    complementary_masks: bool = False

    @property
    def is_block(self) -> bool:
        return self.attention == "block"

    def check(self) -> "DiffusionConfig":
        """Refuse impossible values in one line each (before anything is built or written)."""
        if self.anneal_steps < 0:
            raise DLMError(f"model.diffusion.anneal_steps must be >= 0 (0 = bidirectional from the start), "
                           f"got {self.anneal_steps}")
        if not 0.0 < self.eps < 1.0:
            raise DLMError(f"model.diffusion.eps must be in (0, 1), got {self.eps}: the paper uses 1e-3")
        if self.attention not in ("bidirectional", "block"):
            raise DLMError(f"model.diffusion.attention must be bidirectional or block, got '{self.attention}'")
        if self.is_block:
            from lightning_dlm.core.blocks import check_block_options

            check_block_options(self)
        return self
