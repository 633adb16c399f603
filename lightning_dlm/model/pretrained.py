"""How ``DiffusionModel.from_pretrained`` assembles a model from what a loader read, and how
``save_pretrained`` hands one to the export writer.

The files are read by :mod:`lightning_dlm.io.loaders` (an exported folder, a ``.ckpt`` or sharded
checkpoint folder written by ``dlm fit``, a released diffusion LM's folder
(:mod:`lightning_dlm.io.releases`), or a hub name of either); a checkpoint's or a release's
transformers model is assembled here on the meta device from its own tensors (no random
initialisation, no second copy of the weights).
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any, Callable, Dict, Optional

import torch

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.core.records import coerce_config
from lightning_dlm.io.checksums import verify_folder
from lightning_dlm.io.export import write_export_folder
from lightning_dlm.io.format import DTYPE_CHOICES, export_config
from lightning_dlm.io.loaders import StoredModel, custom_code_refusal, read_stored
from lightning_dlm.io.releases import release_of  # registers the released diffusion LMs' loaders, too
from lightning_dlm.model import llada  # noqa: F401 - registers LLaDA's class with transformers' Auto classes
from lightning_dlm.model.config import BackboneConfig
from lightning_dlm.model.loading import resolve_hf_config
from lightning_dlm.model.lora import apply_lora, merge_in_place, merged


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
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = coerce_config(BackboneConfig, backbone)
    config = resolve_hf_config(cfg)
    config.is_causal = False  # a diffusion LM attends both ways; transformers' mask builders read this
    for key, value in state.items():  # one tensor at a time: a cast copy never doubles the model in memory
        if value.is_floating_point():
            state[key] = value.to(dtype)
    # parameters on the meta device; buffers computed from the config (rotary inv_freq is not stored)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora is not None:  # a LoRA run: its adapters are in the state; merged into the weights below
        model = apply_lora(model, cfg.lora, cfg.mask_token.id)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise DLMError(
            f"the checkpoint has weights its {config.model_type} model does not ({', '.join(result.unexpected_keys[:5])}): "
            f"was it written by `dlm fit` with this lightning_dlm?"
        )
    if cfg.lora is not None:
        model = merge_in_place(model)
    model.tie_weights()
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise DLMError(f"the checkpoint lacks weights of its {config.model_type} model ({', '.join(left[:5])}): it is incomplete")
    model.config.dtype = dtype
    return model.eval()


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


def _exported_model(folder: str, dtype: Optional[torch.dtype]):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        # never the folder's own Python files (auto_map): transformers would ask on a terminal, and run them on a yes
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=config.dtype or torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as err:
        refusal = custom_code_refusal(folder, err)
        if refusal is not None:
            raise refusal from None
        first = first_line(err, 160)
        raise DLMError(f"could not read the model in '{folder}' ({first}): export the checkpoint again") from None
    return model if dtype is None else model.to(dtype)


def assemble(stored: StoredModel, factory: Callable[..., Any], dtype: Optional[torch.dtype] = None):
    """``factory(hf_model, mask_id, added, diffusion=, tokenizer=, info=)`` (a DiffusionModel) of a
    loader's record, in ``dtype`` (default: the stored one; a checkpoint's tensors are cast one at a
    time, never a second copy of the model)."""
    if stored.folder is not None:
        hf_model = _exported_model(stored.folder, dtype)
    else:
        hf_model = build_hf_model(stored.backbone, stored.state, dtype or stored_dtype(stored.state))
    fields = DiffusionConfig.__dataclass_fields__
    diffusion = coerce_config(DiffusionConfig, {key: value for key, value in stored.diffusion.items() if key in fields})
    tokenizer = name_mask_token(stored.tokenizer, stored.mask_token_id)
    return factory(hf_model, stored.mask_token_id, stored.mask_token_added, diffusion=diffusion, tokenizer=tokenizer,
                   info=stored.info)


def refuse_remote_code(what: str) -> DLMError:
    """The one line for a ``trust_remote_code`` request (``what`` names where it came from)."""
    return DLMError(f"{what}: trust_remote_code is refused, lightning_dlm never runs a model folder's own Python "
                    f"code; drop it (the released diffusion LMs load through lightning_dlm's own classes, "
                    f"see lightning_dlm.io.releases)")


def check_backbone(cfg: BackboneConfig, diffusion: DiffusionConfig) -> BackboneConfig:
    """Before anything is built or written: refuse ``model.backbone.trust_remote_code: true``, and a
    released diffusion LM (:mod:`lightning_dlm.io.releases`) trained under other conventions than
    ``diffusion`` says (shift, attention, block size): it would train to a convention the weights
    do not have."""
    if cfg.trust_remote_code:
        raise refuse_remote_code("model.backbone.trust_remote_code: true")
    release = release_of(cfg.pretrained) if cfg.pretrained and not cfg.from_scratch else None
    if release is None:
        return cfg
    wanted = release.conventions(release.published_config(cfg.pretrained) or {})
    keys = ["shift", "attention"] + (["block_size"] if wanted.get("attention") == "block" else [])
    for key in keys:
        if key in wanted and getattr(diffusion, key) != wanted[key]:
            value = str(wanted[key]).lower() if isinstance(wanted[key], bool) else wanted[key]
            raise DLMError(f"model.backbone.pretrained '{cfg.pretrained}' is the {release.title} release, trained with "
                           f"{key}: {value}, but model.diffusion sets {key}: {getattr(diffusion, key)}: set "
                           f"--model.diffusion.{key} {value}")
    return cfg


def load_model(path: str, factory: Callable[..., Any], trust_checkpoint: bool = False,
               dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False):
    """The model at ``path`` (any source :mod:`lightning_dlm.io.loaders` reads) on the CPU; a folder
    with checksums beside it (:mod:`lightning_dlm.io.checksums`) is checked first.
    ``trust_remote_code`` is refused (one line): nothing here runs a folder's own code."""
    if trust_remote_code:
        raise refuse_remote_code(f"loading '{path}'")
    verify_folder(os.path.expanduser(str(path)))  # a shipped folder against the checksums beside it
    return assemble(read_stored(str(path), trust=trust_checkpoint), factory, dtype)


def _to_save(model, dtype: str):
    """The transformers model to write (LoRA merged, in ``dtype``) and its dtype."""
    if dtype not in DTYPE_CHOICES:
        raise DLMError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
    if model.tokenizer is None:
        raise DLMError("this model has no tokenizer to save: build it with a tokenizer (backbone.tokenizer)")
    hf_model = merged(model.model)  # LoRA adapters merged into the weights (a copy; the model keeps them)
    target = DTYPE_CHOICES[dtype] or next(hf_model.parameters()).dtype
    if target != next(hf_model.parameters()).dtype:
        hf_model = copy.deepcopy(hf_model).to(target)
    return hf_model, target


def save_model(model, folder: str, dtype: str = "keep", progress: Optional[Callable[[str], None]] = None) -> str:
    """Write ``model`` (a :class:`DiffusionModel`) in the export format (see :mod:`lightning_dlm.io.export`)."""
    hf_model, target = _to_save(model, dtype)
    tokenizer = name_mask_token(model.tokenizer, model.mask_token_id)
    config = export_config(model.mask_token_id, tokenizer, model.mask_token_added, model.diffusion, target, model.info)
    return write_export_folder(folder, hf_model, tokenizer, config, progress)


def save_causal_lm(model, folder: str, dtype: str = "keep", progress: Optional[Callable[[str], None]] = None) -> str:
    """Write the causal LM of an AR run (``model.objective: ar``) as a plain transformers folder
    (``is_causal: true``, no ``diffusion_config.json``): a pretrained model like any on the hub,
    which ``model.backbone.pretrained`` then adapts. A diffusion model is refused: its weights
    expect bidirectional attention and masked inputs, so a causal-LM folder would mislabel it."""
    if model.objective != "ar":
        raise DLMError(f"the checkpoint was trained with model.objective: {model.objective}, not ar: export it "
                       f"without --causal_lm (a diffusion LM is no causal LM)")
    hf_model, _ = _to_save(model, dtype)
    if hf_model is model.model:
        hf_model = copy.deepcopy(hf_model)  # the flag below must not change the caller's model
    hf_model.config.is_causal = True
    return write_export_folder(folder, hf_model, model.tokenizer, None, progress)
