"""Load or build Hugging Face causal LMs and tokenizers, with one-line errors for user mistakes."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from typing import Optional, Tuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.io.checksums import verify_folder
from lightning_dlm.io.releases import release_of
from lightning_dlm.model.config import BackboneConfig, MaskTokenConfig
from lightning_dlm.model.llada import LLaDAConfig  # noqa: F401 - registers LLaDA's class with transformers' Auto classes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config attributes that hold the position limit, by model family.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: explicit prefixes, deep paths, or an existing parent folder."""
    if name.startswith((".", "/", "~")):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_source(name: str, what: str) -> None:
    """Fail early on a local path that does not exist, or on a shipped folder whose files differ
    from the checksums kept beside it (:mod:`lightning_dlm.io.checksums`)."""
    verify_folder(os.path.expanduser(name))
    if _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise DLMError(
            f"{what} path '{name}' does not exist: run `make assets` for the demo assets, "
            f"or give a local folder or a Hugging Face hub name"
        )


def _hub_error(name: str, what: str, err: Exception) -> DLMError:
    first = first_line(err)
    return DLMError(f"could not load {what} '{name}' ({first}): check the name or path and your network access")


def resolve_hf_config(cfg: BackboneConfig) -> PretrainedConfig:
    """The transformers config of the model described by ``cfg`` (no weights loaded)."""
    overrides = dict(cfg.config or {})
    if cfg.pretrained is None:
        if not overrides:
            raise DLMError("model backbone needs `pretrained` (a hub name or folder) or `config` (with model_type)")
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            raise DLMError("backbone.config needs a `model_type` (e.g. llama, gpt2) to build a model from scratch")
        try:
            return AutoConfig.for_model(model_type, **overrides)
        except ValueError as err:
            raise DLMError(f"bad backbone.config: {err}") from None
    check_source(cfg.pretrained, "model")
    release = release_of(cfg.pretrained)
    try:
        if release is not None:  # a released diffusion LM: its config as our class's (never its auto_map)
            published = release.model_config(cfg.pretrained)
            config = AutoConfig.for_model(published.pop("model_type"), **published)
        else:
            config = AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(cfg.pretrained, "model", err) from None
    if not cfg.from_scratch:
        check_overrides(cfg, config)
    overrides.pop("model_type", None)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


#: Config keys that fix the weights' shapes (their names across families): overriding one of these on a
#: pretrained model would make its weights fail to load.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "ffn_dim", "d_model")


def check_overrides(cfg: BackboneConfig, config: PretrainedConfig) -> None:
    """A ``config:`` block next to ``pretrained`` may change options, not the model: refuse another
    model type or another shape in one line (the weights would not load, and the run would train a
    randomly initialised network)."""
    overrides = dict(cfg.config or {})
    wanted = overrides.get("model_type")
    if wanted is not None and wanted != config.model_type:
        raise DLMError(
            f"model.backbone.pretrained '{cfg.pretrained}' is a {config.model_type} model but model.backbone.config says "
            f"model_type {wanted}: drop the config block (--model.backbone.config null) to adapt the pretrained model, "
            f"or unset pretrained (--model.backbone.pretrained null) to build the config's model from scratch")
    for key in SHAPE_KEYS:
        if key in overrides and getattr(config, key, overrides[key]) != overrides[key]:
            raise DLMError(
                f"model.backbone.config sets {key}: {overrides[key]} but the pretrained model '{cfg.pretrained}' has "
                f"{key}: {getattr(config, key)}: drop the config block (--model.backbone.config null), or set "
                f"from_scratch: true to train a new model of that shape")


def check_loading_info(cfg: BackboneConfig, info: dict) -> None:
    """Missing, unexpected or mis-shaped weights of a pretrained load are an error unless
    ``backbone.allow_missing`` names them."""
    allowed = list(cfg.allow_missing or [])
    found = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        for item in info.get(kind) or []:
            name = item[0] if isinstance(item, (tuple, list)) else str(item)
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
                found.append((kind.replace("_keys", ""), name))
    if found:
        shown = ", ".join(f"{name} ({kind})" for kind, name in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise DLMError(
            f"loading '{cfg.pretrained}' left weights unloaded or unused: {shown}: it is not the model the config "
            f"describes; fix model.backbone.pretrained, or list the names in model.backbone.allow_missing")


def _check_attn(impl: str) -> None:
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise DLMError(
            "attn_implementation flash_attention_2 needs flash-attn: `pip install 'lightning_dlm[flash]'` "
            "on a CUDA machine, or use attn_implementation: sdpa"
        )


def load_causal_lm(cfg: BackboneConfig) -> PreTrainedModel:
    """Load pretrained weights, or build a randomly initialised model from a config."""
    _check_attn(cfg.attn_implementation)
    dtype = DTYPES[cfg.dtype]
    kwargs = dict(attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if cfg.pretrained is not None and not cfg.from_scratch and release_of(cfg.pretrained) is not None:
        model = release_causal_lm(cfg, resolve_hf_config(cfg), dtype)
    elif cfg.pretrained is not None and not cfg.from_scratch:
        config = resolve_hf_config(cfg)  # the pretrained config with the allowed overrides (refuses others)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=config, dtype=dtype,
                                                               output_loading_info=True, **kwargs)
        except (OSError, ValueError) as err:
            raise _hub_error(cfg.pretrained, "model", err) from None
        check_loading_info(cfg, info)
    else:
        config = resolve_hf_config(cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model


def release_causal_lm(cfg: BackboneConfig, config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The released diffusion LM ``cfg.pretrained`` (:mod:`lightning_dlm.io.releases`) as ``config``'s
    class: built on the meta device, then given the release's own tensors (renamed where its layout
    differs), so nothing is initialised twice; a weight missing or left over is an error unless
    ``allow_missing`` names it."""
    from accelerate import init_empty_weights

    state = release_of(cfg.pretrained).state_dict(cfg.pretrained)
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value.to(dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    check_loading_info(cfg, {"missing_keys": missing, "unexpected_keys": result.unexpected_keys})
    return model


def mask_token_config(cfg: BackboneConfig, tokenizer) -> MaskTokenConfig:
    """``cfg.mask_token``, or for a released diffusion LM its own mask token (reused, never added): a
    ``mask_token`` block that names another is refused in one line."""
    release = release_of(cfg.pretrained) if cfg.pretrained else None
    if release is None:
        return cfg.mask_token
    mask_id = int(release.mask_token(cfg.pretrained, release.published_config(cfg.pretrained) or {}, tokenizer))
    given = cfg.mask_token
    if given == MaskTokenConfig() or (given.mode == "reuse" and (
            given.id == mask_id or (given.id is None and tokenizer.get_vocab().get(given.token) == mask_id))):
        return MaskTokenConfig(mode="reuse", id=mask_id)
    raise DLMError(f"model.backbone.pretrained '{cfg.pretrained}' is the {release.title} release, whose mask token is "
                   f"{tokenizer.convert_ids_to_tokens(mask_id)!r} (id {mask_id}), but model.backbone.mask_token asks "
                   f"for another: drop the mask_token block (the release's own is reused)")


def load_tokenizer(source: Optional[str], trust_remote_code: bool = False):
    if source is None:
        raise DLMError("no tokenizer given: set backbone.tokenizer (or backbone.pretrained) to a hub name or folder")
    check_source(source, "tokenizer")
    release = release_of(source)
    if release is not None:  # a released diffusion LM's tokenizer through a transformers class (never its auto_map)
        return release.tokenizer(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, "tokenizer", err) from None
    return tokenizer


def start_and_pad_ids(tokenizer) -> Tuple[Optional[int], int]:
    """(start, pad) ids of a tokenizer: the token that leads a sequence (BOS, else EOS, else
    None) and the padding id (PAD, else the start token, else 0)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (start if start is not None else 0)
    return start, pad


def max_positions(config: PretrainedConfig) -> Optional[int]:
    """The longest sequence the model's position embeddings allow (None when unbounded/unknown)."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
