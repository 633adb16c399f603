"""Forward (noising) process: replace maskable tokens by the mask token with prob 1 - alpha(t)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from lightning_dlm.core.schedules import NoiseSchedule


def maskable_positions(
    shape: Tuple[int, int],
    shift: bool = True,
    attention_mask: Optional[torch.Tensor] = None,
    protected: Optional[torch.Tensor] = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (B, L): positions the forward process may corrupt.

    With the shift, position 0 is never a target (it predicts nothing before it) and must hold a
    real token, so it is never masked; nor is the first real token of a left-padded row (the
    position before it is padding). ``attention_mask`` (1 = real token) excludes padding;
    ``protected`` (True = keep clean, e.g. an SFT prompt) excludes more.
    """
    maskable = torch.ones(shape, dtype=torch.bool, device=device)
    if shift:
        maskable[:, 0] = False
    if attention_mask is not None:
        real = attention_mask.to(device=maskable.device).bool()
        maskable &= real
        if shift:
            maskable[:, 1:] &= real[:, :-1]
    if protected is not None:
        maskable &= ~protected.to(device=maskable.device).bool()
    return maskable


def corrupt(
    x0: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    schedule: NoiseSchedule,
    maskable: Optional[torch.Tensor] = None,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, masked)``: each maskable token of ``x0`` masked independently w.p. 1 - alpha(t_b).

    ``masked`` records which positions were corrupted; loss positions come from it, never from
    ``x_t == mask_id`` (the mask id may be a real vocabulary id). ``generator`` may be one
    generator for the batch or one per row (then a row's draws do not depend on its batch).
    """
    p = schedule.mask_prob(t.float()).to(x0.device)[:, None]
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(x0.shape[1:], generator=g, device=x0.device) for g in generator])
    else:
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = u < p
    if maskable is not None:
        masked &= maskable
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked
