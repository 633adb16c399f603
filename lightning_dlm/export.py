"""Export a lightning_dlm checkpoint as a Hugging Face model folder.

    from lightning_dlm.export import export
    export("runs/debug/checkpoints/last.ckpt", "exported/debug")   # or a sharded checkpoint folder

The folder holds the weights (safetensors) and transformers config of the adapted model, the
tokenizer with its mask token, and ``diffusion_config.json`` (mask token, shift, schedule, ...).
``AutoModelForCausalLM.from_pretrained(folder)`` loads it with bidirectional attention (the config
says ``is_causal: false``) and gives the logits of the checkpoint's model; ``load_diffusion_lm``,
``dlm sample --ckpt`` and ``dlm eval`` take the folder directly.

The model is assembled on the meta device from the checkpoint's own tensors (no random
initialisation, no second copy of the weights); the folder is written next to its destination
under a temporary name and renamed at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional

import torch

from lightning_dlm.checkpoints import EXPORT_CONFIG, is_exported_folder, require_exists
from lightning_dlm.configs import coerce_config
from lightning_dlm.errors import DLMError
from lightning_dlm.model.tokenizer_files import tokenizer_from_files

EXPORT_FORMAT = 1
DTYPE_CHOICES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
BACKBONE_PREFIX = "net.model."  # DiffusionLM.net (DiffusionBackbone) .model (the transformers model)


def lightning_dlm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning_dlm")
    except PackageNotFoundError:
        return "unknown"


def check_out_dir(out: str) -> None:
    """The destination must not exist, or be an empty folder: nothing is ever overwritten."""
    if os.path.isdir(out):
        if os.listdir(out):
            raise DLMError(f"output folder '{out}' is not empty: give a new or empty folder (nothing was written)")
    elif os.path.exists(out):
        raise DLMError(f"output path '{out}' is a file: give a new or empty folder (nothing was written)")


def backbone_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The transformers model's own state dict (``net.model.`` removed) of a DiffusionLM state dict
    whose wrapper prefixes are already removed."""
    state = {key[len(BACKBONE_PREFIX):]: value for key, value in state_dict.items() if key.startswith(BACKBONE_PREFIX)}
    if not state:
        some = ", ".join(sorted(state_dict)[:3]) or "none"
        raise DLMError(f"the checkpoint holds no '{BACKBONE_PREFIX}*' weights (first keys: {some}): was it written by `dlm fit`?")
    return state


def stored_dtype(state: Dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype that holds most of a state dict's numbers (float32 if none)."""
    counts = Counter()
    for value in state.values():
        if value.is_floating_point():
            counts[value.dtype] += value.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def build_hf_model(backbone: Dict[str, Any], state: Dict[str, torch.Tensor], dtype: torch.dtype):
    """The transformers causal LM of a checkpoint's ``backbone`` record, holding ``state`` (cast to
    ``dtype`` in place), configured for bidirectional attention. Built on the meta device, then
    given the tensors themselves (no random initialisation)."""
    from transformers import AutoModelForCausalLM

    from lightning_dlm.model import BackboneConfig
    from lightning_dlm.model.loading import resolve_hf_config
    cfg = coerce_config(BackboneConfig, backbone)
    config = resolve_hf_config(cfg)
    config.is_causal = False  # a diffusion LM attends both ways; transformers' mask builders read this
    for key, value in state.items():  # one tensor at a time: a cast copy never doubles the model in memory
        if value.is_floating_point():
            state[key] = value.to(dtype)
    from accelerate import init_empty_weights

    # parameters on the meta device; buffers computed from the config (rotary inv_freq is not stored)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora is not None:  # a LoRA run: its adapters are in the state; merged into the weights below
        from lightning_dlm.model.lora import apply_lora

        model = apply_lora(model, cfg.lora, cfg.mask_token.id)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise DLMError(
            f"the checkpoint has weights its {config.model_type} model does not ({', '.join(result.unexpected_keys[:5])}): "
            f"was it written by `dlm fit` with this lightning_dlm?"
        )
    if cfg.lora is not None:
        from lightning_dlm.model.lora import merge_in_place

        model = merge_in_place(model)
    model.tie_weights()
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise DLMError(f"the checkpoint lacks weights of its {config.model_type} model ({', '.join(left[:5])}): it is incomplete")
    model.config.dtype = dtype
    return model.eval()


def tokenizer_with_mask(meta: Dict[str, Any]):
    """The checkpoint's tokenizer, its mask token set to the diffusion mask (added or reused)."""
    if not meta.get("tokenizer_files"):
        raise DLMError("the checkpoint carries no tokenizer: train with model.backbone.tokenizer (or pretrained) set")
    return name_mask_token(tokenizer_from_files(meta["tokenizer_files"]), int(meta["mask_token_id"]))


def name_mask_token(tokenizer, mask_id: int):
    """``tokenizer`` naming ``mask_id`` as its mask token: itself when it does already, else a copy
    that does (a reused id becomes a special token)."""
    if tokenizer.mask_token_id == mask_id:
        return tokenizer
    token = tokenizer.convert_ids_to_tokens(mask_id) if mask_id < len(tokenizer) else None
    if token is None:
        raise DLMError(f"the mask token id {mask_id} has no entry in the tokenizer (size {len(tokenizer)}): "
                       f"cannot export its mask token")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.mask_token = token
    return tokenizer


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
        "seed": int(info.get("seed", 0)),  # with val_t_levels: DiffusionLM.nelbo_per_token's fixed draws
        "val_t_levels": int(info.get("val_t_levels", 8)),
        "objective": info.get("objective", "diffusion"),  # "ar": trained as a causal LM (loads as one)
        "dtype": str(dtype).replace("torch.", ""),
        "source_checkpoint": info.get("source_checkpoint"),
        "global_step": info.get("global_step"),
        "tokens_seen": int(info.get("tokens_seen", 0)),
    }


def checkpoint_info(checkpoint: Dict[str, Any], source: str) -> Dict[str, Any]:
    """What a ``dlm fit`` checkpoint records beside its weights (seed, levels, progress, origin)."""
    from lightning_dlm.module import CHECKPOINT_KEY

    hparams = checkpoint.get("hyper_parameters") or {}
    return {"seed": int(hparams.get("seed", 0)), "val_t_levels": int(hparams.get("val_t_levels", 8)),
            "objective": hparams.get("objective", "diffusion"),
            "tokens_seen": int(checkpoint[CHECKPOINT_KEY].get("tokens_seen", 0)),
            "global_step": checkpoint.get("global_step"), "source_checkpoint": os.path.abspath(source)}


def export(ckpt: str, out: str, dtype: str = "keep", progress: Optional[Callable[[str], None]] = None,
           trust_checkpoint: bool = False) -> str:
    """Write the model of ``ckpt`` (a ``.ckpt`` or sharded checkpoint folder from ``dlm fit``) as a
    Hugging Face folder ``out`` (new or empty). ``dtype``: ``keep`` (the checkpoint's), ``float32``
    or ``bfloat16``. ``progress`` receives one line per stage. ``trust_checkpoint``: unpickle the
    checkpoint in full (code in it can run); by default only tensors and plain data are read.
    Returns ``out``."""
    from lightning_dlm.model.pretrained import load_model, save_model

    say = progress or (lambda line: None)
    out = os.path.abspath(out)
    check_out_dir(out)
    if dtype not in DTYPE_CHOICES:
        raise DLMError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
    require_exists(ckpt)
    if is_exported_folder(ckpt):
        raise DLMError(f"'{ckpt}' is a folder written by `dlm export`, not a training checkpoint: it is exported "
                       f"already (DiffusionModel.from_pretrained(path).save_pretrained(out, dtype=...) converts it)")
    say(f"reading {ckpt}" + (" (consolidating the shards on the CPU)" if os.path.isdir(ckpt) else ""))
    model = load_model(ckpt, trust_checkpoint=trust_checkpoint, dtype=DTYPE_CHOICES[dtype])
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {model.config.model_type}, {n_params / 1e6:.2f}M parameters, "
        f"{str(model.model.dtype).replace('torch.', '')}, mask token {model.mask_token_id} "
        f"({'added' if model.mask_token_added else 'reused'})")
    return save_model(model, out, progress=say)


def write_export_folder(out: str, model, tokenizer, config: Dict[str, Any],
                        progress: Optional[Callable[[str], None]] = None) -> str:
    """Write the export format into ``out`` (new or empty): the transformers ``model``
    (safetensors), the ``tokenizer`` (naming the mask token) and ``config`` as
    ``diffusion_config.json``. Written under a temporary name beside ``out`` and renamed at the
    end, so a failure leaves nothing half-written."""
    say = progress or (lambda line: None)
    out = os.path.abspath(out)
    check_out_dir(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.export-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        say(f"writing {out}")
        model.save_pretrained(staging, max_shard_size="5GB")
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, EXPORT_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
            fh.write("\n")
        _check_saved_tokenizer(staging, config["mask_token_id"])
        check_out_dir(out)  # again: something may have appeared there meanwhile
        try:
            os.rename(staging, out)  # atomic; replaces an empty folder
        except OSError as err:
            raise DLMError(f"could not move the export into '{out}' ({err.strerror}): give a new or empty folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"exported to {out}")
    return out


def _check_saved_tokenizer(folder: str, mask_id: int) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder).mask_token_id
    if saved != mask_id:
        raise DLMError(f"the saved tokenizer's mask token id is {saved}, not {mask_id}: the tokenizer cannot name the mask token")
