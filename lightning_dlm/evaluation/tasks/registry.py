"""The task registry: ``register_task`` files a task class under its ``kind``; ``build_task``
makes one from a YAML / CLI spec, with one-line errors for an unknown kind or option.

The package (:mod:`lightning_dlm.evaluation.tasks`) imports every module that registers tasks
(:mod:`.builtin`, :mod:`.sft`), so the registry is complete whenever the package is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from lightning_dlm.core.errors import DLMError

#: kind -> task class (a dataclass of its options with ``run(evaluator, bar) -> metrics``)
TASKS: Dict[str, type] = {}


def register_task(cls: type) -> type:
    """Class decorator: file ``cls`` under ``cls.kind`` (a kind registered twice is a bug)."""
    kind = getattr(cls, "kind", None)
    if not kind:
        raise DLMError(f"task class {cls.__name__} has no kind")
    if kind in TASKS and TASKS[kind] is not cls:
        raise DLMError(f"task kind '{kind}' is registered twice ({TASKS[kind].__name__} and {cls.__name__})")
    TASKS[kind] = cls
    return cls


def build_task(spec: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None):
    """A task from ``{"task": <kind>, "name": ..., <options>}``, with clear errors for unknown keys."""
    spec = dict(spec)
    kind = spec.pop("task", None) or spec.pop("type", None)
    if kind not in TASKS:
        raise DLMError(f"unknown task '{kind}': choose one of {sorted(TASKS)}")
    cls = TASKS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise DLMError(f"task '{kind}' has no option(s) {unknown}: its options are {sorted(names)}")
    options = {k: v for k, v in (defaults or {}).items() if k in names and k not in spec}
    options.update(spec)
    options.setdefault("name", kind)
    return cls(**options)
