"""The block decoder's fixed-shape passes over a static KV cache, compiled (CUDA graphs on a GPU).

:func:`~lightning_dlm.sampling.block_decode.block_decode` with ``graphs=True`` runs its passes
here. Every denoising pass has one shape, one block of B slots against the cache of committed
blocks, and every commit pass another, the clean block and the next one (2B), so with the keys and
values in a transformers ``StaticCache`` allocated once for the whole canvas (W columns: the
prompt blocks and every block to decode) neither pass changes shape from block to block:

* the pass writes its block's keys/values at the cache's current end and attends all W columns
  under a (rows, 1, Q, W) additive mask: committed real keys and its own block (and, for the
  commit pass, the clean block for the next block's queries); columns not written yet are masked;
* after a denoising pass the cache is cropped back by B (:func:`~lightning_dlm.model.hf_compat.drop_last`:
  only its length counters move, the tensors keep their addresses), so the undecided block is overwritten by the
  next pass; after a commit pass it is cropped by B too, keeping the clean block.

The two passes are compiled with ``torch.compile`` (``mode="reduce-overhead"`` on CUDA: the
compiled graph is captured and replayed as a CUDA graph, so a pass costs one launch instead of
hundreds; on the CPU the plain inductor compile, which must give the eager tokens). The prefill,
run once, stays eager. The cache is allocated for a fixed batch, so rows cannot drop out:
:func:`check_static_shapes` refuses, in one line, a decode whose batch would shrink.

This mirrors what transformers' own ``generate(cache_implementation="static")`` does for causal
LMs (a ``StaticCache``, a compiled forward), and dInfer's CUDA-graph decoding of diffusion LMs.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Tuple

import torch
from transformers import StaticCache

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.hf_compat import cache_keyword, drop_last
from lightning_dlm.sampling.canvas import slot_logit_positions


def check_static_shapes(first_blocks: Sequence[int], last_blocks: Sequence[int], *, stop_at_eos: bool,
                        kv_cache: bool, sub_block: Optional[int], sub_block_cache: bool) -> None:
    """Refuse, in one line, what would give the graph-captured passes a dynamic shape."""
    if not kv_cache:
        raise DLMError("graphs=True runs the passes over the static KV cache: drop kv_cache=False")
    if sub_block is not None or sub_block_cache:
        raise DLMError("graphs=True captures the full-block passes (a fixed shape); sub-blocks change the shape "
                       "from step to step: drop sub_block / sub_block_cache, or graphs=False")
    counts = sorted({e - f + 1 for f, e in zip(first_blocks, last_blocks)})
    if len(counts) > 1:
        raise DLMError(f"graphs=True needs a fixed batch, but these rows decode {counts[0]} to {counts[-1]} blocks "
                       f"(their prompts end at different offsets in a block), so rows would drop out: decode them "
                       f"one at a time, or graphs=False")
    if stop_at_eos and len(first_blocks) > 1:
        raise DLMError("graphs=True needs a fixed batch, but max_length (stop at EOS) drops finished rows: give "
                       "length instead, decode one prompt at a time, or graphs=False")


def compile_pass(fn, device: torch.device, backend: str = "inductor"):
    """``fn`` compiled by ``backend``: with inductor on CUDA captured as a CUDA graph
    (``reduce-overhead``); ``eager`` traces it (dynamo) without generating kernels (a quick check)."""
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(fn, mode=mode, dynamic=False, backend=backend)


class StaticBlockPasses:
    """The prefill, denoising and commit passes of one block decode, over one ``StaticCache``.

    Args:
        net: the :class:`~lightning_dlm.model.DiffusionModel` (a block model).
        rows: the batch (fixed for the whole decode).
        width: the cache's columns, W: the prompt blocks and every block decoded.
        block_size: B.
        backend: the ``torch.compile`` backend of the two fixed-shape passes (:func:`compile_pass`),
            or None to run the same computation eagerly (the reference the compiled one equals).
        shift: whether slot i reads query i - 1 (the denoising pass then keeps queries 0..B-2, the
            commit pass B-1..2B-2) or query i (0..B-1 and B..2B-1).
    """

    def __init__(self, net, rows: int, width: int, block_size: int, backend: Optional[str] = "inductor",
                 shift: bool = True):
        self.net, self.B, self.width = net, block_size, width
        self.device = next(net.parameters()).device
        self.cache = StaticCache(config=net.model.config, max_cache_len=width)
        self.real = torch.zeros((rows, width), dtype=torch.bool, device=self.device)  # committed real keys
        self.end = 0  # committed columns (the cache's length between passes)
        self.dtype = net.mask_dtype()
        self.takes_keep = "logits_to_keep" in inspect.signature(net.model.forward).parameters
        self.cache_keyword = cache_keyword(net.model)  # cache= or past_key_values= (transformers 5.17)
        first = int(bool(shift))  # with the shift, slot 0 reads the position before the block
        self.denoise_keep = torch.arange(*slot_logit_positions(first, block_size, shift), device=self.device)
        self.commit_keep = torch.arange(*slot_logit_positions(block_size, 2 * block_size, shift), device=self.device)
        compiled = backend is not None
        self._denoise = compile_pass(self._forward, self.device, backend) if compiled else self._forward
        self._commit = compile_pass(self._forward, self.device, backend) if compiled else self._forward

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        kwargs = dict(logits_to_keep=keep) if self.takes_keep else {}
        kwargs[self.cache_keyword] = self.cache
        out = self.net.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits if self.takes_keep else out.logits.index_select(1, keep)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """(rows, 1, Q, W) additive mask of a boolean (rows, Q, W) pattern."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def prefill(self, ids: torch.Tensor, real: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The prompt blocks (rows, P), block-causal, eager: cached at columns [0, P); the logits of
        the last position (rows, V)."""
        width = ids.shape[1]
        blocks = positions // self.B
        allowed = torch.zeros((ids.shape[0], width, self.width), dtype=torch.bool, device=self.device)
        allowed[:, :, :width] = (blocks[:, None, :] <= blocks[:, :, None]) & real.bool()[:, None, :]
        keep = torch.tensor([width - 1], device=self.device)
        logits = self._forward(ids, self._mask(allowed), positions, keep)
        self.real[:, :width] = real.bool()
        self.end = width
        return logits[:, -1]

    def denoise(self, block_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One denoising pass of the current block (rows, B): logits of its queries 0..B-2 with the
        shift (rows, B-1, V), 0..B-1 without; the block's keys/values are dropped again."""
        rows, B = block_ids.shape
        allowed = self.real[:, None, :].expand(rows, B, self.width).clone()
        allowed[:, :, self.end: self.end + B] = True
        logits = self._denoise(block_ids, self._mask(allowed), positions, self.denoise_keep).clone()
        drop_last(self.cache, B)
        return logits

    def commit_and_next(self, clean: torch.Tensor, positions: torch.Tensor,
                        nxt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Commit the clean block and run the next block's first denoising pass in one (2B) pass.
        Returns the next block's first-slot logits (rows, V; without the shift, unused) and its
        slot-aligned logits (rows, B, V)."""
        rows, B = clean.shape
        c = self.end
        allowed = self.real[:, None, :].expand(rows, 2 * B, self.width).clone()
        allowed[:, :, c: c + B] = True  # the clean block: seen by both
        allowed[:, B:, c + B: c + 2 * B] = True  # the next block: by its own queries only
        ids = torch.cat([clean, nxt], 1)
        logits = self._commit(ids, self._mask(allowed), torch.cat([positions, positions + B], 1),
                              self.commit_keep).clone()
        drop_last(self.cache, B)  # keep the clean block, drop the undecided next one
        self.real[:, c: c + B] = True
        self.end = c + B
        return logits[:, 0], logits
