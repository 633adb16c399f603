"""Temperature, top-k and top-p (nucleus) filtering, and drawing tokens from filtered logits."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_dlm.core.errors import DLMError


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise DLMError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise DLMError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise DLMError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (rows are independent)."""
    logits = logits.float()
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    return logits


def nucleus(logits: torch.Tensor, top_p: float, first_k: int = 256) -> torch.Tensor:
    """Top-p filtering: keep the most likely tokens until the mass before the next one reaches
    ``top_p`` (the top token always stays), the rest to -inf.

    Sorting the whole vocabulary of every row (49K tokens for SmolLM2) costs more on a CPU than
    a cached forward pass when a block decodes 32 slots at a time; the nucleus is almost always
    a few hundred tokens, so the candidates are the ``first_k`` largest (``topk``), widened 8x
    until their mass reaches ``top_p`` in every row: the same kept set as a full sort (the mass
    is summed in float64, so where the boundary falls does not depend on the summation order).
    """
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.double(), dim=-1)  # float64: the boundary does not move with rounding
    k = min(first_k, vocab)
    while True:
        top, order = torch.topk(probs, k, dim=-1)  # sorted, descending
        if k == vocab or bool((top.sum(-1) >= top_p).all()):
            break
        k = min(vocab, k * 8)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    keep = top.cumsum(dim=-1) - top < top_p
    kept = torch.full_like(logits, float("-inf"))
    return kept.scatter(-1, order, torch.where(keep, logits.gather(-1, order), kept[..., :k]))


def draw_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sample one token per row of (N, V) logits; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
