"""Regional compilation: each decoder layer of the backbone compiled on its own (``backbone.compile``).

Compiling the repeated block rather than the whole model is what torchtitan does (``apply_compile``
compiles every ``TransformerBlock``) and what PyTorch's "regional compilation" recipe recommends:
one graph, compiled once and reused by every layer of the same shape, so compile time does not
grow with depth, while inductor still fuses the elementwise work inside a layer (RMSNorm, RoPE,
the SiLU gate, residual adds) into a few kernels. ``nn.Module.compile()`` compiles a module in
place, so parameter names, ``state_dict`` keys, checkpoints and FSDP wrapping stay those of the
eager model.

Inductor needs a C++ compiler for CPU kernels and Triton for CUDA kernels:
:func:`check_compile_support` refuses, in one line, a machine that has neither for the device.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import List

import torch
from torch import nn

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.layers import decoder_layer_classes, decoder_layers

#: the C++ compilers inductor looks for on the CPU (``CXX`` first, as inductor does)
CPU_COMPILERS = ("g++", "clang++", "c++")


def compiled_layers(model: nn.Module) -> List[nn.Module]:
    """The decoder layers regional compilation compiles: the same units FSDP shards, the instances of
    the model's own ``_no_split_modules`` classes (:mod:`lightning_dlm.model.layers`)."""
    return decoder_layers(model, decoder_layer_classes(model, option="backbone.compile"))


def cpu_compiler() -> str:
    """The C++ compiler inductor would use on the CPU ('' when there is none)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    for name in names + list(CPU_COMPILERS):
        path = shutil.which(name)
        if path:
            return path
    return ""


def check_compile_support(device: torch.device) -> None:
    """Refuse, in one line, a device torch.compile (inductor) cannot generate kernels for."""
    device = torch.device(device)
    if device.type == "cpu" and not cpu_compiler():
        raise DLMError("backbone.compile: true needs a C++ compiler for torch.compile on the CPU (none found: "
                       "install g++ or clang++, or set CXX), or set backbone.compile: false")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise DLMError("backbone.compile: true needs Triton for torch.compile on CUDA (not installed: pip install "
                       "triton, the version your torch build names), or set backbone.compile: false")
    if device.type not in ("cpu", "cuda"):
        raise DLMError(f"backbone.compile: true is tested on cpu and cuda only, not {device.type}: "
                       f"set backbone.compile: false")


def compile_decoder_layers(model: nn.Module, device, backend: str = "inductor") -> int:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); the number compiled.

    Each layer's forward is compiled lazily at its first call (fullgraph is not required: a family
    whose layer has a graph break still runs, partly eager). ``backend``: torch.compile's
    (``eager`` traces without generating kernels: the benchmarks' quick CPU check)."""
    if backend == "inductor":
        check_compile_support(device)
    layers = compiled_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
