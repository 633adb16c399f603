"""The block diffusion objective (``model.diffusion.attention: block``): one pass over the noised
and the clean copy of every sequence (the 2L layout of :mod:`lightning_dlm.core.blocks`, run by
:meth:`DiffusionModel.block_scored_logits`), each block's masked tokens scored given the clean
blocks before it.

NELBO of a block model. The model factorises ``log p(x) = sum_b log p(x_b | x_<b)`` and bounds
every block term by its own masked-diffusion ELBO given the clean blocks before it, so its NELBO
is the sum over blocks of block NELBOs (per token: divided by the number of target tokens, as
for a bidirectional model). Both are upper bounds on the NLL; the block bound is the AR NLL at
block size 1 and the bidirectional bound at block size L, and is typically tighter in between
(each block is denoised given an exact clean context).
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_dlm.core.blocks import block_size_at, block_sources, block_times, complement, corrupt_positions
from lightning_dlm.core.corruption import maskable_positions
from lightning_dlm.core.loss import drop_logit, loss_terms_from_rows
from lightning_dlm.core.schedules import sample_t
from lightning_dlm.core.seeding import make_generator
from lightning_dlm.objectives.base import GridObjective, StepTerms, register_objective, subs_drop_id


def block_loss_terms(net, x0: torch.Tensor, t_pos: torch.Tensor, schedule, block_size: int, shift: bool = True,
                     generator=None, attention_mask: Optional[torch.Tensor] = None,
                     document_ids: Optional[torch.Tensor] = None, complementary: bool = False,
                     protected: Optional[torch.Tensor] = None, drop_id: Optional[int] = None):
    """The block objective: returns ``(LossTerms, masked, maskable)``.

    ``t_pos`` (B, L) is the time of every position (per sequence or per block, see
    :func:`~lightning_dlm.core.blocks.block_times`); masks are drawn from ``generator``. With
    ``complementary`` the batch is doubled with the complementary masks at time 1 - t, and the
    number of targets doubles with it (the loss is the mean of the two estimates). ``drop_id``:
    the token SUBS leaves out of the softmax (the added mask token), None = the full softmax.
    """
    maskable = maskable_positions(x0.shape, shift, attention_mask, protected=protected, device=x0.device)
    xt, masked, _ = corrupt_positions(x0, t_pos, net.mask_token_id, schedule, maskable, generator)
    num_targets = maskable.sum()
    ids0, times, pad, docs = x0, t_pos, attention_mask, document_ids
    all_masked = masked
    if complementary:
        xt2, masked2, t2 = complement(x0, masked, maskable, t_pos, net.mask_token_id)
        ids0, xt, all_masked = torch.cat([x0, x0]), torch.cat([xt, xt2]), torch.cat([masked, masked2])
        times = torch.cat([t_pos, t2])
        pad = torch.cat([attention_mask, attention_mask]) if attention_mask is not None else None
        docs = torch.cat([document_ids, document_ids]) if document_ids is not None else None
        num_targets = 2 * num_targets
    sources, slots = block_sources(all_masked, block_size, shift)
    logits = net.block_scored_logits(ids0, xt, sources, block_size, pad, docs)
    if drop_id is not None:
        logits = drop_logit(logits, drop_id)
    row = sources.nonzero()[:, 0]
    targets = ids0[row, slots]
    weights = schedule.weight(times[row, slots].float())
    return loss_terms_from_rows(logits, targets, weights, num_targets), masked, maskable


@register_objective("diffusion", attention="block")
class BlockObjective(GridObjective):
    """``model.objective: diffusion`` under ``diffusion.attention: block``: the block size of the
    schedule at each step, t per sequence or per block (``diffusion.block_t``), optionally the
    complementary masks; evaluation on the fixed t grid at ``diffusion.block_size``."""

    def train_terms(self, net, batch, *, step, counter, rank):
        cfg = self.cfg
        x0 = batch["input_ids"]
        size = block_size_at(step, cfg.block_size, cfg.block_size_schedule)
        generator = make_generator(self.seed, counter, rank, device=x0.device)
        t_pos = self.train_times(x0.shape[0], x0.shape[1], size, generator, x0.device)
        terms, masked, maskable = block_loss_terms(net, x0, t_pos, self.schedule, size, cfg.shift, generator,
                                                   batch.get("attention_mask"), batch.get("document_ids"),
                                                   cfg.complementary_masks, batch.get("prompt_mask"),
                                                   subs_drop_id(cfg, net))
        return StepTerms(terms, masked, maskable, 1.0, {"train/block_size": float(size)})

    def train_times(self, batch: int, length: int, block_size: int, generator=None, device=None) -> torch.Tensor:
        """(B, L) training time of every position. t is in [eps, 1); with the complementary masks
        it is in [eps, 1 - eps), so that the complementary copy's time 1 - t is floored at eps too
        (its ELBO weight 1 / (1 - t) at most 1 / eps, as the primary copy's)."""
        cfg = self.cfg
        high = 1.0 - cfg.eps if cfg.complementary_masks else 1.0
        draw = lambda n: sample_t(n, cfg.eps, cfg.t_sampling, generator, device, high=high)  # noqa: E731
        return block_times(batch, length, block_size, cfg.block_t == "block", draw)

    def level_terms(self, net, x0, t, attention_mask, generator, document_ids, protected):
        """The sum over blocks of block NELBOs at time ``t`` (B,) for every position."""
        return block_loss_terms(net, x0, t[:, None].expand(x0.shape), self.schedule, self.cfg.block_size,
                                self.cfg.shift, generator, attention_mask, document_ids, False, protected,
                                subs_drop_id(self.cfg, net))[0]
