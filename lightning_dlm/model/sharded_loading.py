"""Pretrained weights into a sharded (FSDP) model with about one copy of the weights per node.

Loading a 7B model the plain way makes every rank read the full float32 weights into CPU memory
before FSDP shards them (about 27 GB a rank, 216 GB on an 8-GPU node). Here instead:

1. every rank builds the architecture with its **parameters on the meta device** (no memory) and
   its buffers real (``accelerate.init_empty_weights(include_buffers=False)``: non-persistent
   buffers such as the rotary ``inv_freq`` are computed from the config, not stored in weights);
2. FSDP wraps it and :func:`materialize_meta` (its ``param_init_fn``) gives each unit empty
   storage on the device, which FSDP shards at once;
3. rank 0 alone reads the pretrained weights (and applies the mask-token change to them), and
   :func:`broadcast_into_sharded` sends them one FSDP unit at a time into the gathered unit of
   every rank; leaving the unit keeps each rank's shard. (torch's ``set_model_state_dict(...,
   broadcast_from_rank0=True)`` keeps a full copy on every rank for FSDP1 modules, which is the
   thing to avoid; it is used only for FSDP2/DTensor models, which it distributes shard-wise.)

A non-zero rank then holds its shards plus one unit in flight; rank 0 one full copy plus its
shards. The mask-token row of an added token is computed on rank 0 from the real weights, so the
result equals the unsharded load exactly (tested on 2 CPU processes in tests/test_sharded_loading.py).
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.config import BackboneConfig
from lightning_dlm.model.loading import DTYPES, resolve_hf_config


def loads_pretrained_weights(cfg: BackboneConfig) -> bool:
    """Whether ``cfg`` loads pretrained weights (rather than building a random model)."""
    return cfg.pretrained is not None and not cfg.from_scratch


def build_empty_causal_lm(cfg: BackboneConfig) -> PreTrainedModel:
    """The causal LM of ``cfg`` with every parameter on the meta device and real buffers."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise DLMError("loading weights into a sharded model needs accelerate: pip install accelerate") from None
    config = resolve_hf_config(cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    return model


@torch.no_grad()
def materialize_meta(module: nn.Module, device: torch.device) -> None:
    """FSDP's ``param_init_fn``: empty storage on ``device`` for this module's own meta parameters
    and buffers (not its children's; FSDP calls it per module). Real buffers are kept. The values
    are written afterwards by :func:`broadcast_into_sharded`."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta:
            module.register_parameter(name, nn.Parameter(torch.empty_like(param, device=device),
                                                         requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.is_meta:
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, torch.empty_like(buffer, device=device), persistent=persistent)


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _unit_tensors(unit: nn.Module, names: Dict[int, str], fsdp_cls) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name relative to the root, parameter) of the parameters an FSDP unit owns: those of its
    module tree, not of the FSDP units nested in it."""
    stack = [unit.module]
    while stack:
        module = stack.pop()
        for pname, param in module.named_parameters(recurse=False):
            base = names[id(module)]
            yield (f"{base}.{pname}" if base else pname), param
        stack.extend(child for child in module.children() if not isinstance(child, fsdp_cls))


@torch.no_grad()
def broadcast_into_sharded(root: nn.Module, full_state_dict: Optional[Dict[str, torch.Tensor]], prefix: str = "") -> None:
    """Write rank 0's ``full_state_dict`` (keys relative to the causal LM; None on the other
    ranks) into the FSDP-sharded ``root``, where the causal LM sits under ``prefix``.

    One FSDP unit at a time: its parameters are gathered (``summon_full_params(recurse=False,
    writeback=True)``), rank 0 copies the weights in and broadcasts them into every rank's
    gathered copy, and leaving the context keeps each rank's shard. So a rank holds its shards
    plus one unit, never the model. Every parameter and persistent buffer must be given (checked
    on rank 0 first; every rank stops with the same error). A model without FSDP units (FSDP2's
    DTensors) goes through torch's ``set_model_state_dict(broadcast_from_rank0=True)``.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0 and full_state_dict is None:
        raise DLMError("rank 0 must give the full state dict to broadcast")
    units = FSDP.fsdp_modules(root)
    if not units:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {prefix + k: v for k, v in full_state_dict.items()} if rank == 0 else {}
        set_model_state_dict(root, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   strict=True))
        return
    names = {id(module): _clean(name) for name, module in root.named_modules()}
    persistent = _persistent_buffers(root)
    error = [None]
    if rank == 0:
        needed = [_clean(n) for n, _ in root.named_parameters()] + [n for n, _ in persistent]
        missing = [n for n in needed if n.removeprefix(prefix) not in full_state_dict]
        if missing:
            error = [f"the weights to load lack {len(missing)} tensor(s), e.g. {missing[0]}: "
                     f"load weights of this architecture"]
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise DLMError(error[0])

    def fill(name: str, tensor: torch.Tensor) -> None:
        if rank == 0:
            tensor.copy_(full_state_dict[name.removeprefix(prefix)])
        if dist.is_initialized():
            dist.broadcast(tensor, src=0)

    for unit in units:
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for name, param in _unit_tensors(unit, names, FSDP):
                fill(name, param.data)
    for name, buffer in persistent:  # FSDP keeps buffers whole on every rank
        fill(name, buffer)


def _persistent_buffers(root: nn.Module):
    """(name, buffer) of the buffers a state dict holds (names without wrapper segments)."""
    out = []
    for module_name, module in root.named_modules():
        for bname, buffer in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                base = _clean(module_name)
                out.append(((f"{base}.{bname}" if base else bname), buffer))
    return out
