"""Loss terms from the logits of the scored rows: the pieces every objective sums (the objectives
themselves, which positions are scored and with which weight, live in lightning_dlm.objectives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from lightning_dlm.core.errors import DLMError

NORMALIZATIONS = ("elbo", "masked", "unweighted")


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
        if normalization == "unweighted":  # Fast-dLLM v2: the plain mean CE of the masked tokens, no w(t)
            return self.ce_sum / self.num_scored.clamp_min(1)
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


def drop_logit(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """SUBS (MDLM, Sahoo et al. 2024; BD3-LM): ``logits`` (..., V) in float32 with the column
    ``token_id`` (the added mask token) at -inf, so that the softmax runs over the other tokens.
    Exact for the loss: no target is ever the mask token."""
    out = logits.float().clone()
    out[..., token_id] = float("-inf")
    return out


def drop_logit_ce(ce: torch.Tensor, target_logit: torch.Tensor, dropped_logit: torch.Tensor) -> torch.Tensor:
    """The cross-entropy (N,) with one column dropped from the softmax (:func:`drop_logit`), from the
    full cross-entropy ``ce`` and the rows' logits of the target and of the dropped column (for a
    fused cross-entropy that never materialises the logits):
    ``log Z' = log Z + log(1 - p_drop)``, ``log Z = ce + z_target``, ``p_drop = exp(z_drop - log Z)``."""
    log_p_drop = dropped_logit.float() - (ce.float() + target_logit.float())
    return ce.float() + torch.log(-torch.expm1(log_p_drop))


def loss_terms_from_rows(
    row_logits: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    num_targets: Union[int, torch.Tensor],
) -> LossTerms:
    """:class:`LossTerms` from the logits of the scored rows only (N, V), as given by
    :func:`scored_rows`; ``row_weights`` (N,) is w(t_b) of each row's sequence and
    ``num_targets`` the number of real target positions of the batch."""
    return loss_terms_from_ce(F.cross_entropy(row_logits.float(), targets, reduction="none"), row_weights, num_targets)


def loss_terms_from_ce(ce: torch.Tensor, row_weights: torch.Tensor, num_targets: Union[int, torch.Tensor]) -> LossTerms:
    """:class:`LossTerms` from the cross-entropy (N,) of the scored rows (e.g. a fused
    linear cross-entropy that never materialises the logits); as :func:`loss_terms_from_rows`."""
    return LossTerms(
        weighted_sum=(row_weights.float() * ce).sum(),
        ce_sum=ce.sum(),
        num_scored=torch.tensor(ce.numel(), device=ce.device),
        num_targets=num_targets,
    )

