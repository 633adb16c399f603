"""The forward passes of a block diffusion model (``model.diffusion.attention: block``).

:func:`block_scored_logits` runs the training layout of :mod:`lightning_dlm.diffusion.blocks`
(noised copy + clean copy, 2L positions, explicit position ids) through a
:class:`~lightning_dlm.model.DiffusionModel`'s transformers model, with the three-part pattern
as a dense additive mask (sdpa / eager) or a FlexAttention ``BlockMask`` built from its
``mask_mod`` (flex_attention). :func:`block_loss_terms` is the block objective on top of it, and
:func:`block_nelbo` / :func:`block_row_nll` the evaluation estimators.

NELBO of a block model. The model factorises ``log p(x) = sum_b log p(x_b | x_<b)`` and bounds
every block term by its own masked-diffusion ELBO given the clean blocks before it, so its NELBO
is the sum over blocks of block NELBOs (per token: divided by the number of target tokens, as
for a bidirectional model). Both are upper bounds on the NLL; the block bound is the AR NLL at
block size 1 and the bidirectional bound at block size L, and is typically tighter in between
(each block is denoised given an exact clean context).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from lightning_dlm.diffusion.annealing import additive_attention_mask, causal_allowed
from lightning_dlm.diffusion.blocks import (
    block_attention_allowed,
    block_mask_mod,
    block_positions,
    block_sources,
    complement,
    corrupt_positions,
)
from lightning_dlm.diffusion.corruption import maskable_positions
from lightning_dlm.diffusion.loss import loss_terms_from_rows
from lightning_dlm.errors import DLMError
from lightning_dlm.model.diffusion_model import position_ids_from_padding
from lightning_dlm.model.flex_masks import FLEX, block_mask_from_mod, check_flex_call
from lightning_dlm.seeding import make_generator


def mask_dtype(net) -> torch.dtype:
    """The dtype an additive mask takes under the current autocast (or the model's dtype)."""
    if torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype() if net.model.device.type == "cuda" else torch.get_autocast_cpu_dtype()
    return net.model.dtype


def two_copy_mask(net, length: int, block_size: int, attention_mask: Optional[torch.Tensor],
                  document_ids: Optional[torch.Tensor], batch: int, device):
    """The attention argument of the 2L layout for ``net``'s attention kernel."""
    if net.attn_implementation == FLEX:
        check_flex_call(net.model, device)
        if document_ids is not None:
            raise DLMError("block diffusion with flex_attention does not separate packed documents yet: "
                           "use attn_implementation: sdpa, or data without document_ids")
        mod = block_mask_mod(length, block_size, attention_mask.to(device) if attention_mask is not None else None)
        rows = batch if attention_mask is not None else 1
        return block_mask_from_mod(mod, rows, 2 * length, 2 * length, device)
    if net.attn_implementation == "flash_attention_2":
        raise DLMError("flash_attention_2 takes no attention mask, so it cannot run block diffusion: "
                       "use attn_implementation: sdpa or flex_attention")
    allowed = block_attention_allowed(length, block_size, device)
    pad = torch.cat([attention_mask, attention_mask], 1) if attention_mask is not None else None
    docs = torch.cat([document_ids, document_ids], 1) if document_ids is not None else None
    return additive_attention_mask(allowed, pad, dtype=mask_dtype(net), document_ids=docs)


def block_scored_logits(net, x0: torch.Tensor, xt: torch.Tensor, sources: torch.Tensor, block_size: int,
                        attention_mask: Optional[torch.Tensor] = None,
                        document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits (N, V) of the rows ``sources`` (B, 2L) marks, from one pass over [x_t, x_0].

    At block size 1 with only clean rows scored (the shift), the noised copy is never read: the
    pass runs the clean copy alone under the causal pattern (the causal LM's own computation).
    """
    batch, length = x0.shape
    if block_size == 1 and not bool(sources[:, :length].any()):
        return net.scored_logits(x0, sources[:, length:], attention_mask=attention_mask,
                                 allowed=causal_allowed(length, x0.device), document_ids=document_ids)
    limit = net.max_positions
    if limit is not None and length > limit:
        raise DLMError(f"sequence length {length} is above the model's position limit {limit}: lower seq_len")
    positions = (position_ids_from_padding(attention_mask) if attention_mask is not None
                 else torch.arange(length, device=x0.device).expand(batch, length))
    ids = torch.cat([xt, x0], dim=1)
    mask = two_copy_mask(net, length, block_size, attention_mask, document_ids, batch, x0.device)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=block_positions(positions), use_cache=False)
    if net.row_logits_exact:
        hidden = net.model.get_decoder()(**inputs).last_hidden_state
        return net.lm_head(hidden[sources])
    return net.model(**inputs).logits[sources]


def block_loss_terms(net, x0: torch.Tensor, t_pos: torch.Tensor, schedule, block_size: int, shift: bool = True,
                     generator=None, attention_mask: Optional[torch.Tensor] = None,
                     document_ids: Optional[torch.Tensor] = None, complementary: bool = False,
                     protected: Optional[torch.Tensor] = None):
    """The block objective: returns ``(LossTerms, masked, maskable)``.

    ``t_pos`` (B, L) is the time of every position (per sequence or per block, see
    :func:`~lightning_dlm.diffusion.blocks.block_times`); masks are drawn from ``generator``. With
    ``complementary`` the batch is doubled with the complementary masks at time 1 - t, and the
    number of targets doubles with it (the loss is the mean of the two estimates).
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
    logits = block_scored_logits(net, ids0, xt, sources, block_size, pad, docs)
    row = sources.nonzero()[:, 0]
    targets = ids0[row, slots]
    weights = schedule.weight(times[row, slots].float())
    return loss_terms_from_rows(logits, targets, weights, num_targets), masked, maskable


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def block_row_nll(net, x0: torch.Tensor, xt: torch.Tensor, masked: torch.Tensor, block_size: int,
                  attention_mask=None, shift: bool = True, want_greedy: bool = False):
    """:func:`~lightning_dlm.evaluation.scoring.diffusion_row_nll` for a block model: per row, the
    CE sum of the masked tokens (each block given the clean blocks before it) and their count."""
    sources, slots = block_sources(masked, block_size, shift)
    from lightning_dlm.evaluation.scoring import per_row_nll

    logits = block_scored_logits(net, x0, xt, sources, block_size, attention_mask)
    return per_row_nll(logits, x0[sources.nonzero()[:, 0], slots], sources, want_greedy)


@torch.no_grad()
def block_nelbo(net, blocks: torch.Tensor, block_size: int, shift: bool = True, levels: int = 8, draws: int = 4,
                batch_size: int = 8, seed: int = 0, progress: Callable[[int], None] = lambda n: None) -> Dict[str, float]:
    """NELBO per token of ``blocks`` (N, L) under a block model, with its standard error: the
    k-form estimator of :func:`~lightning_dlm.evaluation.likelihood.diffusion_nelbo` applied to
    every block of ``block_size`` tokens given the clean blocks before it (k stratified per block),
    summed over blocks and divided by the target tokens. Same return keys as ``diffusion_nelbo``."""
    if levels < 1 or draws < 1:
        raise DLMError(f"levels and draws must be >= 1 (got {levels}, {draws})")
    device = next(net.parameters()).device
    n_rows, length = blocks.shape
    if length % block_size:
        raise DLMError(f"block size {block_size} does not divide the evaluation length {length}: use a seq_len that "
                       f"is a multiple of {block_size}")
    maskable = maskable_positions((1, length), shift, device="cpu")[0]
    groups = [maskable[b: b + block_size].nonzero().flatten() + b for b in range(0, length, block_size)]
    groups = [g for g in groups if g.numel()]
    n = int(maskable.sum())
    per_row = torch.zeros(draws, n_rows, dtype=torch.float64)
    for r in range(draws):
        for lo in range(0, n_rows, batch_size):
            x0 = blocks[lo: lo + batch_size].to(device)
            rows = range(lo, lo + x0.shape[0])
            for j in range(levels):
                masked = torch.zeros_like(x0, dtype=torch.bool)
                weight = torch.zeros(x0.shape, dtype=torch.float64)
                for b, i in enumerate(rows):
                    gen = make_generator(seed, r, i, j, 11)
                    for g in groups:
                        offset = float(torch.rand((), generator=gen))
                        k = min(len(g), int((j + offset) / levels * len(g)) + 1)
                        pick = g[torch.randperm(len(g), generator=gen)[:k]]
                        masked[b, pick.to(device)] = True
                        weight[b, pick] = len(g) / k  # n_b * mean over the k masked = sum * n_b / k
                xt = torch.where(masked, torch.full_like(x0, net.mask_token_id), x0)
                sources, slots = block_sources(masked, block_size, shift)
                logits = block_scored_logits(net, x0, xt, sources, block_size)
                row = sources.nonzero()[:, 0]
                ce = F.cross_entropy(logits.float(), x0[row, slots], reduction="none").double().cpu()
                w = weight[row.cpu(), slots.cpu()]
                sums = torch.zeros(x0.shape[0], dtype=torch.float64).index_add_(0, row.cpu(), ce * w)
                per_row[r, lo: lo + x0.shape[0]] += sums / n / levels
            progress(x0.shape[0])
    estimates = per_row.mean(dim=1)
    nll = float(estimates.mean())
    se = float(estimates.std(unbiased=True) / math.sqrt(draws)) if draws > 1 else float("nan")
    spread = 2 * se if se == se else 0.0
    return dict(nll_per_token=nll, se=se, ppl=math.exp(nll), ppl_low=math.exp(nll - spread),
                ppl_high=math.exp(nll + spread), tokens=n_rows * n, bound=True)
