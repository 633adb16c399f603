"""The on-disk format of lightning_dlm: the checkpoint's metadata key, the file names that mark a
folder, and the records an export and a checkpoint carry beside the weights.

One owner for these names: the trainer writes them (:mod:`lightning_dlm.training.module`), the
readers (:mod:`.safe_read`, :mod:`.loaders`) and the export writer (:mod:`.export`) read them.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Dict

import torch

#: The key of lightning_dlm's metadata in a ``dlm fit`` checkpoint (mask token, backbone record,
#: tokenizer files, tokens seen).
CHECKPOINT_KEY = "lightning_dlm"
CHECKPOINT_FORMAT = 1
EXPORT_CONFIG = "diffusion_config.json"  # what marks a folder written by `dlm export`
EXPORT_FORMAT = 1
SHARDED_META = "meta.pt"  # Lightning's file of everything but the weights and optimizer states
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
BACKBONE_PREFIX = "net.model."  # DiffusionLM.net (the DiffusionModel) .model (the transformers model)
DTYPE_CHOICES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def lightning_dlm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning_dlm")
    except PackageNotFoundError:
        return "unknown"


def export_config(mask_token_id: int, tokenizer, mask_token_added: bool, diffusion, dtype: torch.dtype,
                  info: Dict[str, Any]) -> Dict[str, Any]:
    """The contents of ``diffusion_config.json``: what a sampler needs beyond the transformers model."""
    return {
        "format": EXPORT_FORMAT,
        "lightning_dlm_version": lightning_dlm_version(),
        "mask_token_id": int(mask_token_id),
        "mask_token": tokenizer.convert_ids_to_tokens(int(mask_token_id)),
        "mask_token_added": bool(mask_token_added),
        **asdict(diffusion),  # schedule, shift, normalization, ...
        "seed": int(info.get("seed", 0)),  # with val_t_levels: the fixed draws of the validation NELBO
        "val_t_levels": int(info.get("val_t_levels", 8)),
        "objective": info.get("objective", "diffusion"),  # "ar": trained as a causal LM (loads as one)
        "dtype": str(dtype).replace("torch.", ""),
        "source_checkpoint": info.get("source_checkpoint"),
        "global_step": info.get("global_step"),
        "tokens_seen": int(info.get("tokens_seen", 0)),
    }


def checkpoint_info(checkpoint: Dict[str, Any], source: str) -> Dict[str, Any]:
    """What a ``dlm fit`` checkpoint records beside its weights (seed, levels, progress, origin)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return {"seed": int(hparams.get("seed", 0)), "val_t_levels": int(hparams.get("val_t_levels", 8)),
            "objective": hparams.get("objective", "diffusion"),
            "tokens_seen": int(checkpoint[CHECKPOINT_KEY].get("tokens_seen", 0)),
            "global_step": checkpoint.get("global_step"), "source_checkpoint": os.path.abspath(source)}
