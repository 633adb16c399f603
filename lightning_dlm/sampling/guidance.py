"""Classifier-free guidance for the sampler (LLaDA's form), with any strategy.

The unconditional pass sees the same canvas with the prompt (every real token outside the target
region: the prefix and, for infilling, the suffix) replaced by the mask token; the guided logits
are ``uncond + (1 + w) * (cond - uncond)``. With ``w = 0`` the sampler does not wrap the denoiser
at all, so unguided decoding is exactly what it was.
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.sampling.denoisers import Keep


def check_cfg_scale(scale: float) -> None:
    if not scale >= 0:  # also refuses nan
        raise DLMError(f"cfg_scale must be >= 0 (0 = no guidance), got {scale}")


def unconditional_ids(ids: torch.Tensor, attention_mask: Optional[torch.Tensor], start: int, end: int,
                      mask_id: int) -> torch.Tensor:
    """``ids`` with every real token outside the target columns ``[start, end)`` masked."""
    prompt = torch.ones_like(ids, dtype=torch.bool)
    prompt[:, start:end] = False
    if attention_mask is not None:
        prompt &= attention_mask.bool()
    return torch.where(prompt, torch.full_like(ids, mask_id), ids)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + (1.0 + scale) * (cond - uncond)


class GuidedDenoiser:
    """A denoiser whose logits are guided: two full passes per step (conditional, unconditional)."""

    supports_cache = False

    def __init__(self, inner, scale: float, mask_id: int, start: int, end: int):
        check_cfg_scale(scale)
        self.inner, self.scale, self.mask_id, self.start, self.end = inner, float(scale), int(mask_id), start, end

    def logits(self, ids, attention_mask, keep: Keep) -> torch.Tensor:
        cond = self.inner.logits(ids, attention_mask, keep).float()
        uncond_ids = unconditional_ids(ids, attention_mask, self.start, self.end, self.mask_id)
        uncond = self.inner.logits(uncond_ids, attention_mask, keep).float()
        return guided(cond, uncond, self.scale)
