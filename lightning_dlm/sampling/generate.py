"""Text in, text out: decode prompts (and optional suffixes, for infilling) with an adapted model."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.schedules import get_schedule
from lightning_dlm.core.seeding import derive_seed
from lightning_dlm.model import DiffusionModel
from lightning_dlm.model.loading import start_and_pad_ids
from lightning_dlm.sampling.block_decode import block_decode
from lightning_dlm.sampling.canvas import build_canvas
from lightning_dlm.sampling.denoisers import ModelDenoiser
from lightning_dlm.sampling.engine import SamplerConfig, SamplingStats, decode


@dataclass
class Generation:
    texts: List[str]
    token_ids: List[List[int]]
    forward_passes: int
    stats: SamplingStats = field(default_factory=SamplingStats)
    stopped_at_eos: List[bool] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    ids: Optional[torch.Tensor] = None  # the final canvas (B, W)
    trajectory: Optional[List[torch.Tensor]] = None  # canvas after every step, if captured
    mask_id: int = -1
    target_span: Tuple[int, int] = (0, 0)  # the columns of the generated region in ``ids``

    def trajectory_texts(self, tokenizer, row: int = 0, mask_text: str = "_") -> List[str]:
        """The generated region of row ``row`` after every captured step, as text, with the slots
        still masked shown as ``mask_text``."""
        if self.trajectory is None:
            raise DLMError("no trajectory was captured: pass capture_trajectory=True")
        a, b = self.target_span
        return [_show(state[row, a:b].tolist(), tokenizer, self.mask_id, mask_text) for state in self.trajectory]


def _show(row: List[int], tokenizer, mask_id: int, mask_text: str) -> str:
    parts, run = [], []
    for tok in row:
        if tok == mask_id:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(mask_text)
        else:
            run.append(tok)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)


def suppressed_ids(net, tokenizer) -> List[int]:
    """Ids never sampled: the mask token (added or reused: once committed, the model would read it
    as a mask) and embedding rows beyond the tokenizer."""
    ids = [net.mask_token_id]
    if tokenizer is not None and len(tokenizer) < net.vocab_size:
        ids += list(range(len(tokenizer), net.vocab_size))
    return sorted(set(ids))


def row_seeds(seed: int, prefixes: Sequence[Sequence[int]], suffixes: Optional[Sequence[Sequence[int]]] = None) -> List[int]:
    """One seed per row from (seed, the row's own prompt and suffix tokens, its repeat number).

    A row's seed does not depend on its position in the batch nor on the other prompts, so a
    prompt decodes the same in any batch as alone; the k-th repeat of the same prompt gets the
    k-th seed, so repeats give different samples.
    """
    suffixes = suffixes if suffixes is not None else [[] for _ in prefixes]
    seen: Counter = Counter()
    out = []
    for prefix, suffix in zip(prefixes, suffixes):
        key = hashlib.blake2b(repr((list(prefix), list(suffix))).encode(), digest_size=8).digest()
        content = int.from_bytes(key, "little") & ((1 << 63) - 1)
        out.append(derive_seed(seed, content, seen[content]))
        seen[content] += 1
    return out


def unwrap_trainer(model):
    """The :class:`DiffusionModel` a DiffusionLM trains (built on first use), or ``model`` as it is."""
    if not isinstance(model, DiffusionModel) and hasattr(model, "diffusion_cfg") and hasattr(model, "configure_model"):
        model.configure_model()  # a DiffusionLM builds its model lazily
        return model.net
    return model


def resolve_model(model, tokenizer=None, schedule=None, shift=None) -> Tuple[DiffusionModel, object, object, bool]:
    """(model, tokenizer, schedule, shift) of a :class:`DiffusionModel` (its own tokenizer and
    diffusion config, unless given here) or of a DiffusionLM (the model it trains)."""
    if tokenizer is None and not isinstance(model, DiffusionModel) and hasattr(model, "diffusion_cfg"):
        tokenizer = model.tokenizer
    model = unwrap_trainer(model)
    if not isinstance(model, DiffusionModel):
        raise DLMError(
            f"a {type(model).__name__} is not a diffusion model: load one with DiffusionModel.from_pretrained(path)"
        )
    if model.objective != "diffusion":
        raise DLMError(f"this model was trained with the {model.objective} objective, not diffusion: it is a causal LM; "
                       f"evaluate it with `dlm eval` (it loads as one)")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    schedule = get_schedule(schedule if schedule is not None else model.schedule)
    return model, tokenizer, schedule, model.shift if shift is None else bool(shift)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[str],
    length: Optional[int] = None,
    suffixes: Optional[Sequence[str]] = None,
    steps: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    strategy: Optional[str] = None,
    block_size: Optional[int] = None,
    cache: Optional[str] = None,
    refresh_every: Optional[int] = None,
    max_length: Optional[int] = None,
    capture_trajectory: bool = False,
    seeds: Optional[Sequence[int]] = None,
    tokenizer=None,
    schedule=None,
    shift: Optional[bool] = None,
    cfg_scale: Optional[float] = None,
    **strategy_options,
) -> Generation:
    """Decode ``length`` tokens after each prompt (and before each suffix, for infilling).

    ``model`` is a :class:`~lightning_dlm.model.DiffusionModel` (its tokenizer, schedule and
    shift are used unless given here), e.g. ``DiffusionModel.from_pretrained(path)``, or the
    DiffusionLM that trains one.
    Give ``length`` for exactly that many tokens, or ``max_length`` to stop each row at its EOS
    (at most that many tokens). ``strategy`` names a registered strategy; its options
    (``confidence``, ``threshold``, ``rank_noise``) are keyword arguments. Every row draws its
    randomness from its own seed (:func:`row_seeds`, or ``seeds``), so a prompt gives the same
    text in a batch as alone. See :class:`SamplerConfig` for the other options.
    """
    net, tokenizer, schedule, shift = resolve_model(model, tokenizer, schedule, shift)
    if tokenizer is None:
        raise DLMError("this model has no tokenizer: set backbone.tokenizer, or load a lightning_dlm checkpoint")
    if net.diffusion.is_block:  # block diffusion: block by block with an exact KV cache (sampling.block_decode)
        if cfg_scale:
            raise DLMError("cfg_scale is not available for block diffusion models (their decoder has no guidance): drop it")

        return generate_blocks(net, tokenizer, prompts, length=length, max_length=max_length, suffixes=suffixes,
                               steps=steps, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               strategy=strategy, block_size=block_size, cache=cache, refresh_every=refresh_every,
                               capture_trajectory=capture_trajectory, seeds=seeds, schedule=schedule, shift=shift,
                               **strategy_options)
    if length is not None and max_length is not None:
        raise DLMError("give either length (exactly that many tokens) or max_length (stop at EOS), not both")
    stop_at_eos = max_length is not None
    length = max_length if stop_at_eos else (64 if length is None else length)
    prompts = list(prompts)
    if not prompts:
        raise DLMError("no prompts given: give at least one prompt (it may be empty)")
    if suffixes is not None and len(suffixes) != len(prompts):
        raise DLMError(f"got {len(prompts)} prompts but {len(suffixes)} suffixes: give one suffix per prompt")
    config = SamplerConfig(steps=steps, temperature=temperature, top_k=top_k, top_p=top_p, strategy=strategy,
                           strategy_options=strategy_options, block_size=block_size, cache=cache,
                           refresh_every=refresh_every, stop_at_eos=stop_at_eos,
                           capture_trajectory=capture_trajectory, cfg_scale=cfg_scale)
    config.check()
    device = next(net.parameters()).device
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefixes = [encode(p) for p in prompts]
    suffix_ids = [encode(s) for s in suffixes] if suffixes is not None else None
    start, pad = start_and_pad_ids(tokenizer)
    canvas = build_canvas(prefixes, length, net.mask_token_id, pad, start, suffix_ids, net.max_positions, device,
                          align_targets=True)
    if seeds is None:
        seeds = row_seeds(seed, prefixes, suffix_ids)
    elif len(seeds) != len(prompts):
        raise DLMError(f"got {len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    was_training = net.training
    net.eval()
    try:
        out = decode(ModelDenoiser(net), canvas, config, schedule=schedule, seeds=seeds, shift=shift,
                     eos_id=tokenizer.eos_token_id, pad_id=pad, suppress_ids=suppressed_ids(net, tokenizer),
                     mask_id=net.mask_token_id)
    finally:
        net.train(was_training)
    texts = [tokenizer.decode(row) for row in out.tokens]
    return Generation(texts=texts, token_ids=out.tokens, forward_passes=out.stats.forward_passes, stats=out.stats,
                      stopped_at_eos=out.stopped_at_eos, seeds=list(seeds), ids=out.ids, trajectory=out.trajectory,
                      mask_id=net.mask_token_id, target_span=out.target_span)


def generate_blocks(net, tokenizer, prompts: Sequence[str], *, length: Optional[int], max_length: Optional[int],
                    suffixes=None, steps: Optional[int] = None, temperature: Optional[float] = None,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                    strategy=None, block_size: Optional[int] = None, cache: Optional[str] = None,
                    refresh_every: Optional[int] = None, capture_trajectory: bool = False, seeds=None,
                    schedule=None, shift: bool = True, **strategy_options):
    """:func:`~lightning_dlm.sampling.generate` for a block model (it dispatches here).

    ``steps``: denoising steps per block at most (default the block size: one slot per step at
    least); ``strategy`` defaults to ``threshold`` (parallel decoding). Options beyond the
    strategy's: ``kv_cache`` (default True: the exact cache; False = the uncached reference),
    ``sub_block`` and ``sub_block_cache`` (Fast-dLLM v2), ``graphs`` (the passes over a static KV
    cache, compiled: CUDA graphs on a GPU; the same tokens), ``first_slot`` (``strategy``, or ``greedy``:
    Fast-dLLM v2's argmax first slot of every block). Approximate caches (``prefix`` /
    ``dual``) and suffixes (infilling) are refused: blocks are causal.
    """
    if cache not in (None, "none"):
        raise DLMError(f"cache='{cache}' is an approximate cache for bidirectional models; a block model caches its "
                       f"committed blocks exactly by itself: leave cache out (or set it to none)")
    if refresh_every is not None:
        raise DLMError("refresh_every applies to approximate caches: a block model's cache is exact, leave it out")
    if suffixes is not None and any(suffixes):
        raise DLMError("a block model decodes left to right (causal across blocks) and cannot infill: give no suffixes")
    if length is not None and max_length is not None:
        raise DLMError("give either length (exactly that many tokens) or max_length (stop at EOS), not both")
    kv_cache = bool(strategy_options.pop("kv_cache", True))
    sub_block = strategy_options.pop("sub_block", None)
    sub_block_cache = bool(strategy_options.pop("sub_block_cache", False))
    graphs = strategy_options.pop("graphs", False)
    first_slot = strategy_options.pop("first_slot", "strategy")
    stop_at_eos = max_length is not None
    length = max_length if stop_at_eos else (64 if length is None else length)
    size = int(block_size if block_size is not None else net.diffusion.block_size)
    if size < 1:
        raise DLMError(f"block_size must be >= 1, got {size}")
    prompts = list(prompts)
    if not prompts:
        raise DLMError("no prompts given: give at least one prompt (it may be empty)")
    per_block = size if steps is None else max(1, min(size, math.ceil(steps * size / max(length, 1))))
    config = SamplerConfig(steps=per_block, temperature=temperature, top_k=top_k, top_p=top_p,
                           strategy=strategy if strategy is not None else "threshold",
                           strategy_options=strategy_options, stop_at_eos=stop_at_eos,
                           capture_trajectory=capture_trajectory)
    start, pad = start_and_pad_ids(tokenizer)
    prefixes = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefixes = [x if x else ([start] if start is not None else []) for x in prefixes]
    limit = net.max_positions
    longest = max(len(x) for x in prefixes) + length + size
    if limit is not None and longest > limit:
        raise DLMError(f"prompt + length (+ one block) is {longest} tokens, above the model's limit of {limit}: "
                       f"shorten the prompt or the length")
    if seeds is None:
        seeds = row_seeds(seed, prefixes)
    elif len(seeds) != len(prompts):
        raise DLMError(f"got {len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    was_training = net.training
    net.eval()
    try:
        out = block_decode(net, prefixes, length, config, block_size=size, schedule=schedule, seeds=seeds,
                           shift=shift, eos_id=tokenizer.eos_token_id, pad_id=pad,
                           suppress_ids=suppressed_ids(net, tokenizer),
                           kv_cache=kv_cache, sub_block=sub_block, sub_block_cache=sub_block_cache, graphs=graphs,
                           first_slot=first_slot)
    finally:
        net.train(was_training)
    return Generation(texts=[tokenizer.decode(row) for row in out.tokens], token_ids=out.tokens,
                      forward_passes=out.stats.forward_passes, stats=out.stats, stopped_at_eos=out.stopped_at_eos,
                      seeds=list(seeds), ids=out.ids, trajectory=out.trajectory, mask_id=net.mask_token_id,
                      target_span=out.target_span)
