"""Configuration record of the diffusion objective (parsed by the CLI from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.loss import NORMALIZATIONS


@dataclass
class DiffusionConfig:
    """The training objective.

    Args:
        schedule: noise schedule name (linear, cosine, polynomial, loglinear).
        schedule_kwargs: its constructor arguments (e.g. ``{power: 2}`` for polynomial).
        eps: t is drawn from U(eps, 1) (paper: 1e-3).
        t_sampling: uniform, antithetic or stratified draws of t across the batch. ``antithetic``
            pairs u with 1 - u; it is NOT what BD3-LM calls antithetic: BD3-LM's ``antithetic``
            (one draw in each of n equal strata, (k + u) / n) is our ``stratified``.
        shift: predict token i from the hidden state at i-1 (keeps the AR alignment).
        normalization: ``elbo`` (negative ELBO per token), ``masked`` (the weighted sum divided by
            the number of masked tokens: the reference code's choice) or ``unweighted`` (the plain
            mean cross-entropy of the masked tokens, no w(t): Fast-dLLM v2's loss). The training
            loss only: validation always reports the NELBO.
        subs: the SUBS parameterization (MDLM, BD3-LM): the mask token's logit is set to -inf before
            every log-probability of a target (exact: no target is ever the mask token). None =
            on for an added mask token, off for a reused one (whose id is also a real token, that
            targets can be); true with a reused mask token is refused.
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
    normalization: Literal["elbo", "masked", "unweighted"] = "elbo"
    anneal_steps: int = 0
    anneal_mask: Literal["random", "right_context"] = "random"
    attention: Literal["bidirectional", "block"] = "bidirectional"
    block_size: int = 32
    block_size_schedule: Optional[Union[Dict[int, int], List[List[int]]]] = None
    block_t: Literal["sequence", "block"] = "sequence"
    complementary_masks: bool = False
    subs: Optional[bool] = None

    @property
    def is_block(self) -> bool:
        return self.attention == "block"

    def subs_on(self, mask_token_added: bool) -> bool:
        """Whether SUBS applies for a model whose mask token was added (True) or reused (False);
        a one-line DLMError for ``subs: true`` with a reused mask token."""
        if self.subs is None:
            return bool(mask_token_added)
        if self.subs and not mask_token_added:
            raise DLMError("model.diffusion.subs: true needs an added mask token (mask_token.mode: add): a reused "
                           "mask token is a real token that targets can be; set subs: false (or leave it out)")
        return bool(self.subs)

    def check(self) -> "DiffusionConfig":
        """Refuse impossible values in one line each (before anything is built or written)."""
        if self.anneal_steps < 0:
            raise DLMError(f"model.diffusion.anneal_steps must be >= 0 (0 = bidirectional from the start), "
                           f"got {self.anneal_steps}")
        if not 0.0 < self.eps < 1.0:
            raise DLMError(f"model.diffusion.eps must be in (0, 1), got {self.eps}: the paper uses 1e-3")
        if self.normalization not in NORMALIZATIONS:
            raise DLMError(f"model.diffusion.normalization must be one of {', '.join(NORMALIZATIONS)}, "
                           f"got '{self.normalization}'")
        if self.subs not in (None, True, False):
            raise DLMError(f"model.diffusion.subs must be true, false or left out (auto), got {self.subs!r}")
        if self.attention not in ("bidirectional", "block"):
            raise DLMError(f"model.diffusion.attention must be bidirectional or block, got '{self.attention}'")
        if self.is_block:
            from lightning_dlm.core.blocks import check_block_options

            check_block_options(self)
        return self
