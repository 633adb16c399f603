"""Loaders of the field's released diffusion LMs, one module each (see :mod:`.base`), registered in
:mod:`lightning_dlm.io.loaders`' registry on import: DiffuGPT, DiffuLLaMA, Dream, LLaDA, Fast-dLLM
v2, dllm's Tiny-A2D (MDLM and BD3LM)."""

from lightning_dlm.io.releases import diffugpt, diffullama, dream, fast_dllm_v2, llada, tiny_a2d  # noqa: F401
from lightning_dlm.io.releases.base import RELEASES, ReleaseLoader, is_release, register_release, release_of

__all__ = ["RELEASES", "ReleaseLoader", "is_release", "register_release", "release_of"]
