"""Loss terms from the logits of the scored rows: the pieces every objective sums (the objectives
themselves, which positions are scored and with which weight, live in lightning_dlm.objectives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from lightning_dlm.core.errors import DLMError

NORMALIZATIONS = ("elbo", "masked")


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

