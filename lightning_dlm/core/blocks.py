"""Block diffusion: the math of ``model.diffusion.attention: block`` (pure torch, no Lightning).

A block model attends bidirectionally inside blocks of ``block_size`` tokens and causally across
blocks (BD3-LM, Fast-dLLM v2). Training runs one pass per batch over ``2L`` positions: the noised
sequence x_t (columns 0..L-1) then the clean sequence x_0 (columns L..2L-1), the clean copy
carrying the same position ids. One boolean pattern ``allowed[q, k]`` in three parts:

* noised block b -> itself (bidirectional);
* noised block b -> the clean blocks before it (the committed context);
* clean block b -> the clean blocks <= b (block-causal: the clean copy is what the sampler caches).

The clean copy never reads the noised copy, and no noised block reads another noised block.

The shift. Logits at position i predict token i + 1. A masked slot j inside noised block b reads
the noised copy's position j - 1 when j - 1 is in the same block; the first slot of block b
(j = b * B) reads the clean copy's position j - 1, the last clean token of block b - 1, whose
hidden state has seen every clean token before block b. So at block size 1 every prediction
comes from the clean copy under a causal pattern: the objective is the causal LM's cross-entropy
(the noised copy is never read, and :func:`block_sources` skips it).

Noise: t is drawn per sequence or per block (``block_t``); with ``complementary_masks`` every
sequence is also trained with the complementary mask (Fast-dLLM v2) at time 1 - t (linear
schedule: the complement of a mask of rate t has rate 1 - t).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from lightning_dlm.core.errors import DLMError

ScheduleSpec = Union[Dict[int, int], Sequence[Sequence[int]], None]


# --- options --------------------------------------------------------------------------------------
def normalize_schedule(spec: ScheduleSpec) -> List[Tuple[int, int]]:
    """``{step: size}`` or ``[[step, size], ...]`` as a sorted list of (step, size) (string keys from
    JSON accepted)."""
    if spec is None:
        return []
    items = spec.items() if isinstance(spec, dict) else spec
    out = []
    for item in items:
        try:
            step, size = item
            out.append((int(step), int(size)))
        except (TypeError, ValueError):
            raise DLMError(f"model.diffusion.block_size_schedule entries are [step, size] pairs, got {item!r}") from None
    return sorted(out)


def check_block_options(cfg) -> None:
    """One-line errors for impossible block options of a :class:`DiffusionConfig` (seq_len is
    checked by :func:`check_block_seq_len`, where it is known)."""
    if int(cfg.block_size) < 1:
        raise DLMError(f"model.diffusion.block_size must be >= 1, got {cfg.block_size}")
    if cfg.block_t not in ("sequence", "block"):
        raise DLMError(f"model.diffusion.block_t must be sequence or block, got '{cfg.block_t}'")
    if cfg.anneal_steps > 0:
        raise DLMError("attention: block takes no attention annealing (anneal_steps > 0): set anneal_steps: 0 and grow "
                       "the block size with block_size_schedule instead (the block mode's annealing)")
    if cfg.complementary_masks and cfg.schedule != "linear":
        raise DLMError(f"complementary_masks needs the linear schedule (the complement of rate t is rate 1 - t), got "
                       f"schedule: {cfg.schedule}")
    if cfg.complementary_masks and not cfg.eps < 0.5:
        raise DLMError(f"complementary_masks draws t from [eps, 1 - eps] (both copies' times floored at eps): "
                       f"model.diffusion.eps must be < 0.5, got {cfg.eps}")
    schedule = normalize_schedule(cfg.block_size_schedule)
    if not schedule:
        return
    steps = [s for s, _ in schedule]
    sizes = [b for _, b in schedule]
    if steps[0] < 0 or len(set(steps)) != len(steps):
        raise DLMError(f"model.diffusion.block_size_schedule needs distinct steps >= 0, got {schedule}")
    if min(sizes) < 1:
        raise DLMError(f"model.diffusion.block_size_schedule sizes must be >= 1, got {sizes}")
    for (s0, a), (s1, b) in zip(schedule, schedule[1:]):
        if b < a:
            raise DLMError(f"model.diffusion.block_size_schedule shrinks the block size from {a} to {b} at step {s1}: "
                           f"block sizes may only grow")
    if sizes[-1] != int(cfg.block_size):
        raise DLMError(f"model.diffusion.block_size_schedule ends at block size {sizes[-1]} but block_size is "
                       f"{cfg.block_size}: end the schedule at block_size (the size the model samples with)")


def check_block_seq_len(cfg, seq_len: int) -> None:
    """Every block size of the run (schedule included) must divide ``seq_len``."""
    sizes = [int(cfg.block_size)] + [b for _, b in normalize_schedule(cfg.block_size_schedule)]
    for size in sorted(set(sizes)):
        if size > seq_len:
            raise DLMError(f"model.diffusion block size {size} is above data.seq_len {seq_len}: use a block size <= {seq_len}")
        if seq_len % size:
            raise DLMError(f"model.diffusion block size {size} does not divide data.seq_len {seq_len}: use a divisor "
                           f"of {seq_len} (e.g. a power of two)")


def block_size_at(step: int, block_size: int, schedule: ScheduleSpec = None) -> int:
    """The training block size at optimiser step ``step``: the schedule's last entry at or before
    it (its first entry before that), or ``block_size`` without a schedule."""
    entries = normalize_schedule(schedule)
    if not entries:
        return int(block_size)
    size = entries[0][1]
    for start, value in entries:
        if start <= step:
            size = value
    return size


# --- layout and masks -----------------------------------------------------------------------------
def block_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 2L) position ids of the 2L layout: the clean copy repeats the noised copy's."""
    return torch.cat([position_ids, position_ids], dim=1)


def allowed_2l(q: torch.Tensor, k: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """``allowed[q, k]`` of the 2L layout on index tensors (any broadcastable shapes): the one
    definition, evaluated densely (:func:`block_attention_allowed`) or inside FlexAttention
    (:func:`block_mask_mod`)."""
    q_clean, k_clean = q >= length, k >= length
    qb = torch.where(q_clean, q - length, q) // block_size
    kb = torch.where(k_clean, k - length, k) // block_size
    noised_self = ~q_clean & ~k_clean & (qb == kb)
    noised_context = ~q_clean & k_clean & (kb < qb)
    clean_causal = q_clean & k_clean & (kb <= qb)
    return noised_self | noised_context | clean_causal


def block_attention_allowed(length: int, block_size: int, device=None) -> torch.Tensor:
    """The dense (2L, 2L) boolean pattern of the training layout."""
    idx = torch.arange(2 * length, device=device)
    return allowed_2l(idx[:, None], idx[None, :], length, block_size)


def block_mask_mod(length: int, block_size: int, padding_mask: Optional[torch.Tensor] = None):
    """The FlexAttention ``mask_mod(b, h, q, k)`` of :func:`block_attention_allowed` (keys that are
    padding blocked when ``padding_mask`` (B, L), 1 = real, is given; the diagonal kept open)."""
    pad2 = None if padding_mask is None else torch.cat([padding_mask, padding_mask], dim=1).bool()

    def mod(b, h, q, k):
        ok = allowed_2l(q, k, length, block_size)
        if pad2 is not None:
            ok = ok & pad2[b, k]
        return ok | (q == k)

    return mod


# --- noise ----------------------------------------------------------------------------------------
def block_times(batch: int, length: int, block_size: int, per_block: bool, draw) -> torch.Tensor:
    """(B, L) time of every position: one draw per sequence or per block. ``draw(n)`` returns n
    times (e.g. :func:`~lightning_dlm.core.schedules.sample_t` with the batch generator)."""
    if per_block:
        blocks = length // block_size
        return draw(batch * blocks).view(batch, blocks).repeat_interleave(block_size, dim=1)
    return draw(batch)[:, None].expand(batch, length)


def corrupt_positions(x0: torch.Tensor, t_pos: torch.Tensor, mask_id: int, schedule, maskable: torch.Tensor,
                      generator=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, masked, u)``: each maskable token masked w.p. ``1 - alpha(t)`` of its own time.

    ``u`` (B, L) are the uniforms drawn (the complementary mask reuses them)."""
    if isinstance(generator, (list, tuple)):  # one generator per row: a row's draws do not depend on its batch
        u = torch.stack([torch.rand(x0.shape[1:], generator=g, device=x0.device) for g in generator])
    else:
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (u < schedule.mask_prob(t_pos.float())) & maskable
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked, u


def complement(x0: torch.Tensor, masked: torch.Tensor, maskable: torch.Tensor, t_pos: torch.Tensor, mask_id: int):
    """The complementary draw: the maskable slots not masked, at time 1 - t (linear schedule). The
    block objective draws t in [eps, 1 - eps] when it uses it, so 1 - t is floored at eps as t is."""
    other = maskable & ~masked
    return torch.where(other, torch.full_like(x0, mask_id), x0), other, 1.0 - t_pos


# --- the shift at block boundaries ----------------------------------------------------------------
def block_sources(masked: torch.Tensor, block_size: int, shift: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where the prediction of every masked slot comes from, in the 2L layout.

    Returns ``(sources (B, 2L) bool, slot_of_row (N,))``: ``sources`` marks the rows whose logits
    are scored (row-major order) and ``slot_of_row`` is the slot (0..L-1) each of them predicts.
    With the shift, slot j reads noised row j - 1 inside its block and clean row L + j - 1 when j
    starts a block; without it, slot j reads noised row j.
    """
    batch, length = masked.shape
    masked = masked.bool()
    sources = torch.zeros(batch, 2 * length, dtype=torch.bool, device=masked.device)
    slot_src = torch.full((batch, 2 * length), -1, dtype=torch.long, device=masked.device)
    slots = torch.arange(length, device=masked.device).expand(batch, length)
    if not shift:
        sources[:, :length] = masked
        slot_src[:, :length] = slots
        return sources, slot_src[sources]
    first = (torch.arange(length, device=masked.device) % block_size) == 0  # slots that start a block
    inner = masked[:, 1:] & ~first[1:]  # slot j reads noised row j - 1
    start = masked[:, 1:] & first[1:]  # slot j reads clean row L + j - 1
    sources[:, : length - 1] = inner
    slot_src[:, : length - 1] = torch.where(inner, slots[:, 1:], -1)
    sources[:, length: 2 * length - 1] = start
    slot_src[:, length: 2 * length - 1] = torch.where(start, slots[:, 1:], -1)
    return sources, slot_src[sources]
