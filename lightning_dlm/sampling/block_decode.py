"""Block-by-block decoding of a block diffusion model, with an exact KV cache of committed blocks.

A block model (``model.diffusion.attention: block``) attends causally across blocks, so the
keys/values of a committed block never change: caching them is exact. :func:`block_decode`
decodes every row block by block, blocks aligned on the row's own positions (0, B, 2B, ... as in
training; the block holding the end of the prompt is completed first):

* prefill: one pass over each row's whole prompt blocks (block-causal), cached;
* denoising steps: the current block alone (B queries) attends the cache and itself; any
  registered strategy picks what to commit (``threshold`` parallel decoding is the default);
* commit: the decided block is run once more, clean, and its keys/values appended. With the
  shift, its last position's logits predict the first slot of the next block (the first slot of
  a block reads the last clean token of the block before it, as in training).

The shift. With it (``shift=True``: Fast-dLLM v2, our own block models) slot i of a block reads
the logits of position i - 1, so a block's first slot comes from the previous block's last clean
position (computed by the commit pass). Without it (``shift=False``: BD3LM, dllm's Tiny-A2D BD3LM)
slot i reads position i itself, a mask while undecided, so every slot of a block comes from the
block's own queries; the prompt may then be empty. Only the pass helpers below depend on it: which
queries' logits they keep (the sampler's :func:`~lightning_dlm.sampling.canvas.slot_logit_positions`)
and how they align them (:func:`_aligned`).

The first slot. A block's first undecided slot is decided by the strategy with the other slots
(the default, ``first_slot="strategy"``); Fast-dLLM v2 instead commits it greedily (the argmax of
its prediction from the last committed token) before the block's denoising:
``first_slot="greedy"`` does that.

``kv_cache=False`` runs the same computation without a cache (every step over the whole
committed prefix and the block, block-causal pattern): the reference the cached run equals
token for token. ``sub_block`` decodes a block in sub-blocks left to right (Fast-dLLM v2);
with ``sub_block_cache`` the other columns of the block are cached at the first step of each
sub-block and reused (stale) until the next one: Fast-dLLM v2's approximate sub-block cache.

The loop of denoising steps is the sampler's own
(:meth:`~lightning_dlm.sampling.engine.DecodeRun.denoise`); what is particular here is how a
block's logits are computed and the cache of committed blocks (transformers ``Cache`` objects:
``DynamicCache`` layers' ``keys`` / ``values``, ``crop``, ``get_seq_length``).

Rows are left-padded, each with its own positions; every row's blocks advance together (one
block per round), so a cache of the batch stays aligned. ``stop_at_eos`` ends a row at its first
committed EOS whose left is decided (variable length); rows that end drop out of the batch. The
result's ``ids`` (and its trajectory) lay the rows out as a canvas, prompts left-padded, every
row's generated region in the same columns (``Decoded.target_span``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from transformers import Cache

from lightning_dlm.core.errors import DLMError
from lightning_dlm.sampling.canvas import slot_logit_positions
from lightning_dlm.sampling.denoisers import copy_kv
from lightning_dlm.sampling.engine import Decoded, DecodeRun, SamplerConfig, eos_done
from lightning_dlm.sampling.static_blocks import StaticBlockPasses, check_static_shapes


def _block_causal_mask(net, positions: torch.Tensor, real: torch.Tensor, block_size: int) -> torch.Tensor:
    """Additive (B, 1, W, W) mask: key visible when its block <= the query's block and it is real."""
    from lightning_dlm.core.annealing import additive_attention_mask

    allowed = (positions[:, None, :] // block_size) <= (positions[:, :, None] // block_size)
    return additive_attention_mask(allowed, real, dtype=net.mask_dtype())


class _Rows:
    """Per-row token buffers (positions 0..), prompts, target spans and block indices."""

    def __init__(self, prefixes: Sequence[Sequence[int]], length: int, block_size: int, mask_id: int, device):
        self.B = block_size
        self.p = [len(x) for x in prefixes]
        self.first_block = [p // block_size for p in self.p]
        self.last_block = [(p + length - 1) // block_size for p in self.p]
        width = max((e + 1) * block_size for e in self.last_block)
        self.tokens = torch.full((len(prefixes), width), mask_id, dtype=torch.long, device=device)
        self.open = torch.zeros((len(prefixes), width), dtype=torch.bool, device=device)  # target slots undecided
        for r, x in enumerate(prefixes):
            self.tokens[r, : len(x)] = torch.as_tensor(list(x), dtype=torch.long, device=device)
            self.open[r, len(x): len(x) + length] = True
        self.length = length
        self.span = (max(self.p), max(self.p) + length)  # the target columns of :meth:`canvas`

    def start(self, r: int, k: int) -> int:
        return (self.first_block[r] + k) * self.B

    def canvas(self, pad_id: int) -> torch.Tensor:
        """Prompt and target of every row, prompts left-padded: the targets in the columns ``span``."""
        out = torch.full((len(self.p), self.span[1]), pad_id, dtype=torch.long, device=self.tokens.device)
        for r, p in enumerate(self.p):
            out[r, self.span[0] - p:] = self.tokens[r, : p + self.length]
        return out


@torch.no_grad()
def block_decode(net, prefixes: Sequence[Sequence[int]], length: int, config: SamplerConfig, *, block_size: int,
                 schedule, seeds: Sequence[int], shift: bool = True, eos_id: Optional[int] = None, pad_id: int = 0,
                 suppress_ids: Sequence[int] = (), kv_cache: bool = True, sub_block: Optional[int] = None,
                 sub_block_cache: bool = False, graphs: Union[bool, str, None] = False,
                 first_slot: str = "strategy") -> Decoded:
    """Decode ``length`` tokens after every prefix (token ids, each at least one token with the
    shift). ``config.steps`` is the number of steps per block; ``config.block_size`` / ``cache``
    are not used here (the block size is ``block_size``; the cache is exact). Returns a
    :class:`~lightning_dlm.sampling.engine.Decoded` whose ``ids`` are the rows as a canvas
    (left-padded with ``pad_id``, which also fills a row right of its EOS with ``stop_at_eos``).

    ``graphs``: True runs the passes over a static KV cache, compiled by inductor (CUDA graphs on a
    GPU: :mod:`lightning_dlm.sampling.static_blocks`), with the same tokens as the eager decode; a
    string names another ``torch.compile`` backend (``eager``: traced, no kernels generated; a quick
    check), ``"none"`` the static cache run eagerly. It needs a fixed batch (refused in one line
    otherwise).

    ``first_slot``: ``strategy`` (default) decides a block's first undecided slot with the others,
    by the strategy; ``greedy`` commits it first, the argmax of its prediction (read from the last
    committed token) before the block's denoising steps, as Fast-dLLM v2's decoder does (its
    ``batch_sample`` appends the argmax of the last position's logits as the next block's first
    token). The greedy slot is not counted in ``stats.steps`` / ``committed_per_step``."""
    device = next(net.parameters()).device
    run = DecodeRun(config, schedule, seeds, len(prefixes), device, eos_id, suppress_ids)
    shift = bool(shift)
    if shift and any(len(x) == 0 for x in prefixes):
        raise DLMError("with the shift, every prompt needs at least one token (a BOS) to predict from")
    if sub_block is not None and (sub_block < 1 or block_size % sub_block):
        raise DLMError(f"sub_block {sub_block} must be >= 1 and divide the block size {block_size}")
    if sub_block_cache and (sub_block is None or not kv_cache):
        raise DLMError("sub_block_cache needs sub_block and the KV cache (kv_cache=True)")
    if first_slot not in ("strategy", "greedy"):
        raise DLMError(f"first_slot must be strategy or greedy (Fast-dLLM v2's argmax first slot), got '{first_slot}'")
    B, sub, n, stats, clean_logits = block_size, sub_block or block_size, len(prefixes), run.stats, run.clean
    rows = _Rows(prefixes, length, B, net.mask_token_id, device)
    active = list(range(n))
    cmax = max(rows.first_block)
    static: Optional[StaticBlockPasses] = None  # graphs=True: the fixed-shape passes
    if graphs:
        check_static_shapes(rows.first_block, rows.last_block, stop_at_eos=config.stop_at_eos, kv_cache=kv_cache,
                            sub_block=sub_block, sub_block_cache=sub_block_cache)
        blocks = rows.last_block[0] - rows.first_block[0] + 1
        backend = "inductor" if graphs is True else (None if graphs == "none" else str(graphs))
        static = StaticBlockPasses(net, n, (cmax + blocks) * B, B, backend=backend, shift=shift)

    # --- prefill: the whole prompt blocks of every row (left-padded to cmax blocks) ---------------
    kv: Optional[Cache] = None  # the committed blocks' keys/values
    kv_real: Optional[torch.Tensor] = None  # (rows, C) 1 = a real cached key
    first = torch.zeros((n, net.vocab_size), device=device)  # logits of each row's next block's first slot
    if kv_cache and cmax > 0:
        width = cmax * B
        ids = torch.full((n, width), net.mask_token_id, dtype=torch.long, device=device)
        real = torch.zeros((n, width), dtype=torch.long, device=device)
        for r in range(n):
            m = rows.first_block[r] * B
            ids[r, width - m:] = rows.tokens[r, :m]
            real[r, width - m:] = 1
        positions = (real.cumsum(1) - 1).clamp_min(0)
        if static is not None:
            last = static.prefill(ids, real, positions)
        else:
            mask = _block_causal_mask(net, positions, real, B)
            logits, kv = net.cached_forward(ids, mask, positions, torch.tensor([width - 1], device=device),
                                            use_cache=True)
            last = logits[:, -1]
        stats.forward_passes += 1
        stats.full_passes += 1
        stats.positions_computed += n * width
        kv_real = real
        first = clean_logits(last)

    k = 0
    pending: Optional[torch.Tensor] = None  # logits of the current block computed by the last commit pass
    stale: Optional[Cache] = None  # with sub_block_cache: committed + block keys/values at the sub-block's first step

    def drop_pending(commit: torch.Tensor) -> None:  # the block changed: the commit pass's logits are stale
        nonlocal pending
        pending = None

    def snapshot() -> torch.Tensor:
        for j, (r, s) in enumerate(zip(active, starts)):
            rows.tokens[r, s: s + B] = block_ids[j]
        return rows.canvas(pad_id).cpu()

    while active:
        idx = torch.tensor(active, device=device)
        starts = [rows.start(r, k) for r in active]
        block_ids = torch.stack([rows.tokens[r, s: s + B] for r, s in zip(active, starts)])
        block_open = torch.stack([rows.open[r, s: s + B] for r, s in zip(active, starts)])
        pos = torch.stack([torch.arange(s, s + B, device=device) for s in starts])
        steps = max(1, min(B, config.steps))
        for lo in range(0, B, sub):
            hi = lo + sub
            allowed = torch.zeros(B, dtype=torch.bool, device=device)
            allowed[lo:hi] = True
            stale = None

            def logits_fn(step: int, eligible: torch.Tensor) -> torch.Tensor:
                nonlocal stale
                if pending is not None:  # the block has not changed since the commit pass computed them
                    return pending
                if shift and kv_cache and B == 1:  # the only slot reads the last committed position: no pass
                    return clean_logits(first[idx][:, None])
                stats.forward_passes += 1
                if not kv_cache:
                    out = _uncached(net, rows, active, starts, block_ids, B, shift, stats)
                elif static is not None:
                    out = _aligned(static.denoise(block_ids, pos), first[idx], shift)
                    stats.positions_computed += block_ids.shape[0] * B
                elif sub_block_cache and step > 0 and stale is not None:
                    out = _sub_cached(net, stale, kv_real, block_ids, pos, lo, hi, first[idx], shift, stats)
                else:
                    out, stale = _cached(net, kv, kv_real, block_ids, pos, first[idx], shift, stats,
                                         keep_kv=sub_block_cache)
                return clean_logits(out)

            if first_slot == "greedy" and lo == 0:  # Fast-dLLM v2: the first undecided slot by argmax, first
                at_zero = shift and kv_cache and bool(block_open[:, 0].all())  # slot 0 reads the cached last token
                _commit_first_greedy(block_ids, block_open, first[idx][:, None] if at_zero else logits_fn(0, allowed))
                pending, stale = None, None  # the block changed
            run.denoise(block_ids, block_open, allowed, max(1, math.ceil(steps * sub / B)), logits_fn, rows=active,
                        on_commit=drop_pending, snapshot=snapshot)
        # --- the block is decided: write it back, stop rows at EOS / at their last block ----------
        keep = []
        for j, (r, s) in enumerate(zip(active, starts)):
            rows.tokens[r, s: s + B] = block_ids[j]
            rows.open[r, s: s + B] = block_open[j]
            p = rows.p[r]
            hit = eos_done(rows.tokens[r, p: p + length], rows.open[r, p: p + length], eos_id) if config.stop_at_eos else None
            if hit is not None:
                run.eos_at[r], run.stopped[r] = hit, True
                rows.tokens[r, p + hit + 1: p + length] = pad_id
            elif rows.first_block[r] + k < rows.last_block[r]:
                keep.append(j)
        pending = None
        if keep and kv_cache:
            sel = torch.tensor(keep, device=device)
            clean, clean_pos = block_ids.index_select(0, sel), pos.index_select(0, sel)
            if static is not None:  # the whole batch (fixed): commit and the next block's first pass
                nxt = torch.stack([rows.tokens[active[j], starts[j] + B: starts[j] + 2 * B] for j in keep])
                first_sel, pending = static.commit_and_next(clean, clean_pos, nxt)
                stats.forward_passes += 1
                stats.positions_computed += clean.shape[0] * 2 * B
                pending = clean_logits(pending)
            elif sub_block_cache:
                kv, kv_real, first_sel = _commit(net, kv, kv_real, clean, clean_pos, sel, stats)
            else:  # one pass: commit this block and run the next block's first denoising step
                nxt = torch.stack([rows.tokens[active[j], starts[j] + B: starts[j] + 2 * B] for j in keep])
                kv, kv_real, first_sel, pending = _commit_and_next(net, kv, kv_real, clean, clean_pos, nxt, sel, shift,
                                                                   stats)
                pending = clean_logits(pending)
            first = first.clone()
            first[idx[sel]] = clean_logits(first_sel)
        active = [active[j] for j in keep]
        k += 1
    return run.finish(rows.canvas(pad_id), rows.span)


def _commit_first_greedy(block_ids: torch.Tensor, block_open: torch.Tensor, logits: torch.Tensor) -> None:
    """Commit every row's first undecided slot to the argmax of its slot-aligned ``logits`` (rows,
    >= that slot + 1, V), in place (the strategy's suppressed ids already at -inf)."""
    rows = torch.nonzero(block_open.any(1)).flatten()
    col = block_open.int().argmax(1)[rows]
    block_ids[rows, col] = logits[rows, col].argmax(-1)
    block_open[rows, col] = False


def _aligned(query_logits: torch.Tensor, first: torch.Tensor, shift: bool) -> torch.Tensor:
    """(rows, B, V) slot-aligned logits of a block from the logits of its kept queries:
    with the shift slot 0 from the previous block's last clean position (``first``) and slot i from
    query i - 1; without it, slot i from query i (``first`` unused)."""
    if not shift:
        return query_logits
    return torch.cat([first[:, None].to(query_logits.dtype), query_logits], dim=1)


def _cached(net, kv: Optional[Cache], kv_real, block_ids, pos, first, shift: bool, stats,
            keep_kv: bool = False) -> Tuple[torch.Tensor, Optional[Cache]]:
    """The current block attending the cached committed blocks (exact). Returns slot-aligned logits
    and, with ``keep_kv``, the cache with the block's own keys/values appended (the sub-block cache)."""
    rows, B = block_ids.shape
    mask = None if kv is None else torch.cat([kv_real, torch.ones_like(block_ids)], dim=1)
    keep = torch.arange(*slot_logit_positions(int(shift), B, shift), device=block_ids.device)  # shift: slot 0 is ``first``
    logits, cache = net.cached_forward(block_ids, mask, pos, keep, past=None if kv is None else copy_kv(kv),
                                       use_cache=keep_kv)
    stats.positions_computed += rows * B
    return _aligned(logits, first, shift), cache if keep_kv else None


def _sub_cached(net, stale: Cache, kv_real, block_ids, pos, lo: int, hi: int, first, shift: bool,
                stats) -> torch.Tensor:
    """Fast-dLLM v2's sub-block cache (approximate): the sub-block's queries (with the shift, and
    the one before it) attend the committed cache and the block's other columns as cached at the
    sub-block's first step. Slot-aligned logits; slots outside the sub-block are zeros."""
    (rows, B), device = block_ids.shape, block_ids.device
    a = max(lo - 1, 0) if shift else lo  # the first query recomputed
    c = stale.get_seq_length() - B  # the committed columns before the block's
    cols = torch.cat([torch.arange(0, c + a, device=device), torch.arange(c + hi, c + B, device=device)])
    real = torch.ones((rows, len(cols) - c + hi - a), dtype=torch.long, device=device)
    mask = real if kv_real is None else torch.cat([kv_real, real], 1)
    keep = torch.arange(0, hi - a - int(shift), device=device)
    logits, _ = net.cached_forward(block_ids[:, a:hi], mask, pos[:, a:hi], keep, past=copy_kv(stale, cols=cols))
    stats.positions_computed += rows * (hi - a)
    out = torch.zeros((rows, B, logits.shape[-1]), dtype=logits.dtype, device=device)
    if not shift:
        out[:, lo:hi] = logits  # slot i from query i
        return out
    out[:, a + 1: hi] = logits  # slot i from query i - 1
    if a == 0:
        out[:, 0] = first.to(logits.dtype)
    return out


def _commit(net, kv: Optional[Cache], kv_real, block_ids, pos, sel, stats):
    """Append the clean decided block of the rows ``sel`` to the cache; returns the new cache, its
    key mask, and each row's logits at the block's last position (the next block's first slot)."""
    B = block_ids.shape[1]
    keep = torch.tensor([B - 1], device=block_ids.device)
    if kv is None:
        mask, past, real = None, None, torch.ones_like(block_ids)
    else:
        real = torch.cat([kv_real.index_select(0, sel), torch.ones_like(block_ids)], dim=1)
        mask, past = real, copy_kv(kv, rows=sel)
    logits, cache = net.cached_forward(block_ids, mask, pos, keep, past=past, use_cache=True)
    stats.forward_passes += 1
    stats.positions_computed += block_ids.shape[0] * B
    return cache, real, logits[:, -1]


def _commit_and_next(net, kv: Optional[Cache], kv_real, block_ids, pos, nxt, sel, shift: bool, stats):
    """:func:`_commit` and the first denoising pass of the next block in one forward pass: the clean
    block's queries see the cache and themselves, the next block's see the cache, the clean block
    and themselves; only the clean block's keys/values are kept. Returns the new cache, its key
    mask, the first-slot logits (with the shift: the clean block's last position; without it
    unused) and the next block's slot-aligned logits."""
    (rows, B), device = block_ids.shape, block_ids.device
    c = 0 if kv is None else kv.get_seq_length()
    prev = torch.zeros((rows, 0), dtype=torch.long, device=device) if kv is None else kv_real.index_select(0, sel)
    keys = torch.cat([prev, torch.ones((rows, 2 * B), dtype=prev.dtype, device=device)], 1).bool()
    allowed = keys[:, None, :].repeat(1, 2 * B, 1)
    allowed[:, :B, c + B:] = False  # the clean block does not see the next block
    dtype = net.mask_dtype()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    ids = torch.cat([block_ids, nxt], 1)
    positions = torch.cat([pos, pos + B], 1)
    keep = torch.arange(*slot_logit_positions(B, 2 * B, shift), device=device)  # the next block's slots
    logits, cache = net.cached_forward(ids, mask[:, None], positions, keep,
                                       past=None if kv is None else copy_kv(kv, rows=sel), use_cache=True)
    stats.forward_passes += 1
    stats.positions_computed += rows * 2 * B
    cache.crop(-B)  # drop the next block's keys/values: it is not decided yet
    real = torch.cat([prev, torch.ones_like(block_ids)], 1)
    return cache, real, logits[:, 0], logits


def _uncached(net, rows: _Rows, active, starts, block_ids, B: int, shift: bool, stats):
    """The reference pass: every committed block and the current one, no cache (block-causal
    pattern), slot-aligned logits of the current block."""
    device = block_ids.device
    width = max(starts) + B
    ids = torch.full((len(active), width), net.mask_token_id, dtype=torch.long, device=device)
    real = torch.zeros((len(active), width), dtype=torch.long, device=device)
    for j, (r, s) in enumerate(zip(active, starts)):
        ids[j, width - s - B: width - B] = rows.tokens[r, :s]
        ids[j, width - B:] = block_ids[j]
        real[j, width - s - B:] = 1
    positions = (real.cumsum(1) - 1).clamp_min(0)
    mask = _block_causal_mask(net, positions, real, B)
    # the block's slots (slot_logit_positions), clamped at 0: a first block that starts at position 0
    # holds the prompt's first token in its slot 0, never decoded
    keep = torch.arange(width - B - int(shift), width - int(shift), device=device).clamp_min(0)
    logits, _ = net.cached_forward(ids, mask, positions, keep)
    stats.full_passes += 1
    stats.positions_computed += len(active) * width
    return logits
