"""The absorbing-state diffusion ELBO, with the shift that keeps AR next-token alignment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.schedules import ScheduleLike, get_schedule

NORMALIZATIONS = ("elbo", "masked")
IGNORE = -100  # cross-entropy ignore index for positions that are not scored


@dataclass
class LossTerms:
    """Pieces of the loss, so callers can report several normalisations from one pass."""

    weighted_sum: torch.Tensor  # sum over scored positions of w(t_b) * CE (float32 scalar)
    ce_sum: torch.Tensor  # unweighted CE sum over scored positions
    num_scored: torch.Tensor  # number of scored (corrupted, target) positions
    num_targets: Union[int, torch.Tensor]  # real target positions: B * (L - 1) with shift, B * L without padding

    def normalized(self, normalization: str = "elbo") -> torch.Tensor:
        if normalization == "elbo":
            return self.weighted_sum / _at_least_one(self.num_targets)
        if normalization == "masked":
            return self.weighted_sum / self.num_scored.clamp_min(1)
        raise DLMError(f"unknown loss normalization '{normalization}': choose one of {NORMALIZATIONS}")


def _at_least_one(count: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """``count``, or 1 where it is 0 (a batch of padding only), without a host synchronisation."""
    return count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)


def diffusion_loss_terms(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    schedule: ScheduleLike,
    shift: bool = True,
    num_targets: Optional[Union[int, torch.Tensor]] = None,
) -> LossTerms:
    """Weighted masked cross-entropy terms, cross-entropy in float32.

    Unscored positions get the ignore index, so the cross-entropy runs over all rows without
    gathering (no host synchronisation, no scatter in the backward pass). ``num_targets`` is the
    number of real target positions (e.g. ``maskable.sum()`` with padding); None = every
    position is one (B * (L - 1) with the shift, B * L without).
    """
    if logits.dim() != 3 or x0.shape != logits.shape[:2] or masked.shape != x0.shape:
        raise DLMError(
            f"diffusion_loss expects logits (B, L, V) with x0 and masked (B, L); got "
            f"{tuple(logits.shape)}, {tuple(x0.shape)}, {tuple(masked.shape)}"
        )
    schedule = get_schedule(schedule)
    batch, length = x0.shape
    masked = masked.bool()
    # targets[:, j] is what logits[:, j] must predict: x0[:, j + 1] with the shift, x0[:, j] without.
    if shift:
        targets = torch.full_like(x0, IGNORE)
        targets[:, :-1] = torch.where(masked[:, 1:], x0[:, 1:], IGNORE)
        scored = masked[:, 1:]
    else:
        targets = torch.where(masked, x0, IGNORE)
        scored = masked
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none", ignore_index=IGNORE
    ).view(batch, length)
    weights = schedule.weight(t.float().to(logits.device))
    return LossTerms(
        weighted_sum=(weights[:, None] * ce).sum(),
        ce_sum=ce.sum(),
        num_scored=scored.sum(),
        num_targets=batch * (length - 1 if shift else length) if num_targets is None else num_targets,
    )


def scored_rows(x0: torch.Tensor, masked: torch.Tensor, shift: bool = True):
    """Where the scored predictions come from, and what they must predict.

    Returns ``(sources, targets)``: ``sources`` (B, L) bool marks the positions whose output
    predicts a masked token (i-1 for a masked i with the shift, i itself without), and
    ``targets`` (N,) are those tokens, in the row-major order of ``sources``.
    """
    masked = masked.bool()
    if not shift:
        return masked, x0[masked]
    sources = torch.zeros_like(masked)
    sources[:, :-1] = masked[:, 1:]
    return sources, x0[:, 1:][masked[:, 1:]]


def loss_terms_from_rows(
    row_logits: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    num_targets: Union[int, torch.Tensor],
) -> LossTerms:
    """:class:`LossTerms` from the logits of the scored rows only (N, V), as given by
    :func:`scored_rows`; ``row_weights`` (N,) is w(t_b) of each row's sequence and
    ``num_targets`` the number of real target positions of the batch."""
    ce = F.cross_entropy(row_logits.float(), targets, reduction="none")
    return LossTerms(
        weighted_sum=(row_weights.float() * ce).sum(),
        ce_sum=ce.sum(),
        num_scored=torch.tensor(targets.numel(), device=ce.device),
        num_targets=num_targets,
    )


def diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    schedule: ScheduleLike,
    shift: bool = True,
    normalization: str = "elbo",
) -> torch.Tensor:
    """Diffusion loss (scalar).

    Args:
        logits: (B, L, V) model outputs on x_t.
        x0: (B, L) clean token ids.
        masked: (B, L) bool, the positions that were corrupted.
        t: (B,) noise level of each sequence.
        schedule: a :class:`NoiseSchedule` or its name.
        shift: score logits[:, i-1] against x0[:, i] (True) or logits[:, i] against x0[:, i].
        normalization: ``"elbo"``: sum_b sum_scored w(t_b) CE / (B * targets per sequence), the
            negative ELBO per token (this takes no padding: use :func:`diffusion_loss_terms` with
            ``num_targets`` for padded batches); ``"masked"``: the same sum / number of scored positions
            (the reference code's choice; not an ELBO).
    """
    if normalization not in NORMALIZATIONS:
        raise DLMError(f"unknown loss normalization '{normalization}': choose one of {NORMALIZATIONS}")
    return diffusion_loss_terms(logits, x0, masked, t, schedule, shift).normalized(normalization)
