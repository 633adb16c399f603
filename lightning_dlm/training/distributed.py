"""Multi-device training helpers: early device checks and gradient clipping under FSDP.

* :func:`check_devices` runs on the parsed ``trainer`` config before anything is built or
  written, and turns "FSDP (or a GPU accelerator) on a machine without CUDA" into one line that
  says what to use instead (Lightning would stop later, with a traceback).
* :func:`clip_grad_norm_sharded` clips gradients by their global norm under FSDP, which
  Lightning's FSDP precision plugin refuses (``gradient_clip_algorithm='norm'`` is "not
  supported"): ``torch.nn.utils.clip_grad_norm_`` on sharded parameters would see each rank's
  shard only, so under FSDP1 the norm has to come from the root FSDP module. Under FSDP2 the
  gradients are DTensors: ``torch.nn.utils.get_total_norm`` over them is a DTensor whose full
  value is the norm over every shard (torchtitan's ``clip_grad_norm_`` does the same).

FSDP2 (``--trainer.strategy fsdp2``) may run on CPU processes over gloo when the accelerator is
``cpu`` explicitly (the tests do); with ``auto`` or ``gpu`` on a machine without CUDA it is one line.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from lightning_dlm.core.errors import DLMError

_GPU_ACCELERATORS = ("gpu", "cuda")


def _class_path(value: Any) -> Optional[str]:
    """``class_path`` of a parsed ``{class_path, init_args}`` entry (a jsonargparse Namespace or dict)."""
    if isinstance(value, dict):
        return value.get("class_path")
    return getattr(value, "class_path", None)


FSDP2_NAMES = ("fsdp2",)  # lightning_dlm.training.fsdp2.STRATEGY_NAME (registered there)


def _is_kind(strategy: Any, base: type, names) -> bool:
    if isinstance(strategy, base):
        return True
    if isinstance(strategy, str):
        return strategy in names
    path = _class_path(strategy)
    if not path:
        return False
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return name == base.__name__
    return isinstance(cls, type) and issubclass(cls, base)


def _is_fsdp(strategy: Any) -> bool:
    return _is_kind(strategy, FSDPStrategy, FSDPStrategy.get_registered_strategies())


def _is_fsdp2(strategy: Any) -> bool:
    return _is_kind(strategy, ModelParallelStrategy, FSDP2_NAMES)


def check_devices(trainer: Any, cuda_available: Optional[bool] = None) -> None:
    """Refuse, as one line, a trainer config that needs CUDA GPUs where there are none.

    ``trainer`` is the parsed ``trainer`` section (a jsonargparse Namespace or a dict).
    """
    get = trainer.get if isinstance(trainer, dict) else lambda key, default=None: getattr(trainer, key, default)
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    strategy, accelerator = get("strategy", "auto"), get("accelerator", "auto")
    accelerator_name = accelerator if isinstance(accelerator, str) else (_class_path(accelerator) or "")
    if _is_fsdp(strategy):
        if not cuda:
            raise DLMError(
                "trainer.strategy FSDP needs CUDA GPUs and this machine has none: on a CPU use "
                "--trainer.strategy auto (one process) or ddp (with --trainer.devices N), and --trainer.accelerator cpu"
            )
        if accelerator_name == "cpu":
            raise DLMError(
                "trainer.strategy FSDP runs on GPUs only, but trainer.accelerator is cpu: set --trainer.accelerator gpu, "
                "or use --trainer.strategy ddp to train on CPUs"
            )
    if _is_fsdp2(strategy) and not cuda and accelerator_name != "cpu":
        raise DLMError(
            "trainer.strategy fsdp2 needs CUDA GPUs and this machine has none: on a CPU use --trainer.strategy auto "
            "(one process) or ddp (with --trainer.devices N), or --trainer.accelerator cpu to run FSDP2 on CPU "
            "processes over gloo (slow; for tests)"
        )
    if accelerator_name.lower() in _GPU_ACCELERATORS and not cuda:
        raise DLMError(
            f"trainer.accelerator is {accelerator_name} but no CUDA GPU is visible: "
            "use --trainer.accelerator cpu (or auto), or install the CUDA build of torch on a GPU machine"
        )


def global_grad_norm(parameters) -> Optional[torch.Tensor]:
    """The 2-norm over every gradient of ``parameters`` (DTensor gradients: over every shard, the
    same plain tensor on every rank); None when no parameter has a gradient."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    full = getattr(total, "full_tensor", None)  # a DTensor (FSDP2): its value over all shards
    return full() if full is not None else total


def clip_grad_norm_sharded(strategy: Strategy, max_norm: float) -> Optional[torch.Tensor]:
    """Clip by the global gradient norm when ``strategy`` shards parameters (FSDP1 or FSDP2).

    Returns the total norm before clipping, or None when the strategy does not shard (the
    caller then clips the usual way).
    """
    if isinstance(strategy, ModelParallelStrategy):
        params = [p for p in strategy.model.parameters() if p.grad is not None]
        total = global_grad_norm(params)
        if total is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total if total is not None else torch.zeros(())
    if not isinstance(strategy, FSDPStrategy):
        return None
    root = strategy.model
    if root is None or not hasattr(root, "clip_grad_norm_"):
        raise DLMError("gradient clipping under FSDP found no wrapped model: clip after the strategy set the model up")
    return root.clip_grad_norm_(max_norm)
