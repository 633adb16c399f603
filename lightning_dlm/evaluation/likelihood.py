"""Likelihood of a corpus: the diffusion NELBO bound (with a standard error) and AR perplexity.

Diffusion estimator. The continuous-time negative ELBO of masked diffusion does not depend on
the noise schedule, and integrating t out of it leaves a sum over the number k of masked
tokens: for a sequence with n target tokens,

    NELBO / n = E_{k ~ U{1..n}} E_{S: |S| = k} [ mean_{i in S} CE_i(x with S masked) ],

(since the integral over s of (1/s) Binomial(k; n, s) is 1/k). This form has none of the
1/t weight of the t-form, whose draws near t = 0 make the variance explode. For each of
``draws`` independent replicates and each block, k is stratified over ``levels`` equal strata
of {1..n} (one uniform offset per block and replicate), a uniform subset of k target tokens is
masked, and the mean cross-entropy of the masked tokens is averaged over the levels: an
unbiased estimate of the block's NELBO per token. A replicate's estimate averages the blocks
(all have n targets); the reported NELBO is the mean of the replicates and its standard error
their standard deviation / sqrt(draws). Every draw comes from a generator seeded by (seed,
replicate, block, level), so the result does not depend on the batch size. With the shift, the
first token of a block is context only (n = L - 1).

AR perplexity: exp(mean NLL) of the same target tokens (positions 1..L-1 of every block) under
a causal LM, through torchmetrics' ``Perplexity``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from lightning_dlm.core.blocks import block_sources
from lightning_dlm.core.corruption import maskable_positions
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.seeding import make_generator
from lightning_dlm.evaluation.scoring import diffusion_row_nll, subs_logits


def _summary(estimates: torch.Tensor, tokens: int, bound: bool) -> Dict[str, float]:
    nll = float(estimates.mean())
    se = float(estimates.std(unbiased=True) / math.sqrt(len(estimates))) if len(estimates) > 1 else float("nan")
    spread = 2 * se if se == se else 0.0
    return dict(nll_per_token=nll, se=se, ppl=math.exp(nll), ppl_low=math.exp(nll - spread),
                ppl_high=math.exp(nll + spread), tokens=tokens, bound=bound)


@torch.no_grad()
def diffusion_nelbo(net, blocks: torch.Tensor, shift: bool = True, levels: int = 8, draws: int = 4,
                    batch_size: int = 8, seed: int = 0,
                    progress: Callable[[int], None] = lambda n: None) -> Dict[str, float]:
    """NELBO per token of ``blocks`` (N, L) under a diffusion backbone, with its standard error.

    Returns ``nll_per_token`` (nats), ``se``, ``ppl`` (= exp(NELBO), an upper bound on the
    perplexity), a +-2 SE interval of it, and ``tokens`` (target tokens per replicate).
    """
    if levels < 1 or draws < 1:
        raise DLMError(f"levels and draws must be >= 1 (got {levels}, {draws})")
    device = next(net.parameters()).device
    n_blocks, length = blocks.shape
    first = 1 if shift else 0
    n = length - first
    if n < 1:
        raise DLMError(f"blocks of {length} token(s) have nothing to score: use seq_len >= 2")
    per_block = torch.zeros(draws, n_blocks, dtype=torch.float64)
    for r in range(draws):
        for lo in range(0, n_blocks, batch_size):
            x0 = blocks[lo: lo + batch_size].to(device)
            rows = range(lo, lo + x0.shape[0])
            offsets = [float(torch.rand((), generator=make_generator(seed, r, i, 0))) for i in rows]
            for j in range(levels):
                masked = torch.zeros_like(x0, dtype=torch.bool)
                for b, i in enumerate(rows):
                    k = min(n, int((j + offsets[b]) / levels * n) + 1)
                    order = torch.randperm(n, generator=make_generator(seed, r, i, j + 1))
                    masked[b, first + order[:k].to(device)] = True
                xt = torch.where(masked, torch.full_like(x0, net.mask_token_id), x0)
                sums, counts = diffusion_row_nll(net, x0, xt, masked, shift=shift)
                per_block[r, lo: lo + x0.shape[0]] += (sums / counts).cpu() / levels
            progress(x0.shape[0])
    return _summary(per_block.mean(dim=1), n_blocks * n, bound=True)


@torch.no_grad()
def causal_perplexity(model, blocks: torch.Tensor, batch_size: int = 8,
                      progress: Callable[[int], None] = lambda n: None) -> Dict[str, float]:
    """Exact perplexity of ``blocks`` (N, L) under a causal LM: tokens 1..L-1 given their prefix."""
    from torchmetrics.text import Perplexity

    device = next(model.parameters()).device
    metric = Perplexity().to(device)
    for lo in range(0, blocks.shape[0], batch_size):
        ids = blocks[lo: lo + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        metric.update(logits, ids[:, 1:])
        progress(ids.shape[0])
    result = _summary(torch.tensor([math.log(float(metric.compute()))]), int(metric.count), bound=False)
    return dict(result, se=0.0)  # exact: no sampling error


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
                logits = subs_logits(net, net.block_scored_logits(x0, xt, sources, block_size))
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
