"""Liger-Kernel's fused modules in the backbone (``backbone.kernels: liger``, CUDA only).

What is fused, and how:

* **RMSNorm**: every RMSNorm module of a LLaMA-style family is replaced by Liger's public
  ``LigerRMSNorm`` module (one Triton kernel forward and backward instead of the fp32 upcast,
  square, mean, rsqrt and two multiplies); the weight ``Parameter`` is moved over, so names and
  checkpoints are unchanged.
* **SwiGLU**: every gated MLP (``gate_proj`` / ``up_proj`` / ``down_proj``, SiLU) is replaced by
  Liger's ``LigerSwiGLUMLP`` holding the same three linear layers (the SiLU-gate product in one
  kernel).
* **Cross-entropy on the scored rows**: :meth:`FusedRowCrossEntropy.__call__` runs Liger's
  ``LigerFusedLinearCrossEntropyLoss`` on the hidden states of the scored rows and the LM head's
  weight, chunk by chunk, so the (N, V) logits are never materialised (what matters for 128K
  vocabularies); ``reduction="none"`` keeps one CE per row for the ELBO's per-sequence weights
  (Liger >= 0.8.5 folds a per-row upstream gradient in before it sums over rows).

Not RoPE: Liger applies its rotary kernel by replacing transformers' module-level
``apply_rotary_pos_emb`` function (``apply_liger_kernel_to_llama``), which is a monkey patch of
transformers that this project does not do; ``backbone.compile: true`` fuses RoPE's elementwise
work inside each compiled layer instead. Liger's ``apply_liger_kernel_to_*`` entry points are not
used for the same reason: the modules above are swapped explicitly, in this model instance only.

Source: Liger-Kernel (linkedin/Liger-Kernel), ``liger_kernel.transformers`` public modules.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, Optional

import torch
from torch import nn

from lightning_dlm.core.errors import DLMError

LIGER = "liger"
KERNELS = ("plain", LIGER)
#: families whose RMSNorm is ``weight * x / rms(x)`` computed in fp32 (Liger's "llama" casting mode)
#: and whose MLP is the SiLU-gated one
LIGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
INSTALL = "pip install 'lightning_dlm[liger]'"


def check_liger(device, model_type: Optional[str] = None) -> None:
    """Refuse, in one line, ``kernels: liger`` where it cannot run."""
    device = torch.device(device)
    if device.type != "cuda":
        raise DLMError(f"backbone.kernels: liger runs on CUDA only (this run is on {device.type}): "
                       f"set backbone.kernels: plain, or train on a GPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise DLMError(f"backbone.kernels: liger needs the liger-kernel package (not installed): {INSTALL}, "
                       f"or set backbone.kernels: plain")
    if model_type is not None and model_type not in LIGER_FAMILIES:
        raise DLMError(f"backbone.kernels: liger is wired for {', '.join(LIGER_FAMILIES)} only, not {model_type}: "
                       f"set backbone.kernels: plain")


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def swap_liger_modules(model: nn.Module) -> Dict[str, int]:
    """Replace the RMSNorm and gated-MLP modules of ``model`` (a transformers causal LM of
    :data:`LIGER_FAMILIES`) by Liger's, keeping their parameters; the counts replaced."""
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    counts = {"rms_norm": 0, "swiglu": 0}
    targets = [(name, module) for name, module in model.named_modules() if _is_rms_norm(module) or _is_gated_mlp(module)]
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _is_rms_norm(old):
            eps = getattr(old, "variance_epsilon", getattr(old, "eps", 1e-6))
            with torch.device("meta"):
                new = LigerRMSNorm(old.weight.shape[0], eps=eps, offset=0.0, casting_mode="llama")
            new.weight = old.weight
            counts["rms_norm"] += 1
        else:
            with torch.device("meta"):
                new = LigerSwiGLUMLP(config)
            new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
            counts["swiglu"] += 1
        setattr(parent, child, new)
    return counts


class FusedRowCrossEntropy:
    """CE (N,) of the scored rows from their hidden states (N, H) and the LM head, through Liger's
    fused linear cross-entropy (the logits are computed and consumed chunk by chunk)."""

    def __init__(self):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        self.loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def __call__(self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
        out = self.loss(head.weight, hidden.contiguous(), targets, getattr(head, "bias", None))
        return (out[0] if isinstance(out, tuple) else out).float()


def apply_liger(net, device) -> Dict[str, int]:
    """``backbone.kernels: liger`` on a :class:`~lightning_dlm.model.DiffusionModel`: checks, swaps
    the modules and gives the model the fused row cross-entropy. The counts replaced."""
    check_liger(device, getattr(net.config, "model_type", None))
    counts = swap_liger_modules(net.model)
    net.fused_row_ce = FusedRowCrossEntropy()
    return counts
