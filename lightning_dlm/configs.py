"""Config records from their dict form: checkpoints and exported folders store plain dicts."""

from __future__ import annotations

from typing import Any, Type, TypeVar

from lightning_dlm.errors import DLMError

T = TypeVar("T")


def coerce_config(cls: Type[T], value: Any) -> T:
    """``value`` as a ``cls`` record: the record itself, its dict form (nested records and tuples
    restored), or None for the defaults."""
    from lightning_dlm.model.config import BackboneConfig, MaskTokenConfig
    from lightning_dlm.optim import OptimConfig

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        value = dict(value)
        if cls is BackboneConfig and isinstance(value.get("mask_token"), dict):
            value["mask_token"] = MaskTokenConfig(**value["mask_token"])
        if cls is OptimConfig and "betas" in value:
            value["betas"] = tuple(value["betas"])
        try:
            return cls(**value)
        except TypeError as err:
            raise DLMError(f"bad {cls.__name__} record ({err}): was it written by this lightning_dlm?") from None
    raise DLMError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")
