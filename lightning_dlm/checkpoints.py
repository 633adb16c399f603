"""Reading lightning_dlm models with clear errors: a ``.ckpt`` file written by ``dlm fit``, a sharded
checkpoint folder (FSDP ``state_dict_type: sharded``), or a folder written by ``dlm export``.

A sharded folder is Lightning's layout: ``torch.distributed.checkpoint`` files (``.metadata`` and one
``__<rank>_<n>.distcp`` file per rank) holding ``{"model": state_dict, "optimizer_<i>": ...}``, plus
``meta.pt``, the rest of the checkpoint (hyper-parameters, lightning_dlm's metadata). It is
consolidated in one process on the CPU; only the model's tensors are read, not the optimizer's.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from lightning_dlm.errors import DLMError

EXPORT_CONFIG = "diffusion_config.json"  # what marks a folder written by `dlm export`
SHARDED_META = "meta.pt"  # Lightning's file of everything but the weights and optimizer states
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards

# Wrapper modules that add a component to every parameter name: torch.compile (``_orig_mod``, also on
# submodules), FSDP and activation checkpointing (anywhere in the name), DDP / DataParallel and
# Fabric (at the front).
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_LEADING_WRAPPERS = frozenset({"module", "_forward_module"})


def strip_wrapper_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict with the names the unwrapped module uses (``net.model....``)."""
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = [part for part in key.split(".") if part not in _WRAPPER_PARTS]
        while len(parts) > 1 and parts[0] in _LEADING_WRAPPERS:
            parts = parts[1:]
        name = ".".join(parts)
        if name in out:
            raise DLMError(f"the checkpoint holds '{name}' twice once wrapper prefixes are removed: it mixes wrapped and unwrapped weights")
        out[name] = value
    return out


def is_exported_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_CONFIG))


def is_sharded_checkpoint(path: str) -> bool:
    """A folder in Lightning's sharded-checkpoint layout (complete or not)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in (SHARDED_META, DCP_METADATA))


def is_diffusion_checkpoint(path: str) -> bool:
    """Whether ``path`` is a lightning_dlm diffusion model: a ``.ckpt`` or sharded folder written by
    ``dlm fit``, or a folder written by ``dlm export``. Cheap: no weights are read. Never raises."""
    from lightning_dlm.module import CHECKPOINT_KEY

    try:
        if is_exported_folder(path):
            return True
        if os.path.isdir(path):
            meta_path = os.path.join(path, SHARDED_META)
            return os.path.isfile(meta_path) and _has_diffusion_meta(_torch_load(meta_path), CHECKPOINT_KEY)
        if os.path.isfile(path):
            return _has_diffusion_meta(_torch_load(path), CHECKPOINT_KEY)
    except Exception:  # unreadable or foreign files are simply not diffusion checkpoints
        return False
    return False


def _has_diffusion_meta(checkpoint, key: str) -> bool:
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict) and "backbone" in checkpoint[key]


def _torch_load(path: str):
    import torch

    # mmap: the tensors stay on disk until used, so reading a checkpoint's metadata costs little
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


# --- reading checkpoints ----------------------------------------------------------------------------
def require_exists(path: str) -> None:
    if not os.path.exists(path):
        raise DLMError(f"checkpoint '{path}' does not exist: give the path of a .ckpt (or sharded checkpoint folder) written by `dlm fit`")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A ``dlm fit`` checkpoint as one dict: ``state_dict`` (consolidated, wrapper prefixes removed),
    ``hyper_parameters``, the lightning_dlm metadata and the rest. Tensors of a ``.ckpt`` file are
    memory-mapped."""
    from lightning_dlm.module import CHECKPOINT_KEY

    require_exists(path)
    if is_exported_folder(path):
        raise DLMError(f"'{path}' is a folder written by `dlm export`, not a training checkpoint: load it with load_diffusion_lm")
    if os.path.isdir(path):
        checkpoint = _read_sharded(path)
    else:
        try:
            checkpoint = _torch_load(path)
        except Exception as err:  # corrupt or foreign files raise many types
            raise DLMError(f"could not read checkpoint '{path}' ({type(err).__name__}): is it a PyTorch checkpoint?") from None
    if not _has_diffusion_meta(checkpoint, CHECKPOINT_KEY) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DLMError(f"'{path}' is not a lightning_dlm diffusion checkpoint: pass a .ckpt written by `dlm fit`")
    checkpoint["state_dict"] = strip_wrapper_prefixes(checkpoint["state_dict"])
    return checkpoint


def _read_sharded(path: str) -> Dict[str, Any]:
    import torch

    if not is_sharded_checkpoint(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            raise _not_diffusion_folder(path)
        raise DLMError(
            f"'{path}' is a folder but not a checkpoint: give a .ckpt file, a sharded checkpoint folder "
            f"(with {DCP_METADATA} and {SHARDED_META}) or a folder written by `dlm export`"
        )
    for name, what in ((DCP_METADATA, "the torch.distributed.checkpoint index"), (SHARDED_META, "Lightning's checkpoint metadata")):
        if not os.path.isfile(os.path.join(path, name)):
            raise DLMError(
                f"sharded checkpoint '{path}' is missing {name} ({what}): copy the whole folder that `dlm fit` wrote"
            )
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(path)
    try:
        metadata = reader.read_metadata()
    except Exception as err:
        raise DLMError(f"could not read {DCP_METADATA} of sharded checkpoint '{path}' ({type(err).__name__}): the folder is damaged") from None
    _check_shards(path, metadata)
    try:
        checkpoint = torch.load(os.path.join(path, SHARDED_META), map_location="cpu", weights_only=False)
    except Exception as err:
        raise DLMError(f"could not read {SHARDED_META} of sharded checkpoint '{path}' ({type(err).__name__}): the folder is damaged") from None
    if not isinstance(checkpoint, dict):
        raise DLMError(f"'{path}' is not a lightning_dlm diffusion checkpoint: its {SHARDED_META} holds no checkpoint dict")
    checkpoint["state_dict"] = _consolidate_model(reader, path)
    return checkpoint


def _check_shards(path: str, metadata) -> None:
    """Every shard file the index names must exist and be long enough: name the ones that are not."""
    needed: Dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in needed if not os.path.isfile(os.path.join(path, name)))
    if missing:
        raise DLMError(
            f"sharded checkpoint '{path}' is missing {len(missing)} of its {len(needed)} shard files "
            f"({', '.join(missing)}): copy every file of the folder that `dlm fit` wrote (one per rank)"
        )
    short = sorted(name for name, end in needed.items() if os.path.getsize(os.path.join(path, name)) < end)
    if short:
        raise DLMError(f"shard files of '{path}' are truncated ({', '.join(short)}): copy them again from the training run")


def _consolidate_model(reader, path: str) -> Dict[str, Any]:
    """The full (unsharded) model state dict, read in this one process on the CPU.

    The same call as Lightning's ``_load_distributed_checkpoint`` (and torch's
    ``format_utils.dcp_to_torch_save``), restricted to the ``model`` entry: the optimizer states,
    twice the model's size for AdamW, are never read.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: Dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DLMError(f"could not consolidate sharded checkpoint '{path}' ({type(err).__name__}: {first[:200]}): the folder is damaged") from None
    model = state.get("model")
    if not isinstance(model, dict) or not model:
        raise DLMError(f"sharded checkpoint '{path}' holds no model weights (no 'model' entry): was it written by `dlm fit`?")
    return model


# --- exported folders -------------------------------------------------------------------------------
def read_export_config(path: str) -> Dict[str, Any]:
    """The ``diffusion_config.json`` of a folder written by ``dlm export``."""
    file = os.path.join(path, EXPORT_CONFIG)
    try:
        with open(file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise DLMError(f"could not read '{file}' ({type(err).__name__}): export the checkpoint again with `dlm export`") from None
    missing = [key for key in ("mask_token_id", "shift", "schedule") if key not in config]
    if not isinstance(config, dict) or missing:
        raise DLMError(f"'{file}' lacks {', '.join(missing) or 'a JSON object'}: export the checkpoint again with `dlm export`")
    return config


def _not_diffusion_folder(path: str) -> DLMError:
    return DLMError(
        f"'{path}' is not a diffusion model (a Hugging Face folder without {EXPORT_CONFIG}): export a lightning_dlm "
        f"checkpoint with `dlm export`; for an AR model use transformers' AutoModelForCausalLM.from_pretrained"
    )


def _load_exported(path: str, map_location: str):
    from transformers import AutoConfig

    from lightning_dlm.diffusion.config import DiffusionConfig
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.model.loading import DTYPES
    from lightning_dlm.module import DiffusionLM

    cfg = read_export_config(path)
    try:
        dtype = AutoConfig.from_pretrained(path).dtype
    except (OSError, ValueError) as err:
        raise DLMError(f"could not read the model config of '{path}' ({type(err).__name__}): export the checkpoint again") from None
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    backbone = BackboneConfig(
        pretrained=path,
        tokenizer=path,
        dtype=dtype_name if dtype_name in DTYPES else "float32",
        mask_token=MaskTokenConfig(mode="reuse", id=int(cfg["mask_token_id"]), token=cfg.get("mask_token") or "<|mask|>"),
    )
    fields = DiffusionConfig.__dataclass_fields__
    diffusion = DiffusionConfig(**{key: cfg[key] for key in fields if key in cfg})
    extra = {key: int(cfg[key]) for key in ("seed", "val_t_levels") if key in cfg}
    module = DiffusionLM(backbone=backbone, diffusion=diffusion, **extra)
    module.configure_model()
    module.net.mask_token_added = bool(cfg.get("mask_token_added", False))
    module.tokens_seen = int(cfg.get("tokens_seen", 0))
    tokenizer_mask = getattr(module.tokenizer, "mask_token_id", None)
    if tokenizer_mask is not None and tokenizer_mask != module.mask_token_id:
        raise DLMError(
            f"'{path}': the tokenizer's mask token id {tokenizer_mask} differs from {EXPORT_CONFIG}'s "
            f"{module.mask_token_id}: export the checkpoint again with `dlm export`"
        )
    return module.to(map_location)


# --- loading ------------------------------------------------------------------------------------------
def module_from_checkpoint(checkpoint: Dict[str, Any]):
    """A :class:`DiffusionLM` (train mode, CPU) holding the weights of a checkpoint from :func:`read_checkpoint`."""
    import inspect

    from lightning_dlm.module import CHECKPOINT_KEY, DiffusionLM

    accepted = inspect.signature(DiffusionLM.__init__).parameters
    hparams = {key: value for key, value in (checkpoint.get("hyper_parameters") or {}).items() if key in accepted}
    # the stored backbone rebuilds the model without the original weights or paths
    hparams["backbone"] = checkpoint[CHECKPOINT_KEY]["backbone"]
    module = DiffusionLM(**hparams)
    module.on_load_checkpoint(checkpoint)  # tokenizer, tokens_seen, the backbone, mask-id check
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DLMError(f"the checkpoint's weights do not fit its model ({first[:200]}): was it written by `dlm fit`?") from None
    return module


def load_diffusion_lm(path: str, map_location: str = "cpu"):
    """A :class:`DiffusionLM` in eval mode, ready to sample or evaluate, from a ``.ckpt`` or sharded
    checkpoint folder written by ``dlm fit``, or a folder written by ``dlm export``."""
    if is_exported_folder(path):
        module = _load_exported(path, map_location)
    else:
        module = module_from_checkpoint(read_checkpoint(path)).to(map_location)
    module.eval()
    return module
