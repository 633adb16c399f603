"""Samplers for adapted diffusion LMs (plain torch; no Lightning).

* :func:`generate` — text in, text out, for a :class:`~lightning_dlm.model.DiffusionModel`.
* :func:`decode` + :class:`SamplerConfig` — the sampler on token ids, for any denoiser.
* :func:`block_decode` — block-by-block decoding of a block diffusion model (exact KV cache);
  :func:`generate` dispatches to it for ``diffusion.attention: block``.
* :data:`STRATEGIES` — the registered strategies (``random``, ``confidence``, ``threshold``);
  :func:`register` adds one.
* :class:`ModelDenoiser` (with approximate prefix / dual KV caches), :class:`FunctionDenoiser`.
"""

from lightning_dlm.sampling.block_decode import block_decode
from lightning_dlm.sampling.canvas import Canvas, build_canvas, slot_logit_positions, slot_logits
from lightning_dlm.sampling.denoisers import CACHE_MODES, FunctionDenoiser, ModelDenoiser
from lightning_dlm.sampling.engine import Decoded, SamplerConfig, SamplingStats, decode
from lightning_dlm.sampling.filtering import draw_tokens, filter_logits
from lightning_dlm.sampling.generate import Generation, generate, resolve_model, row_seeds, suppressed_ids
from lightning_dlm.sampling.strategies import (
    CONFIDENCES,
    STRATEGIES,
    ConfidenceOrder,
    RandomOrder,
    StepContext,
    Strategy,
    ThresholdParallel,
    get_strategy,
    register,
    reveal_probability,
)

__all__ = [
    "CACHE_MODES", "CONFIDENCES", "STRATEGIES", "Canvas", "ConfidenceOrder", "Decoded", "FunctionDenoiser",
    "Generation", "ModelDenoiser", "block_decode", "RandomOrder", "SamplerConfig", "SamplingStats", "StepContext", "Strategy",
    "ThresholdParallel", "build_canvas", "decode", "draw_tokens", "filter_logits", "generate", "get_strategy",
    "register", "resolve_model", "reveal_probability", "row_seeds", "slot_logit_positions",
    "slot_logits", "suppressed_ids",
]
