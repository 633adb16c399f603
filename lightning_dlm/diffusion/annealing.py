"""Causal-to-bidirectional attention annealing.

For the first ``anneal_steps`` optimiser steps the attention is causal plus a growing random
share of the future, ``ratio(step) = min(1, (step + 1) / anneal_steps)``; afterwards it is fully
bidirectional and no dense mask is built at all (so the fast attention kernels are used).

Masks are produced here as boolean ``allowed[q, k]`` matrices (True = query q may attend key k)
and turned into the additive float form transformers expects by :func:`additive_attention_mask`
(a 4-D boolean mask would be added as a 0/1 bias by the eager attention of transformers 5.x).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from lightning_dlm.errors import DLMError


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Share of the future opened at optimiser step ``step``; 1.0 means fully bidirectional."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def causal_allowed(length: int, device=None) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def random_allowed(length: int, ratio: float, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Reference mask: causal plus each future (query, key) pair opened independently w.p. ``ratio``.

    One L x L draw, shared by the batch, the heads and the layers.
    """
    opened = torch.rand(length, length, generator=generator, device=device) < ratio
    return causal_allowed(length, device) | opened.triu(1)


def right_context_allowed(length: int, ratio: float, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Structured variant: query i sees keys j <= i + r_i, a contiguous right context.

    r_i ~ Binomial(L - 1 - i, ratio): the same number of opened future keys as the random mask
    in distribution, but contiguous, which block-sparse kernels can skip efficiently.
    """
    opened = (torch.rand(length, length, generator=generator, device=device) < ratio).triu(1)
    reach = torch.arange(length, device=device) + opened.sum(dim=1)
    keys = torch.arange(length, device=device)
    return keys[None, :] <= reach[:, None]


ANNEAL_MASKS: Dict[str, Callable[..., torch.Tensor]] = {
    "random": random_allowed,
    "right_context": right_context_allowed,
}


def annealing_allowed(
    length: int,
    ratio: float,
    kind: str = "random",
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Optional[torch.Tensor]:
    """The (L, L) allowed matrix for ``ratio``, or None once annealing is over (bidirectional)."""
    if kind not in ANNEAL_MASKS:
        raise DLMError(f"unknown annealing mask '{kind}': choose one of {sorted(ANNEAL_MASKS)}")
    if ratio >= 1.0:
        return None
    return ANNEAL_MASKS[kind](length, ratio, generator=generator, device=device)


def additive_attention_mask(
    allowed: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive float mask (B or 1, 1, L, L): 0 where attention is allowed, dtype-min elsewhere.

    ``allowed`` is (L, L) or (B, L, L); ``padding_mask`` (B, L) with 1 for real tokens blocks
    padded keys. The diagonal stays open so that no row is fully blocked.
    """
    if allowed.dim() == 2:
        allowed = allowed[None]
    if padding_mask is not None:
        allowed = allowed & padding_mask.to(allowed.device).bool()[:, None, :]
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    allowed = allowed | eye
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
