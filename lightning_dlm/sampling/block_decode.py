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

``kv_cache=False`` runs the same computation without a cache (every step over the whole
committed prefix and the block, block-causal pattern): the reference the cached run equals
token for token. ``sub_block`` decodes a block in sub-blocks left to right (Fast-dLLM v2);
with ``sub_block_cache`` the other columns of the block are cached at the first step of each
sub-block and reused (stale) until the next one: Fast-dLLM v2's approximate sub-block cache.

Rows are left-padded, each with its own positions; every row's blocks advance together (one
block per round), so a cache of the batch stays aligned. ``stop_at_eos`` ends a row at its first
committed EOS whose left is decided (variable length); rows that end drop out of the batch.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence, Tuple

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.sampling.engine import Decoded, SamplerConfig, SamplingStats
from lightning_dlm.sampling.strategies import StepContext

KV = List[Tuple[torch.Tensor, torch.Tensor]]


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

    def start(self, r: int, k: int) -> int:
        return (self.first_block[r] + k) * self.B


@torch.no_grad()
def block_decode(net, prefixes: Sequence[Sequence[int]], length: int, config: SamplerConfig, *, block_size: int,
                 schedule, seeds: Sequence[int], shift: bool = True, eos_id: Optional[int] = None,
                 suppress_ids: Sequence[int] = (), kv_cache: bool = True, sub_block: Optional[int] = None,
                 sub_block_cache: bool = False) -> Decoded:
    """Decode ``length`` tokens after every prefix (token ids, each at least one token with the
    shift). ``config.steps`` is the number of steps per block; ``config.block_size`` / ``cache``
    are not used here (the block size is ``block_size``; the cache is exact). Returns a
    :class:`~lightning_dlm.sampling.engine.Decoded` whose ``ids`` are the rows' token buffers."""
    strategy = config.check()
    if config.stop_at_eos and eos_id is None:
        raise DLMError("stop_at_eos needs an EOS token: the tokenizer has none")
    if len(seeds) != len(prefixes):
        raise DLMError(f"got {len(seeds)} seeds for {len(prefixes)} rows: give one seed per row")
    if not shift:
        raise DLMError("block decoding reads every slot from the position before it (the shift): this model was "
                       "trained without it (diffusion.shift: false); train block models with shift: true")
    if any(len(x) == 0 for x in prefixes):
        raise DLMError("with the shift, every prompt needs at least one token (a BOS) to predict from")
    if sub_block is not None and (sub_block < 1 or block_size % sub_block):
        raise DLMError(f"sub_block {sub_block} must be >= 1 and divide the block size {block_size}")
    if sub_block_cache and (sub_block is None or not kv_cache):
        raise DLMError("sub_block_cache needs sub_block and the KV cache (kv_cache=True)")
    device = next(net.parameters()).device
    B = block_size
    rows = _Rows(prefixes, length, B, net.mask_token_id, device)
    n = len(prefixes)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    suppress = sorted(set(int(i) for i in suppress_ids))
    stats = SamplingStats()
    trajectory: Optional[List[torch.Tensor]] = [] if config.capture_trajectory else None
    eos_at: List[Optional[int]] = [None] * n
    stopped = [False] * n
    active = list(range(n))
    cmax = max(rows.first_block)
    sub = sub_block or B

    def clean_logits(raw: torch.Tensor) -> torch.Tensor:
        raw = raw.float()
        if suppress:
            raw[..., suppress] = float("-inf")
        return raw

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_start = time.perf_counter()

    # --- prefill: the whole prompt blocks of every row (left-padded to cmax blocks) ---------------
    kv: Optional[KV] = None
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
        mask = _block_causal_mask(net, positions, real, B)
        logits, cache = net.cached_forward(ids, mask, positions, torch.tensor([width - 1], device=device),
                                           use_cache=True)
        stats.forward_passes += 1
        stats.full_passes += 1
        stats.positions_computed += n * width
        kv = [(k, v) for k, v, *_ in cache]
        kv_real = real
        first = clean_logits(logits[:, -1])

    k = 0
    pending: Optional[torch.Tensor] = None  # logits of the current block computed by the last commit pass
    while active:
        idx = torch.tensor(active, device=device)
        starts = [rows.start(r, k) for r in active]
        block_ids = torch.stack([rows.tokens[r, s: s + B] for r, s in zip(active, starts)])
        block_open = torch.stack([rows.open[r, s: s + B] for r, s in zip(active, starts)])
        pos = torch.stack([torch.arange(s, s + B, device=device) for s in starts])
        steps = max(1, min(B, config.steps))
        for lo in range(0, B, sub):
            hi = lo + sub
            sub_steps = max(1, math.ceil(steps * sub / B))
            stale: Optional[KV] = None
            for step in range(sub_steps):
                eligible = block_open.clone()
                eligible[:, :lo] = False
                eligible[:, hi:] = False
                if not eligible.any():
                    break

                def logits_fn(step=step):
                    nonlocal stale
                    if pending is not None:  # the block has not changed since the commit pass computed them
                        return pending
                    if kv_cache and B == 1:  # the only slot reads the last committed position: no pass
                        return clean_logits(first[idx][:, None])
                    stats.forward_passes += 1
                    if not kv_cache:
                        out = _uncached(net, rows, active, starts, block_ids, B, stats)
                    elif sub_block_cache and step > 0 and stale is not None:
                        out = _sub_cached(net, kv, kv_real, stale, block_ids, pos, lo, hi, B, first[idx], stats)
                    else:
                        out, block_kv = _cached(net, kv, kv_real, block_ids, pos, B, first[idx], stats,
                                                keep_kv=sub_block_cache)
                        stale = block_kv
                    return clean_logits(out)

                ctx = StepContext(eligible=eligible, step=step, steps=sub_steps, schedule=schedule,
                                  generators=[generators[r] for r in active], temperature=config.temperature,
                                  top_k=config.top_k, top_p=config.top_p, _logits_fn=logits_fn)
                result = strategy.step(ctx)
                stats.steps += 1
                committed = [0] * n
                if result is not None:
                    commit, tokens = result
                    commit = commit & eligible
                    block_ids = torch.where(commit, tokens, block_ids)
                    block_open &= ~commit
                    pending = None
                    for j, c in enumerate(commit.sum(1).tolist()):
                        committed[active[j]] = c
                stats.committed_per_step.append(committed)
                if trajectory is not None:
                    for j, (r, s) in enumerate(zip(active, starts)):
                        rows.tokens[r, s: s + B] = block_ids[j]
                    trajectory.append(rows.tokens.cpu().clone())
            if (block_open[:, lo:hi]).any():
                raise RuntimeError(f"strategy '{strategy.name}' left slots undecided at the end of a block")
        # --- the block is decided: write it back, stop rows at EOS / at their last block ----------
        keep: List[int] = []
        for j, (r, s) in enumerate(zip(active, starts)):
            rows.tokens[r, s: s + B] = block_ids[j]
            rows.open[r, s: s + B] = block_open[j]
            if config.stop_at_eos:
                p = rows.p[r]
                target = rows.tokens[r, p: p + length]
                hits = (target[: s + B - p] == eos_id).nonzero().flatten()
                if hits.numel():
                    eos_at[r], stopped[r] = int(hits[0]), True
                    continue
            if rows.first_block[r] + k < rows.last_block[r]:
                keep.append(j)
        pending = None
        if keep and kv_cache:
            sel = torch.tensor(keep, device=device)
            clean, clean_pos = block_ids.index_select(0, sel), pos.index_select(0, sel)
            if sub_block_cache:
                kv, kv_real, first_sel = _commit(net, kv, kv_real, clean, clean_pos, sel, stats)
            else:  # one pass: commit this block and run the next block's first denoising step
                nxt = torch.stack([rows.tokens[active[j], starts[j] + B: starts[j] + 2 * B] for j in keep])
                kv, kv_real, first_sel, pending = _commit_and_next(net, kv, kv_real, clean, clean_pos, nxt, sel, stats)
                pending = clean_logits(pending)
            first = first.clone()
            first[idx[sel]] = clean_logits(first_sel)
        active = [active[j] for j in keep]
        k += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.wall_time_s = time.perf_counter() - t_start
    out = []
    for r in range(n):
        row = rows.tokens[r, rows.p[r]: rows.p[r] + length].tolist()
        out.append(row[: eos_at[r]] if eos_at[r] is not None else row)
    stats.tokens = sum(len(x) for x in out)
    return Decoded(ids=rows.tokens, tokens=out, stopped_at_eos=stopped, stats=stats, trajectory=trajectory)


def _dyn(kv: KV):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


def _slot_aligned(query_logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(rows, B, V): slot 0 from the previous block's last clean position, slot i from query i - 1."""
    return torch.cat([first[:, None].to(query_logits.dtype), query_logits], dim=1)


def _cached(net, kv: Optional[KV], kv_real, block_ids, pos, B: int, first, stats, keep_kv: bool = False):
    """The current block attending the cached committed blocks (exact). Returns slot-aligned logits
    and, with ``keep_kv``, the block's own keys/values (for the sub-block cache)."""
    rows = block_ids.shape[0]
    keep = torch.arange(0, B - 1, device=block_ids.device)
    if kv is None:
        mask = None
        past = None
    else:
        mask = torch.cat([kv_real, torch.ones_like(block_ids)], dim=1)
        past = _dyn(kv)
    logits, cache = net.cached_forward(block_ids, mask, pos, keep, past=past, use_cache=keep_kv)
    stats.positions_computed += rows * B
    block_kv = None
    if keep_kv:
        c = 0 if kv is None else kv[0][0].shape[2]
        block_kv = [(kk[:, :, c:], vv[:, :, c:]) for kk, vv, *_ in cache]
    return _slot_aligned(logits, first), block_kv


def _sub_cached(net, kv, kv_real, stale: KV, block_ids, pos, lo: int, hi: int, B: int, first, stats):
    """Fast-dLLM v2's sub-block cache (approximate): the sub-block's queries (and the one before it)
    attend the committed cache and the block's other columns as cached at the sub-block's first step."""
    device = block_ids.device
    a = max(lo - 1, 0)
    cols = torch.cat([torch.arange(0, a, device=device), torch.arange(hi, B, device=device)])
    past_kv = [(sk.index_select(2, cols), sv.index_select(2, cols)) for sk, sv in stale]
    if kv is not None:
        past_kv = [(torch.cat([ck, sk], 2), torch.cat([cv, sv], 2)) for (ck, cv), (sk, sv) in zip(kv, past_kv)]
        real = torch.cat([kv_real, torch.ones((block_ids.shape[0], len(cols)), dtype=kv_real.dtype, device=device)], 1)
    else:
        real = torch.ones((block_ids.shape[0], len(cols)), dtype=torch.long, device=device)
    mask = torch.cat([real, torch.ones((block_ids.shape[0], hi - a), dtype=real.dtype, device=device)], 1)
    keep = torch.arange(0, hi - 1 - a, device=device)
    logits, _ = net.cached_forward(block_ids[:, a:hi], mask, pos[:, a:hi], keep, past=_dyn(past_kv))
    stats.positions_computed += block_ids.shape[0] * (hi - a)
    out = torch.zeros((block_ids.shape[0], B, logits.shape[-1]), dtype=logits.dtype, device=device)
    out[:, a + 1: hi] = logits  # slot i from query i - 1
    if a == 0:
        out[:, 0] = first.to(logits.dtype)
    return out


def _commit(net, kv: Optional[KV], kv_real, block_ids, pos, sel, stats):
    """Append the clean decided block of the rows ``sel`` to the cache; returns the new cache, its
    key mask, and each row's logits at the block's last position (the next block's first slot)."""
    B = block_ids.shape[1]
    keep = torch.tensor([B - 1], device=block_ids.device)
    if kv is None:
        mask, past, real = None, None, torch.ones_like(block_ids)
    else:
        kv = [(kk.index_select(0, sel), vv.index_select(0, sel)) for kk, vv in kv]
        real = torch.cat([kv_real.index_select(0, sel), torch.ones_like(block_ids)], dim=1)
        mask, past = real, _dyn(kv)
    logits, cache = net.cached_forward(block_ids, mask, pos, keep, past=past, use_cache=True)
    stats.forward_passes += 1
    stats.positions_computed += block_ids.shape[0] * B
    return [(kk, vv) for kk, vv, *_ in cache], real, logits[:, -1]


def _commit_and_next(net, kv: Optional[KV], kv_real, block_ids, pos, nxt, sel, stats):
    """:func:`_commit` and the first denoising pass of the next block in one forward pass: the clean
    block's queries see the cache and themselves, the next block's see the cache, the clean block
    and themselves; only the clean block's keys/values are kept. Returns the new cache, its key
    mask, the first-slot logits and the next block's slot-aligned logits."""

    B, device = block_ids.shape[1], block_ids.device
    rows = block_ids.shape[0]
    c = 0 if kv is None else kv[0][0].shape[2]
    if kv is not None:
        kv = [(kk.index_select(0, sel), vv.index_select(0, sel)) for kk, vv in kv]
        prev = kv_real.index_select(0, sel)
    else:
        prev = torch.zeros((rows, 0), dtype=torch.long, device=device)
    keys = torch.cat([prev, torch.ones((rows, 2 * B), dtype=prev.dtype, device=device)], 1).bool()
    allowed = keys[:, None, :].repeat(1, 2 * B, 1)
    allowed[:, :B, c + B:] = False  # the clean block does not see the next block
    dtype = net.mask_dtype()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    ids = torch.cat([block_ids, nxt], 1)
    positions = torch.cat([pos, pos + B], 1)
    keep = torch.arange(B - 1, 2 * B - 1, device=device)
    logits, cache = net.cached_forward(ids, mask[:, None], positions, keep, past=None if kv is None else _dyn(kv),
                                       use_cache=True)
    stats.forward_passes += 1
    stats.positions_computed += rows * 2 * B
    new_kv = [(kk[:, :, : c + B], vv[:, :, : c + B]) for kk, vv, *_ in cache]
    real = torch.cat([prev, torch.ones_like(block_ids)], 1)
    return new_kv, real, logits[:, 0], logits


def _uncached(net, rows: _Rows, active: List[int], starts: List[int], block_ids, B: int, stats):
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
    keep = torch.arange(width - B - 1, width - 1, device=device).clamp_min(0)
    logits, _ = net.cached_forward(ids, mask, positions, keep)
    stats.full_passes += 1
    stats.positions_computed += len(active) * width
    return logits
