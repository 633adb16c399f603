"""Per-row scores of token rows: the building block of every evaluation protocol.

* :func:`diffusion_row_nll`: cross-entropy of the masked tokens of each row of x_t under a
  diffusion backbone (the shift handled here, through :func:`scored_rows`), summed per row;
* :func:`causal_row_nll`: next-token cross-entropy of chosen target positions of each row under
  a plain causal LM.

Rows are lists of token ids of any lengths; they are right-padded into batches here, sorted by
length so that a batch wastes little on padding, and results come back in the input order.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from lightning_dlm.core.blocks import block_sources
from lightning_dlm.core.loss import drop_logit, scored_rows
from lightning_dlm.objectives.base import subs_drop_id


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> Iterator[List[int]]:
    """Indices grouped into batches of similar lengths (longest first, so memory peaks early).

    A batch holds at most ``batch_size`` rows and, with ``max_tokens``, at most that many padded
    tokens (at least one row).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: List[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (max_tokens and (len(batch) + 1) * width > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, W) ids and their (B, W) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        attention[i, : len(row)] = 1
    return ids.to(device), attention.to(device)


@torch.no_grad()
def diffusion_row_nll(net, x0: torch.Tensor, xt: torch.Tensor, masked: torch.Tensor, attention_mask=None,
                      shift: bool = True, want_greedy: bool = False):
    """Per row: (sum of CE of the masked tokens, number of masked tokens[, all argmax-correct]).

    ``x0`` are the clean ids, ``xt`` the corrupted input, ``masked`` (B, L) what was corrupted.
    ``net`` is a :class:`~lightning_dlm.model.DiffusionModel` (its ``scored_logits``: the LM head
    runs on the scored positions only when that is exact).
    """
    sources, targets = scored_rows(x0, masked, shift)
    logits = subs_logits(net, net.scored_logits(xt, sources, attention_mask=attention_mask))
    return per_row_nll(logits, targets, sources, want_greedy)


def subs_logits(net, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as the model's objective scores them: the added mask token's column at -inf when
    SUBS is on (``net.diffusion.subs``, :func:`~lightning_dlm.objectives.base.subs_drop_id`)."""
    diffusion = getattr(net, "diffusion", None)  # a stand-in model without a diffusion config: no SUBS
    drop = None if diffusion is None else subs_drop_id(diffusion, net)
    return logits if drop is None else drop_logit(logits, drop)


def per_row_nll(logits: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor, want_greedy: bool = False):
    """The scored rows' logits (N, V) and targets (N,), in the row-major order of ``sources`` (B, L),
    reduced per row: (CE sum (float64), count[, every argmax right])."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    row = sources.nonzero()[:, 0]
    sums = torch.zeros(sources.shape[0], dtype=torch.float64, device=ce.device).index_add_(0, row, ce.double())
    counts = sources.sum(dim=1)
    if not want_greedy:
        return sums, counts
    wrong = torch.zeros(sources.shape[0], dtype=torch.long, device=ce.device)
    wrong.index_add_(0, row, (logits.argmax(-1) != targets).long())
    return sums, counts, wrong == 0


@torch.no_grad()
def causal_row_nll(model, rows: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                   batch_size: int = 16, device=None, want_greedy: bool = False,
                   progress: Callable[[int], None] = lambda n: None):
    """Per row: the NLL sum of tokens ``row[starts[i]:]`` given what precedes them (and their count).

    With ``want_greedy`` also whether every one of those tokens is the argmax prediction.
    """
    sums = [0.0] * len(rows)
    greedy = [False] * len(rows)
    for batch in length_batches([len(r) for r in rows], batch_size):
        ids, attention = pad_rows([rows[i] for i in batch], pad_id, device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        for j, i in enumerate(batch):
            lo, hi = starts[i], len(rows[i])
            target = ids[j, lo:hi]
            scored = logits[j, lo - 1: hi - 1].float()
            sums[i] = float(-torch.log_softmax(scored, dim=-1).gather(-1, target[:, None]).sum())
            greedy[i] = bool((scored.argmax(-1) == target).all())
        progress(len(batch))
    counts = [len(r) - s for r, s in zip(rows, starts)]
    return (sums, counts, greedy) if want_greedy else (sums, counts)


@torch.no_grad()
def block_row_nll(net, x0: torch.Tensor, xt: torch.Tensor, masked: torch.Tensor, block_size: int,
                  attention_mask=None, shift: bool = True, want_greedy: bool = False):
    """:func:`diffusion_row_nll` for a block model: per row, the
    CE sum of the masked tokens (each block given the clean blocks before it) and their count."""
    sources, slots = block_sources(masked, block_size, shift)
    logits = subs_logits(net, net.block_scored_logits(x0, xt, sources, block_size, attention_mask))
    return per_row_nll(logits, x0[sources.nonzero()[:, 0], slots], sources, want_greedy)
