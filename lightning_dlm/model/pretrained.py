"""Where ``DiffusionModel.from_pretrained`` and ``save_pretrained`` find and write a model.

* a folder written by ``dlm export`` / ``save_pretrained`` (``diffusion_config.json`` beside a
  transformers model folder);
* a ``.ckpt`` file or a sharded checkpoint folder written by ``dlm fit`` (the transformers model
  is assembled on the meta device from the checkpoint's own tensors: no second copy);
* a hub name of an exported model (downloaded with ``huggingface_hub``; needs the network).
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Optional

import torch

from lightning_dlm.checkpoints import (
    EXPORT_CONFIG,
    is_exported_folder,
    read_checkpoint,
    read_export_config,
    require_exists,
)
from lightning_dlm.configs import coerce_config
from lightning_dlm.diffusion.config import DiffusionConfig
from lightning_dlm.errors import DLMError


def _looks_like_hub_name(path: str) -> bool:
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def load_model(path: str, trust_checkpoint: bool = False, dtype: Optional[torch.dtype] = None):
    """A :class:`DiffusionModel` (CPU) from any of the sources above, in ``dtype`` (default: the
    stored one; a checkpoint's tensors are cast one at a time, never a second copy of the model)."""
    if _looks_like_hub_name(path):
        path = _download(path)
    if is_exported_folder(path):
        model = _load_exported(path)
        return model if dtype is None else model.to(dtype)
    require_exists(path)
    return _load_checkpoint(path, trust_checkpoint, dtype)


def _download(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=name)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...: one line
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DLMError(f"could not fetch '{name}' from the Hugging Face hub ({first}): give a local .ckpt or exported "
                       f"folder, or check the name and your network access") from None
    if not os.path.isfile(os.path.join(folder, EXPORT_CONFIG)):
        raise DLMError(f"hub model '{name}' has no {EXPORT_CONFIG}: it is not a lightning_dlm export (an AR model "
                       f"loads with transformers' AutoModelForCausalLM)")
    return folder


def _load_checkpoint(path: str, trust: bool, dtype: Optional[torch.dtype] = None):
    from lightning_dlm.export import backbone_state_dict, build_hf_model, checkpoint_info, stored_dtype, tokenizer_with_mask
    from lightning_dlm.model.diffusion_model import DiffusionModel
    from lightning_dlm.module import CHECKPOINT_KEY

    checkpoint = read_checkpoint(path, trust=trust)
    meta = checkpoint[CHECKPOINT_KEY]
    state = backbone_state_dict(checkpoint.pop("state_dict"))
    hf_model = build_hf_model(meta["backbone"], state, dtype or stored_dtype(state))
    tokenizer = tokenizer_with_mask(meta)
    diffusion = coerce_config(DiffusionConfig, (checkpoint.get("hyper_parameters") or {}).get("diffusion"))
    return DiffusionModel(hf_model, meta["mask_token_id"], meta["mask_token_added"], diffusion=diffusion,
                          tokenizer=tokenizer, info=checkpoint_info(checkpoint, path))


def _load_exported(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lightning_dlm.model.diffusion_model import DiffusionModel

    cfg = read_export_config(path)
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=config.dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DLMError(f"could not read the model in '{path}' ({first}): export the checkpoint again") from None
    mask_id = int(cfg["mask_token_id"])
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != mask_id:
        raise DLMError(f"'{path}': the tokenizer's mask token id {tokenizer.mask_token_id} differs from {EXPORT_CONFIG}'s "
                       f"{mask_id}: export the checkpoint again with `dlm export`")
    fields = DiffusionConfig.__dataclass_fields__
    diffusion = DiffusionConfig(**{key: cfg[key] for key in fields if key in cfg})
    info = {key: cfg[key] for key in ("seed", "val_t_levels", "objective", "tokens_seen", "global_step", "source_checkpoint")
            if key in cfg}
    return DiffusionModel(model, mask_id, bool(cfg.get("mask_token_added", False)), diffusion=diffusion,
                          tokenizer=tokenizer, info=info)


def save_model(model, folder: str, dtype: str = "keep", progress: Optional[Callable[[str], None]] = None) -> str:
    """Write ``model`` (a :class:`DiffusionModel`) in the export format (see ``lightning_dlm.export``)."""
    from lightning_dlm.export import DTYPE_CHOICES, export_config, name_mask_token, write_export_folder

    if dtype not in DTYPE_CHOICES:
        raise DLMError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
    if model.tokenizer is None:
        raise DLMError("this model has no tokenizer to save: build it with a tokenizer (backbone.tokenizer)")
    from lightning_dlm.model.lora import merged

    hf_model = merged(model.model)  # LoRA adapters merged into the weights (a copy; the model keeps them)
    target = DTYPE_CHOICES[dtype] or next(hf_model.parameters()).dtype
    if target != next(hf_model.parameters()).dtype:
        hf_model = copy.deepcopy(hf_model).to(target)
    tokenizer = name_mask_token(model.tokenizer, model.mask_token_id)
    config = export_config(model.mask_token_id, tokenizer, model.mask_token_added, model.diffusion, target, model.info)
    return write_export_folder(folder, hf_model, tokenizer, config, progress)
