"""The paper's ancestral sampler: masked slots are revealed in random order.

This is the first, single-generator version, kept as a small self-contained function; the sampler
library runs the same algorithm as the ``random`` strategy
(:class:`lightning_dlm.sampling.strategies.RandomOrder`), with one generator per row, blocks,
caches and statistics.

Going from time t to s < t on a uniform grid of T steps, every still-masked slot is committed
with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) (1/k for the linear schedule at step k
from the end), its token drawn from the model with temperature / top-k / top-p. A step that
commits nothing needs no forward pass and is skipped (exactly the same distribution).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from lightning_dlm.diffusion.schedules import NoiseSchedule
from lightning_dlm.errors import DLMError
from lightning_dlm.sampling.canvas import Canvas, slot_logits
from lightning_dlm.sampling.filtering import check_sampling_args, draw_tokens
from lightning_dlm.sampling.strategies import reveal_probability

Denoiser = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@torch.no_grad()
def random_order_sample(
    denoiser: Denoiser,
    canvas: Canvas,
    schedule: NoiseSchedule,
    steps: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    shift: bool = True,
    suppress_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, int]:
    """Decode the masked slots of ``canvas``; returns (ids, forward passes used).

    ``generator`` must live on the canvas' device.
    """
    if steps < 1:
        raise DLMError(f"the number of steps T must be >= 1, got {steps}")
    check_sampling_args(temperature, top_k, top_p)
    ids, masked = canvas.ids.clone(), canvas.masked.clone()
    passes = 0
    for i in range(steps):
        if not masked.any():
            break
        p_commit = reveal_probability(schedule, i, steps)
        draw = torch.rand(ids.shape, generator=generator, device=ids.device)
        commit = masked & (draw < p_commit)
        if not commit.any():
            continue
        logits = slot_logits(denoiser(ids, canvas.attention_mask), shift)
        passes += 1
        chosen = logits[commit].float()
        if suppress_ids:
            chosen[:, list(suppress_ids)] = float("-inf")
        ids[commit] = draw_tokens(chosen, temperature, top_k, top_p, generator)
        masked &= ~commit
    return ids, passes
