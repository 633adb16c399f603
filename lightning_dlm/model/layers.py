"""Which module classes are a model's decoder layers: the unit that FSDP shards (and gathers) one
at a time and that activation checkpointing recomputes.

A transformers model names them itself in ``_no_split_modules``, the documented class attribute
that tells ``device_map="auto"`` which blocks must stay whole on one device (``["LlamaDecoderLayer"]``
for LLaMA, ``["Qwen2DecoderLayer"]`` for Qwen2, ``["GPT2Block"]`` for GPT-2). So a config need not
name the class: :func:`decoder_layer_classes` takes it from the model, and a config that names one
the model does not have is refused in one line (a typo there would otherwise shard the whole model
as one unit, i.e. no sharding, without a word).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

from torch import nn

from lightning_dlm.core.errors import DLMError

ClassName = Union[str, type]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _classes_in(model: nn.Module) -> Dict[str, type]:
    """Every module class in ``model``, by short and by qualified name."""
    found: Dict[str, type] = {}
    for module in model.modules():
        cls = type(module)
        found.setdefault(cls.__name__, cls)
        found.setdefault(_qualified(cls), cls)
    return found


def _model_name(model: nn.Module) -> str:
    inner = getattr(model, "model", None)  # DiffusionModel -> its transformers model
    return type(inner if isinstance(inner, nn.Module) and hasattr(inner, "config") else model).__name__


def no_split_names(model: nn.Module) -> Tuple[str, ...]:
    """The class names the model's transformers classes give in ``_no_split_modules`` (outermost first)."""
    names = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return tuple(names)


def decoder_layer_classes(backbone: nn.Module, names: Optional[Iterable[ClassName]] = None,
                          option: str = "the wrap class") -> Tuple[type, ...]:
    """The module classes of ``backbone`` to shard (and checkpoint) one instance at a time.

    ``names``: the classes a config names (short names such as ``LlamaDecoderLayer``, qualified
    names, or classes); None or empty: the model's own ``_no_split_modules``. Each must be a class
    of a module inside ``backbone``, else a :class:`DLMError` names it, the model and the fix.
    ``option`` is the config key the error names.
    """
    present = _classes_in(backbone)
    model = _model_name(backbone)
    wanted: Sequence[ClassName] = list(names or ())
    if not wanted:
        wanted = [name for name in no_split_names(backbone) if name in present]
        if not wanted:
            raise DLMError(
                f"{model} names no decoder layer class (_no_split_modules) to shard: set {option} to the class "
                f"of its repeated blocks (one of {', '.join(sorted(n for n in present if '.' not in n)[:8])})")
    out = []
    for name in wanted:
        key = _qualified(name) if isinstance(name, type) else str(name)
        cls = present.get(key)
        if cls is None:
            own = ", ".join(no_split_names(backbone)) or "none"
            raise DLMError(
                f"{option} '{key}' is not a module of the model {model} (its decoder layers: {own}): name one of "
                f"those, or leave {option} unset to take the model's own")
        if cls not in out:
            out.append(cls)
    return tuple(out)


def decoder_layers(backbone: nn.Module, classes: Tuple[type, ...]) -> list:
    """The instances of ``classes`` in ``backbone``, in module order, leaving out any nested in
    another one (an FSDP unit holds its sub-blocks)."""
    found: list = []
    inside: set = set()
    for module in backbone.modules():
        if id(module) in inside:
            continue
        if isinstance(module, classes):
            found.append(module)
            inside.update(id(child) for child in module.modules())
    return found
