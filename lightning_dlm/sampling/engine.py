"""The sampler: one loop for every strategy and every model, with blocks, KV caches, EOS stopping
and statistics.

:class:`DecodeRun` holds what every decode shares (the checked options, one generator per row,
the statistics, the trajectory, the clock, the EOS bookkeeping) and :meth:`DecodeRun.denoise`,
the loop of denoising steps over one span: :func:`decode` runs it on each block of a canvas here,
:func:`~lightning_dlm.sampling.block_decode.block_decode` on each (sub-)block of a block model.

:func:`decode` takes a denoiser, an aligned canvas (every row's target region in the same
columns: ``build_canvas(..., align_targets=True)``), a :class:`SamplerConfig` and one seed per
row, and returns a :class:`Decoded`. The target region is decoded left to right in blocks of
``block_size`` slots (one block = the whole region when ``block_size`` is None); the ``steps``
denoising steps are split evenly over the blocks, and inside a block the strategy decides at
each step which slots to commit. A block whose slots are all decided ends early (no more forward
passes for it). The shift is handled here and only here: the strategy sees logits already
aligned to slots (:func:`~lightning_dlm.sampling.canvas.slot_logit_positions`).

Rows are independent: every random draw comes from the row's own generator, made from its seed,
and only when that row still has slots to decode; the model sees each row with its own padding
and positions. So a prompt decodes the same in a batch as alone (uncached decoding exactly, up
to the floating-point effects of padding; cached decoding too as long as the cache refreshes
fall on the same steps, which holds for every strategy but ``random``, whose forward passes
depend on whether *any* row commits).
"""

from __future__ import annotations

import functools
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.schedules import NoiseSchedule
from lightning_dlm.sampling.canvas import Canvas, slot_logit_positions
from lightning_dlm.sampling.denoisers import CACHE_MODES, FunctionDenoiser
from lightning_dlm.sampling.filtering import check_sampling_args
from lightning_dlm.sampling.guidance import GuidedDenoiser, check_cfg_scale
from lightning_dlm.sampling.strategies import StepContext, Strategy, get_strategy


@dataclass
class SamplerConfig:
    """Every option of :func:`decode` except the model and the prompts.

    Args:
        steps: denoising steps T (split over the blocks; at least one per block).
        temperature: 0 = argmax, else tokens are sampled at this temperature.
        top_k: keep the k most likely tokens when sampling (0 = off).
        top_p: nucleus mass in (0, 1].
        strategy: a registered strategy name (``random``, ``confidence``, ``threshold``) or a
            :class:`Strategy` instance.
        strategy_options: options of a strategy given by name (e.g. ``{"threshold": 0.9}``).
        block_size: decode left to right in blocks of this many slots (None = one block).
        cache: ``none``, ``prefix`` or ``dual`` approximate KV caching (needs a model denoiser).
        refresh_every: with a cache, also refresh it every this many steps inside a block
            (None = once per block; 1 = every step, which is the uncached computation).
        stop_at_eos: a row stops once it has committed an EOS and every slot left of it is
            decided; the slots right of the EOS are set to the pad token.
        capture_trajectory: keep the canvas after every step (on the CPU).
        cfg_scale: classifier-free guidance weight w >= 0 (0 = none): logits ``u + (1 + w)(c - u)`` where the
            unconditional pass ``u`` sees the prompt masked (:mod:`lightning_dlm.sampling.guidance`).

    These are the sampler's defaults, written here and nowhere else: ``generate()``, ``dlm
    sample`` and the evaluation tasks take theirs from this class. ``None`` for an option whose
    default is not None means "the default", so a caller passes its options through as they are.
    """

    steps: int = 64
    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 0.9
    strategy: Union[str, Strategy] = "random"
    strategy_options: Dict[str, Any] = field(default_factory=dict)
    block_size: Optional[int] = None
    cache: str = "none"
    refresh_every: Optional[int] = None
    stop_at_eos: bool = False
    capture_trajectory: bool = False
    cfg_scale: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) is None and f.default is not None:
                setattr(self, f.name, f.default_factory() if f.default is MISSING else f.default)

    def check(self) -> Strategy:
        """Validate the options; returns the strategy object."""
        if self.steps < 1:
            raise DLMError(f"the number of steps T must be >= 1, got {self.steps}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.block_size is not None and self.block_size < 1:
            raise DLMError(f"block_size must be >= 1 (or None for one block), got {self.block_size}")
        if self.cache not in CACHE_MODES:
            raise DLMError(f"unknown cache mode '{self.cache}': choose one of {list(CACHE_MODES)}")
        if self.refresh_every is not None and self.refresh_every < 1:
            raise DLMError(f"refresh_every must be >= 1 (or None for once per block), got {self.refresh_every}")
        check_cfg_scale(self.cfg_scale)
        if self.cfg_scale > 0 and self.cache != "none":
            raise DLMError("cfg_scale needs cache='none' (the unconditional pass has no KV cache): drop --cache")
        return get_strategy(self.strategy, **dict(self.strategy_options or {}))


@dataclass
class SamplingStats:
    """What a decode cost. ``committed_per_step[i][b]``: slots row b committed at step i."""

    steps: int = 0  # steps run (a block ends early once decided)
    forward_passes: int = 0  # model calls (full or cached)
    full_passes: int = 0  # of which over the whole canvas (uncached, or cache refreshes)
    positions_computed: int = 0  # sum over model calls of rows x query positions
    committed_per_step: List[List[int]] = field(default_factory=list)
    tokens: int = 0  # generated tokens kept in the output (up to each row's EOS)
    wall_time_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_time_s if self.wall_time_s > 0 else float("inf")

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forward_passes if self.forward_passes else float("inf")

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        out["tokens_per_forward"] = self.tokens_per_forward
        return out


@dataclass
class Decoded:
    ids: torch.Tensor  # (B, W) the final canvas (pad right of a row's EOS when stop_at_eos)
    tokens: List[List[int]]  # each row's generated tokens (cut before its first EOS when stop_at_eos)
    stopped_at_eos: List[bool]
    stats: SamplingStats
    trajectory: Optional[List[torch.Tensor]] = None  # canvas after every step (CPU), if captured
    target_span: Tuple[int, int] = (0, 0)  # the columns of the generated region in ``ids`` (and the trajectory)


def _as_denoiser(denoiser):
    if hasattr(denoiser, "logits"):
        return denoiser
    if callable(denoiser):
        return FunctionDenoiser(denoiser)
    raise DLMError(f"cannot decode with a {type(denoiser).__name__}: give a denoiser or fn(ids, attention_mask)")


def _blocks(start: int, end: int, block_size: Optional[int], steps: int):
    size = end - start if block_size is None else block_size
    bounds = [(a, min(a + size, end)) for a in range(start, end, size)]
    if steps < len(bounds):
        raise DLMError(
            f"{steps} steps cannot decode {len(bounds)} blocks (length {end - start}, block_size {block_size}): "
            f"give at least one step per block"
        )
    base, extra = divmod(steps, len(bounds))
    return [(a, b, base + (1 if j < extra else 0)) for j, (a, b) in enumerate(bounds)]


def eos_done(row_ids: torch.Tensor, row_masked: torch.Tensor, eos_id: int) -> Optional[int]:
    """Index of the row's first committed EOS if every slot left of it is decided, else None."""
    hits = ((row_ids == eos_id) & ~row_masked).nonzero().flatten()
    if hits.numel() == 0:
        return None
    first = int(hits[0])
    return None if bool(row_masked[:first].any()) else first


class _BlockForward:
    """The model call of one block: full passes, or cache refreshes and cached window passes.

    Returns slot-aligned float logits (rows, columns, V) of the block with the suppressed ids at
    -inf (:meth:`DecodeRun.clean`): every column, or the block-relative ``cols`` only.
    """

    def __init__(self, denoiser, run: "DecodeRun", a: int, b: int, width: int, shift: bool, ids: torch.Tensor,
                 attention: Optional[torch.Tensor]):
        self.denoiser, self.config, self.stats, self.clean = denoiser, run.config, run.stats, run.clean
        self.width, self.ids, self.attention = width, ids, attention
        self.keep = slot_logit_positions(a, b, shift)  # the shift, in one place
        self.window = (self.keep[0], width) if self.config.cache == "prefix" else (self.keep[0], max(b, self.keep[1]))
        self.last_refresh: Optional[int] = None
        if hasattr(denoiser, "clear"):
            denoiser.clear()

    def _refresh_due(self, step: int) -> bool:
        every = self.config.refresh_every
        return self.last_refresh is None or (every is not None and step - self.last_refresh >= every)

    def __call__(self, rows: torch.Tensor, step: int, cols: Optional[torch.Tensor] = None):
        keep = self.keep if cols is None else self.keep[0] + cols
        sub_ids = self.ids.index_select(0, rows)
        sub_attn = self.attention.index_select(0, rows) if self.attention is not None else None
        stats, n = self.stats, len(rows)
        stats.forward_passes += 1
        if self.config.cache == "none":
            raw = self.denoiser.logits(sub_ids, sub_attn, keep)
            stats.full_passes += 1
            stats.positions_computed += n * self.width
        elif self._refresh_due(step):
            raw = self.denoiser.refresh(sub_ids, sub_attn, keep, self.window, self.config.cache, rows)
            self.last_refresh = step
            stats.full_passes += 1
            stats.positions_computed += n * self.width
        else:
            raw = self.denoiser.cached(sub_ids, sub_attn, keep, self.window, rows)
            stats.positions_computed += n * (self.window[1] - self.window[0])
        return self.clean(raw)

    def block(self, step: int, eligible: torch.Tensor) -> torch.Tensor:
        """(B, block length, V) for the rows with ``eligible`` slots; the other rows are zeros."""
        rows = eligible.any(1).nonzero().flatten()
        raw = self(rows, step)
        if len(rows) == eligible.shape[0]:
            return raw
        full = raw.new_zeros((eligible.shape[0], raw.shape[1], raw.shape[-1]))
        full[rows] = raw
        return full

    def at(self, step: int, eligible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, V) at the slots of ``mask`` (B, block length), in ``mask.nonzero()`` order; the LM
        head runs only at the columns some row needs."""
        rows = eligible.any(1).nonzero().flatten()
        cols = mask.any(0).nonzero().flatten()
        raw = self(rows, step, cols)
        where = mask.nonzero()
        return raw[torch.searchsorted(rows, where[:, 0]), torch.searchsorted(cols, where[:, 1])]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecodeRun:
    """One decode's shared state and its step loop (see the module docstring). The two decoders
    differ only in how a span's logits are computed (``logits_fn``) and what happens after a
    commit (``on_commit``): the loop, the strategy call and the bookkeeping are these."""

    def __init__(self, config: SamplerConfig, schedule: NoiseSchedule, seeds: Sequence[int], batch: int, device,
                 eos_id: Optional[int], suppress_ids: Sequence[int] = ()):
        self.strategy = config.check()
        if config.stop_at_eos and eos_id is None:
            raise DLMError("stop_at_eos needs an EOS token: the tokenizer has none")
        if len(seeds) != batch:
            raise DLMError(f"got {len(seeds)} seeds for {batch} rows: give one seed per row")
        self.config, self.schedule, self.batch, self.device = config, schedule, batch, device
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.stats = SamplingStats()
        self.trajectory: Optional[List[torch.Tensor]] = [] if config.capture_trajectory else None
        self.eos_at: List[Optional[int]] = [None] * batch  # each row's first EOS, in target slots
        self.stopped = [False] * batch
        self.suppress = sorted(set(int(i) for i in suppress_ids))
        _sync(device)
        self.start_time = time.perf_counter()

    def clean(self, raw: torch.Tensor) -> torch.Tensor:
        """Logits as a strategy sees them: float, the suppressed ids at -inf."""
        raw = raw.float()
        if self.suppress:
            raw[..., self.suppress] = float("-inf")
        return raw

    def denoise(self, tokens: torch.Tensor, open_: torch.Tensor, allowed: torch.Tensor, steps: int,
                logits_fn: Callable, logits_at_fn: Optional[Callable] = None, *, rows: Optional[Sequence[int]] = None,
                on_commit: Optional[Callable] = None, snapshot: Optional[Callable] = None) -> None:
        """Up to ``steps`` denoising steps over one span (a block, or a sub-block of it).

        ``tokens`` / ``open_`` (rows, L): the span's ids and its undecided slots, updated in place;
        ``allowed`` (broadcast to them): the slots this call decides. At each step the strategy
        sees the eligible slots (``open_ & allowed``) and lazy logits: ``logits_fn(step, eligible)``
        -> slot-aligned (rows, L, V), ``logits_at_fn(step, eligible, mask)`` -> (N, V) at ``mask``.
        ``rows``: each span row's batch row (its generator and statistics; default 0..rows-1);
        ``on_commit(commit)`` runs after a step's commit, ``snapshot()`` gives the canvas captured
        after every step. Stops early once the span is decided.
        """
        rows = list(range(tokens.shape[0])) if rows is None else list(rows)
        generators = [self.generators[r] for r in rows]
        config, stats = self.config, self.stats
        for step in range(steps):
            eligible = open_ & allowed
            if not eligible.any():
                break  # decided: no more steps (nor forward passes) for this span
            at = None if logits_at_fn is None else functools.partial(logits_at_fn, step, eligible)
            ctx = StepContext(eligible=eligible, step=step, steps=steps, schedule=self.schedule, generators=generators,
                              temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                              _logits_fn=functools.partial(logits_fn, step, eligible), _logits_at_fn=at)
            result = self.strategy.step(ctx)
            stats.steps += 1
            committed = [0] * self.batch
            if result is not None:
                commit = result[0] & eligible
                tokens[commit] = result[1][commit]
                open_ &= ~commit
                for r, c in zip(rows, commit.sum(1).tolist()):
                    committed[r] = c
                if on_commit is not None:
                    on_commit(commit)
            stats.committed_per_step.append(committed)
            if self.trajectory is not None:
                self.trajectory.append(snapshot())
        if (open_ & allowed).any():
            raise RuntimeError(f"strategy '{self.strategy.name}' left slots undecided at the end of a block")

    def finish(self, ids: torch.Tensor, span: Tuple[int, int]) -> Decoded:
        """The :class:`Decoded` of the final canvas ``ids`` whose target region is the columns ``span``."""
        _sync(self.device)
        self.stats.wall_time_s = time.perf_counter() - self.start_time
        a, b = span
        out = [row[:eos] if eos is not None else row for row, eos in zip(ids[:, a:b].tolist(), self.eos_at)]
        self.stats.tokens = sum(len(r) for r in out)
        return Decoded(ids=ids, tokens=out, stopped_at_eos=self.stopped, stats=self.stats, trajectory=self.trajectory,
                       target_span=span)


@torch.no_grad()
def decode(
    denoiser,
    canvas: Canvas,
    config: SamplerConfig,
    *,
    schedule: NoiseSchedule,
    seeds: Sequence[int],
    shift: bool = True,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    suppress_ids: Sequence[int] = (),
    mask_id: Optional[int] = None,
) -> Decoded:
    """Decode the masked target region of ``canvas`` (see the module docstring); ``mask_id`` is
    needed for classifier-free guidance (``config.cfg_scale > 0``)."""
    batch, width = canvas.ids.shape
    device = canvas.ids.device
    run = DecodeRun(config, schedule, seeds, batch, device, eos_id, suppress_ids)
    denoiser = _as_denoiser(denoiser)
    if config.cache != "none" and not getattr(denoiser, "supports_cache", False):
        raise DLMError(f"cache='{config.cache}' needs a model denoiser (ModelDenoiser), not {type(denoiser).__name__}")
    t0, t1 = canvas.target_span()
    if config.cfg_scale > 0:  # scale 0 leaves the denoiser as it is: unguided decoding, exactly
        if mask_id is None:
            raise DLMError("cfg_scale > 0 needs the mask token id: pass mask_id to decode()")
        denoiser = GuidedDenoiser(denoiser, config.cfg_scale, mask_id, t0, t1)
    ids, masked = canvas.ids.clone(), canvas.masked.clone()
    active = torch.ones(batch, dtype=torch.bool, device=device)

    def on_commit(commit: torch.Tensor) -> None:  # stop rows at EOS, retire the rows that are done
        for r in commit.any(1).nonzero().flatten().tolist():
            if config.stop_at_eos:
                hit = eos_done(ids[r, t0:t1], masked[r, t0:t1], eos_id)
                if hit is not None:
                    run.eos_at[r], run.stopped[r] = hit, True
                    ids[r, t0 + hit + 1:t1] = pad_id
                    masked[r, t0:t1] = False
            if not bool(masked[r, t0:t1].any()):
                active[r] = False

    for a, b, block_steps in _blocks(t0, t1, config.block_size, config.steps):
        forward = _BlockForward(denoiser, run, a, b, width, shift, ids, canvas.attention_mask)
        run.denoise(ids[:, a:b], masked[:, a:b], active.unsqueeze(1), block_steps, forward.block, forward.at,
                    on_commit=on_commit, snapshot=lambda: ids.cpu().clone())
        if not active.any():
            break
    if hasattr(denoiser, "clear"):
        denoiser.clear()
    return run.finish(ids, (t0, t1))


def sampler_defaults() -> Dict[str, Any]:
    """``{option: default}`` of :class:`SamplerConfig`, the one place the sampler's defaults live
    (for signatures and help texts that show them)."""
    config = SamplerConfig()
    return {f.name: getattr(config, f.name) for f in fields(SamplerConfig)}
