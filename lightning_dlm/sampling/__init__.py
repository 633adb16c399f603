"""Samplers for adapted diffusion LMs (plain torch; no Lightning)."""

from lightning_dlm.sampling.canvas import Canvas, build_canvas, slot_logits
from lightning_dlm.sampling.filtering import draw_tokens, filter_logits
from lightning_dlm.sampling.generate import Generation, generate
from lightning_dlm.sampling.random_order import random_order_sample

__all__ = [
    "Canvas", "Generation", "build_canvas", "draw_tokens", "filter_logits", "generate",
    "random_order_sample", "slot_logits",
]
