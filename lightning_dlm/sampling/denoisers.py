"""What the sampler calls: a model that maps a canvas to logits, with optional approximate KV caches.

:class:`FunctionDenoiser` wraps any ``fn(ids, attention_mask) -> logits (B, W, V)`` (a stub in
tests, or a model without caching). :class:`ModelDenoiser` wraps a
:class:`~lightning_dlm.model.DiffusionModel` and runs its ``cached_forward`` with explicit
``position_ids`` (that skip padding), computing the LM head only at the positions the sampler
needs, and supports KV caching for block decoding.

KV caching (``cache="prefix"`` or ``"dual"``) is an **approximation** for a bidirectional model:
the keys/values of a token depend on every other token, including the masked slots that change
at every step, so reusing them is exact only right after they were computed. At a refresh the
sampler runs one full forward pass (its logits serve that step) and keeps the keys/values of the
columns left of the current block's window (``prefix``), and also of those right of it
(``dual``). Until the next refresh, a step runs the model on the window only: the block and
everything right of it (``prefix``), or the block alone (``dual``), attending to the stale cached
keys/values (a transformers ``DynamicCache``, :func:`copy_kv`). A cache refreshed at every step is the
uncached computation. The caches are tested on full-attention models (LLaMA, GPT-2); models
with sliding-window or recurrent layers should decode with ``cache="none"``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from transformers import Cache, DynamicCache

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.diffusion_model import position_ids_from_padding

CACHE_MODES = ("none", "prefix", "dual")

Keep = Union[Tuple[int, int], torch.Tensor]  # positions whose logits are wanted: (start, end) or indices


def keep_index(keep: Keep, device) -> torch.Tensor:
    if isinstance(keep, torch.Tensor):
        return keep.to(device)
    return torch.arange(keep[0], keep[1], device=device)


def positions_of(attention_mask: Optional[torch.Tensor], batch: int, width: int, device) -> torch.Tensor:
    """Position ids that skip (left or right) padding."""
    if attention_mask is None:
        return torch.arange(width, device=device).unsqueeze(0).expand(batch, width)
    return position_ids_from_padding(attention_mask)


def copy_kv(cache: Cache, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> DynamicCache:
    """A new ``DynamicCache`` holding the keys/values of ``cache`` at batch ``rows`` and sequence
    ``cols`` (all when None). A forward pass appends its own keys/values to the cache it is given,
    so a cache reused across passes is passed as a copy."""
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        if cols is not None:
            keys, values = keys.index_select(2, cols), values.index_select(2, cols)
        out.update(keys, values, i)
    return out


class FunctionDenoiser:
    """``fn(ids, attention_mask) -> logits (B, W, V)``; no caching."""

    supports_cache = False

    def __init__(self, fn: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]):
        self.fn = fn

    def logits(self, ids, attention_mask, keep: Keep) -> torch.Tensor:
        """Raw logits at positions ``keep`` ((start, end) or indices) of a full forward pass."""
        return self.fn(ids, attention_mask).index_select(1, keep_index(keep, ids.device))


class ModelDenoiser:
    """A :class:`~lightning_dlm.model.DiffusionModel` (any transformers causal LM run
    bidirectionally) with KV caching, through the model's own ``cached_forward``."""

    supports_cache = True

    def __init__(self, net):
        model = getattr(net, "model", None)
        if model is None or not hasattr(net, "cached_forward") or getattr(model.config, "is_causal", True):
            raise DLMError("this is not a diffusion model (no bidirectional backbone): load a lightning_dlm checkpoint")
        self.net = net
        self._kv: Optional[Cache] = None
        self._kv_cols: Optional[torch.Tensor] = None  # the canvas columns held in the cache
        self._kv_rows: Optional[torch.Tensor] = None  # the canvas rows held in the cache

    def _run(self, ids, attention_mask, position_ids, keep: torch.Tensor, past=None, use_cache=False):
        return self.net.cached_forward(ids, attention_mask, position_ids, keep, past=past, use_cache=use_cache)

    def logits(self, ids, attention_mask, keep: Keep) -> torch.Tensor:
        """Raw logits at positions ``keep`` ((start, end) or indices) of a full (uncached) forward pass."""
        positions = positions_of(attention_mask, ids.shape[0], ids.shape[1], ids.device)
        return self._run(ids, attention_mask, positions, keep_index(keep, ids.device))[0]

    # --- caching ----------------------------------------------------------------------------------
    def refresh(self, ids, attention_mask, keep: Keep, window: Tuple[int, int], mode: str,
                rows: torch.Tensor) -> torch.Tensor:
        """Full forward pass: returns the logits at ``keep`` and caches every column outside ``window``
        (``prefix``: only the columns left of it; ``dual``: left and right)."""
        positions = positions_of(attention_mask, ids.shape[0], ids.shape[1], ids.device)
        logits, cache = self._run(ids, attention_mask, positions, keep_index(keep, ids.device), use_cache=True)
        width = ids.shape[1]
        cols = torch.arange(0, window[0], device=ids.device)
        if mode == "dual":
            cols = torch.cat([cols, torch.arange(window[1], width, device=ids.device)])
        self._kv = copy_kv(cache, cols=cols)
        self._kv_cols, self._kv_rows = cols, rows
        return logits

    def cached(self, ids, attention_mask, keep: Keep, window: Tuple[int, int],
               rows: torch.Tensor) -> torch.Tensor:
        """Forward pass of the ``window`` columns only, attending to the cached keys/values.

        ``ids`` / ``attention_mask`` are the full canvas of the decoding ``rows`` (a subset of the
        rows cached at the last refresh); ``keep`` is in canvas columns.
        """
        if self._kv is None:
            raise RuntimeError("cached() before refresh()")
        pick = torch.searchsorted(self._kv_rows, rows)
        past = copy_kv(self._kv, rows=pick if pick.numel() != self._kv_rows.numel() else None)
        positions = positions_of(attention_mask, ids.shape[0], ids.shape[1], ids.device)
        a, b = window
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask.index_select(1, self._kv_cols), attention_mask[:, a:b]], dim=1)
        logits, _ = self._run(ids[:, a:b], mask, positions[:, a:b], keep_index(keep, ids.device) - a,
                              past=past, use_cache=True)
        return logits

    def clear(self) -> None:
        self._kv = self._kv_cols = self._kv_rows = None
