"""Loading lightning_dlm checkpoints with clear errors."""

from __future__ import annotations

import os

from lightning_dlm.errors import DLMError


def load_diffusion_lm(path: str, map_location: str = "cpu"):
    """A :class:`DiffusionLM` ready to sample, from a checkpoint written by ``dlm fit``."""
    from lightning_dlm.module import CHECKPOINT_KEY, DiffusionLM

    if not os.path.isfile(path):
        raise DLMError(f"checkpoint '{path}' does not exist: give the path of a .ckpt written by `dlm fit`")
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # corrupt or foreign files raise many types
        raise DLMError(f"could not read checkpoint '{path}' ({type(err).__name__}): is it a PyTorch checkpoint?") from None
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if meta is None or "backbone" not in meta:
        raise DLMError(f"'{path}' is not a lightning_dlm diffusion checkpoint: pass a .ckpt written by `dlm fit`")
    backbone = meta["backbone"]
    del checkpoint
    # the stored backbone is passed on, so load_from_checkpoint does not read the file for it again
    module = DiffusionLM.load_from_checkpoint(path, map_location=map_location, weights_only=False, backbone=backbone)
    module.eval()
    return module
