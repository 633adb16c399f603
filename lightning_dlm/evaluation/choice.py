"""Scoring continuations given contexts: the multiple-choice protocols.

Diffusion (the paper's protocol): the continuation tokens of a row are masked at levels
t = k/T for k = T..1 (``round(t * n)`` of its n tokens, at least one, chosen at random), the
context stays clean, and the score is the mean over the levels of the mean cross-entropy of the
masked tokens (lower is better). ``n * score`` estimates the negative ELBO of the continuation
under the linear schedule, the bound on -log p(continuation | context) that the lm-eval adapter
reports. At k = T every continuation token is masked; "greedy" means the argmax at every one of
them is the true token.

AR baseline: the log-likelihood of the continuation, as lm-evaluation-harness computes it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.seeding import derive_seed, make_generator
from lightning_dlm.evaluation.scoring import block_row_nll, diffusion_row_nll, length_batches, pad_rows


def encode_pair(encode: Callable[[str], List[int]], context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Token ids of (context, continuation) as lm-eval splits them: the context's trailing
    whitespace moves to the continuation, and the continuation is what the whole string has
    beyond the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    cont = whole[len(ctx):]
    if not cont:
        raise DLMError(f"the continuation {continuation!r} encodes to no tokens: give a non-empty continuation")
    return whole[: len(ctx)], cont


def _masked_slots(row: Sequence[int], start: int, level: int, levels: int, seed: int, *tags: int) -> torch.Tensor:
    n = len(row) - start
    count = max(1, round(level / levels * n))
    generator = make_generator(seed, level, derive_seed(*row), start, *tags)
    return start + torch.randperm(n, generator=generator)[:count]


@torch.no_grad()
def diffusion_choice_scores(net, rows: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                            levels: int = 32, shift: bool = True, batch_size: int = 32, seed: int = 0,
                            progress: Callable[[int], None] = lambda n: None, block_size: Optional[int] = None):
    """(scores, greedy): per row, the mean masked CE of ``row[start:]`` over ``levels`` levels.

    The masks of a row depend on its tokens and the seed only, so a row scores the same in any
    batch and in any order. ``block_size``: a block model's (the rows are right-padded to whole
    blocks, and the masked tokens are scored in one 2L pass, each block given the clean blocks
    before it; its masks are drawn from their own seeds).
    """
    if levels < 1:
        raise DLMError(f"levels must be >= 1 (got {levels}): the paper uses 32")
    device = next(net.parameters()).device
    jobs = [(i, k) for i in range(len(rows)) for k in range(1, levels + 1)]
    scores = [0.0] * len(rows)
    greedy = [False] * len(rows)
    tags = (13,) if block_size else ()
    for batch in length_batches([len(rows[i]) for i, _ in jobs], batch_size):
        x0, attention = pad_rows([rows[jobs[b][0]] for b in batch], pad_id, device)
        if block_size:  # whole blocks: right-pad to a multiple of the block size
            extra = -x0.shape[1] % block_size
            x0 = torch.cat([x0, x0.new_full((x0.shape[0], extra), pad_id)], 1)
            attention = torch.cat([attention, attention.new_zeros((x0.shape[0], extra))], 1)
        masked = torch.zeros_like(x0, dtype=torch.bool)
        for j, b in enumerate(batch):
            i, k = jobs[b]
            masked[j, _masked_slots(rows[i], starts[i], k, levels, seed, *tags).to(device)] = True
        xt = torch.where(masked, torch.full_like(x0, net.mask_token_id), x0)
        if block_size:
            sums, counts, right = block_row_nll(net, x0, xt, masked, block_size, attention, shift=shift,
                                                want_greedy=True)
        else:
            sums, counts, right = diffusion_row_nll(net, x0, xt, masked, attention, shift=shift, want_greedy=True)
        for j, b in enumerate(batch):
            i, k = jobs[b]
            scores[i] += float(sums[j] / counts[j]) / levels
            if k == levels:
                greedy[i] = bool(right[j])
        progress(len(batch))
    return scores, greedy


def choice_rows(encode, start_id, contexts: Sequence[str], continuations: Sequence[str]):
    """Rows ``[start] + context + continuation`` and the index where each continuation starts."""
    rows, starts = [], []
    lead = [start_id] if start_id is not None else []
    for context, continuation in zip(contexts, continuations):
        ctx, cont = encode_pair(encode, context, continuation)
        if not lead and not ctx:
            raise DLMError("an empty context needs a start token (bos or eos) in the tokenizer to condition on")
        rows.append(lead + ctx + cont)
        starts.append(len(lead) + len(ctx))
    return rows, starts
