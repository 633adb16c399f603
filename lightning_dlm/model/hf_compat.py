"""What differs between the transformers versions this project runs on, in one place.

The CPU machines run transformers 5.24; the lent GPU machine carries 5.17 (and cannot install
another). Between them:

* the KV cache: 5.24 passes a model its ``Cache`` as ``cache=`` and returns it as the output's
  ``cache`` field (``past_key_values`` deprecated); 5.17 names both ``past_key_values``, and its
  models swallow an unknown ``cache=`` in ``**kwargs`` without a word, so a cache passed under the
  wrong name is silently not used. :func:`cache_keyword` reads the name from the model's own
  ``forward`` signature;
* a ``StaticCache`` is cropped by ``crop(-n)`` in 5.24; 5.17's static layers have no ``crop``
  (:func:`drop_last`);
* activation checkpointing is ``activation_checkpointing_enable`` in 5.24 (the old
  ``gradient_checkpointing_enable`` a deprecated alias), only the old name in 5.17
  (:func:`enable_activation_checkpointing`).

Each helper takes the current API where the installed version has it, so no deprecated call is
made on 5.24.
"""

from __future__ import annotations

import inspect
from typing import Any

NAMES = ("cache", "past_key_values")  # the current name first


def cache_keyword(model) -> str:
    """The keyword ``model.forward`` takes its KV cache under (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    for name in NAMES:
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes no KV cache (neither {' nor '.join(NAMES)})")


def returned_cache(out) -> Any:
    """The ``Cache`` a forward pass returned (its output's ``cache`` or ``past_key_values``), or None."""
    for name in NAMES:
        if name in out:  # a ModelOutput lists the fields that are set
            return out[name]
    return None


def drop_last(cache, tokens: int) -> None:
    """Drop the last ``tokens`` positions of a transformers ``StaticCache`` in place: only its
    length counters move, the tensors keep their addresses (for graph capture), so the next pass
    overwrites the dropped columns. transformers 5.24 does this as ``StaticCache.crop(-tokens)``;
    5.17's static layers have no ``crop``, only the same public ``cumulative_length`` counter."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    layers = list(cache.layers)
    if all(hasattr(layer, "crop") for layer in layers):
        cache.crop(-tokens)
        return
    for layer in layers:
        layer.cumulative_length.sub_(tokens)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of ``model``'s decoder layers (``torch.utils.checkpoint``
    with ``use_reentrant=False``, which FSDP2 and torch.compile compose with)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.17
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
