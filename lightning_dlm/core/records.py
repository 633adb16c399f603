"""Config records from their dict form: checkpoints and exported folders store plain dicts."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Type, TypeVar

from lightning_dlm.core.errors import DLMError

T = TypeVar("T")


def _record_type(hint: Any):
    """The dataclass a field holds (``X`` or ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _is_tuple(hint: Any) -> bool:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint is tuple or typing.get_origin(hint) is tuple or (len(args) == 1 and typing.get_origin(args[0]) is tuple)


def coerce_config(cls: Type[T], value: Any) -> T:
    """``value`` as a ``cls`` record: the record itself, its dict form (nested records and tuples
    restored from the field types), or None for the defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        value = dict(value)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            item = value.get(field.name)
            hint = hints.get(field.name)
            record = _record_type(hint)
            if record is not None and isinstance(item, dict):
                value[field.name] = coerce_config(record, item)
            elif _is_tuple(hint) and isinstance(item, list):
                value[field.name] = tuple(item)
        try:
            return cls(**value)
        except TypeError as err:
            raise DLMError(f"bad {cls.__name__} record ({err}): was it written by this lightning_dlm?") from None
    raise DLMError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")
