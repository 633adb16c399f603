"""LoRA adapters through ``peft`` (``model.backbone.lora``), merged into the weights on export.

:func:`apply_lora` injects the adapters into the transformers model in place (``peft.get_peft_model``;
the model object stays the same causal LM, so :class:`DiffusionModel` runs it unchanged), freezes
every other weight and keeps the mask token's embedding row trainable through peft's
``trainable_token_indices`` (a delta on that row only; tied input/output embeddings share it). The
peft wrapper is remembered per model so that :func:`merged` / :func:`merge_in_place` can merge the
adapters into plain weights (``merge_and_unload``): exports and checkpoint loads hold no adapters.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Union

from torch import nn

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.config import LoraOptions

#: transformers model -> its peft tuner (LoraModel); weak, so a dropped model drops its tuner
_TUNERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def lora_options(value: Union[LoraOptions, dict, None]) -> LoraOptions | None:
    """``value`` as :class:`LoraOptions` (checkpoints store the dict form)."""
    if value is None or isinstance(value, LoraOptions):
        return value
    try:
        return LoraOptions(**dict(value))
    except TypeError as err:
        raise DLMError(f"bad model.backbone.lora ({err}): give r, alpha, dropout and target_modules") from None


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``target_modules`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def check_targets(model: nn.Module, targets: list[str]) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise DLMError(f"model.backbone.lora.target_modules {missing} are not modules of this model: choose among its "
                       f"linear layers {linear_module_names(model)}")


def apply_lora(model: nn.Module, options: Union[LoraOptions, dict], mask_token_id: int) -> nn.Module:
    """Inject LoRA adapters into ``model`` (in place; returned) and leave trainable only them and the
    mask token's embedding row."""
    options = lora_options(options)
    if options.r < 1:
        raise DLMError(f"model.backbone.lora.r must be >= 1, got {options.r}")
    if not options.target_modules:
        raise DLMError("model.backbone.lora.target_modules is empty: name the linear layers to adapt, e.g. [q_proj, v_proj]")
    check_targets(model, list(options.target_modules))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DLMError("model.backbone.lora needs peft: pip install peft") from None
    embedding = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embedding).rsplit(".", 1)[-1]
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules),
                        trainable_token_indices={embedding_name: [int(mask_token_id)]})
    wrapped = get_peft_model(model, config)
    _TUNERS[model] = wrapped.base_model
    return model


def has_lora(model: nn.Module) -> bool:
    return model in _TUNERS


def merge_in_place(model: nn.Module) -> nn.Module:
    """Merge the adapters of ``model`` into its weights and remove them (returns the plain model)."""
    tuner = _TUNERS.pop(model, None)
    return model if tuner is None else tuner.merge_and_unload()


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters merged into the weights (``model`` itself without adapters)."""
    tuner = _TUNERS.get(model)
    if tuner is None:
        return model
    return copy.deepcopy(tuner).merge_and_unload()


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]
