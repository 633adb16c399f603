"""Training throughput: tokens/s and model FLOPs utilisation (MFU), with the FLOPs measured.

The FLOPs of a training micro-batch are *counted*, not estimated from a formula: the first
training micro-batch of a fit runs under :class:`FlopCounter` (torch's per-op FLOP formulas for
matmuls and attention kernels, forward and backward, exactly as the step executes them: the
diffusion loss, the LM head on the scored rows only, the annealing mask path). Counting changes
no bit of the step, so a resumed run (which measures its own first micro-batch) still matches an
uninterrupted one exactly. Forward
recomputed in the backward pass by activation checkpointing (transformers'
``gradient_checkpointing`` or FSDP's ``activation_checkpointing_policy``) is counted separately
and left out of the model FLOPs, so MFU does not reward recomputation; the FLOPs with it are
logged as ``perf/hfu`` (hardware FLOPs utilisation) when there are any.

Logged on the optimiser steps the logger writes (every ``trainer.log_every_n_steps``, and the
last step), over a rolling window of at least the last ``window`` optimiser steps (validation and
the measured step are left out of the window). The device is synchronised only on those steps
(and once at the start and after each validation), so the timing points are exact without a host
sync at every step:

* ``perf/tokens_per_s``: tokens per second over all ranks;
* ``perf/tokens_per_s_per_device``;
* ``perf/flops_per_s_per_device``: achieved model FLOP/s of one device;
* ``perf/mfu``: that divided by the device's peak FLOP/s for the training precision (the
  ``peak_flops`` option, or Lightning's table of GPUs plus the H200); on a device with no known
  peak (a CPU) MFU is not logged, which one info line says.

Block mode (``diffusion.attention: block``) runs the noised and the clean copy of each row side
by side, 2L positions per row: the counted FLOPs are those of the 2L pass (about twice a
bidirectional step's), while tokens/s counts the L data tokens of each row, the rate the corpus
is consumed at; FLOPs per token is therefore about twice a bidirectional run's.

The LM head runs on the scored rows only, so a step's FLOPs move slightly with the noise draw
(the masked fraction); the measured micro-batch stands for all of them. With
``attn_implementation: flex_attention`` nothing can be counted (transformers compiles
FlexAttention, and torch.compile does not run under a dispatch mode): the callback says so and
logs tokens/s, and MFU too when ``flops_per_micro_batch`` is given (the same step's FLOPs as
counted with ``sdpa``: the attention arithmetic is the same).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Deque, Optional, Tuple

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils._python_dispatch import TorchDispatchMode  # no public path in torch 2.13 (tests/test_public_api.py)
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from lightning_dlm.core.errors import DLMError

_aten = torch.ops.aten


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's formulas (matmuls, convolutions, the CUDA attention kernels, FlexAttention), plus the CPU
# flash-attention kernel, which has the same arithmetic.
_FORMULAS = {
    **flop_registry,
    _aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_sdpa_forward),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_sdpa_backward),
}


# Attention ops whose (query, key, value) start at this argument (the backward ops take grad_out first).
_QKV_AT = {
    _aten._scaled_dot_product_flash_attention: 0, _aten._scaled_dot_product_efficient_attention: 0,
    _aten._scaled_dot_product_cudnn_attention: 0, _aten._scaled_dot_product_flash_attention_for_cpu: 0,
    _aten._scaled_dot_product_flash_attention_backward: 1, _aten._scaled_dot_product_efficient_attention_backward: 1,
    _aten._scaled_dot_product_cudnn_attention_backward: 1, _aten._scaled_dot_product_flash_attention_for_cpu_backward: 1,
}


def broadcast_kv_heads(packet, args: tuple) -> tuple:
    """Arguments of a (B, H, S, D) attention op with grouped-query key/value heads broadcast to the
    query's head count (as the kernel computes them), for FLOP formulas that require equal heads
    (torch < 2.13's); shapes only: the stand-ins live on the meta device."""
    at = _QKV_AT.get(packet)
    if at is None or len(args) < at + 3:
        return args
    query, key, value = args[at:at + 3]
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (query, key, value)):
        return args
    heads = query.shape[1]
    if key.shape[1] == heads or heads % key.shape[1]:
        return args
    key = torch.empty((key.shape[0], heads, *key.shape[2:]), device="meta")
    value = torch.empty((value.shape[0], heads, *value.shape[2:]), device="meta")
    return (*args[:at], query, key, value, *args[at + 3:])


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the ops that run inside it, with torch's formulas.

    Unlike ``torch.utils.flop_counter.FlopCounterMode`` it runs every op exactly as it would run
    without it: no decomposition into other ops and no module-tracking autograd hooks (both change
    the last bits of the gradients, which would make a measured run differ from a resumed one).
    """

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", func)
        formula = _FORMULAS.get(packet)
        if formula is not None:
            self.total += formula(*broadcast_kv_heads(packet, args), **kwargs, out_val=out)
        return out


_PRECISION_DTYPES = {
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
    "16": torch.float16, "16-mixed": torch.float16, "16-true": torch.float16,
    "32": torch.float32, "32-true": torch.float32, "64": torch.float64, "64-true": torch.float64,
}


class StepFlops:
    """FLOPs counted over one training micro-batch: forward, backward, and recomputed forward.

    ``start()`` before the forward, ``backward_starts()`` / ``backward_ends()`` around the
    backward pass, ``stop()`` at the end. Any module forward that runs between the two backward
    calls is activation-checkpoint recomputation (a normal backward calls no module forward).
    """

    def __init__(self):
        self.counter = FlopCounter()
        self.forward = 0
        self.backward = 0
        self.recompute = 0
        self._depth = 0
        self._entered_at = 0
        self._hooks = []
        self._active = False

    @property
    def model_flops(self) -> int:
        """Forward + backward without recomputation."""
        return self.forward + self.backward - self.recompute

    @property
    def hardware_flops(self) -> int:
        """What the device executed, recomputation included."""
        return self.forward + self.backward

    def start(self) -> None:
        self.counter.__enter__()
        self._active = True

    def backward_starts(self) -> None:
        self.forward = self.counter.total
        hooks = torch.nn.modules.module
        self._hooks = [
            hooks.register_module_forward_pre_hook(self._recompute_enters),
            # always_call: non-reentrant checkpointing may stop a recomputation early by raising
            hooks.register_module_forward_hook(self._recompute_leaves, always_call=True),
        ]

    def backward_ends(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.backward = self.counter.total - self.forward

    def stop(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._active:
            self._active = False
            self.counter.__exit__(None, None, None)

    def _recompute_enters(self, module, args) -> None:
        if self._depth == 0:
            self._entered_at = self.counter.total
        self._depth += 1

    def _recompute_leaves(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.recompute += self.counter.total - self._entered_at


def uncountable_reason(pl_module) -> Optional[str]:
    """Why the FLOPs of this module's training step cannot be counted, or None if they can."""
    net = getattr(pl_module, "net", None)
    if getattr(net, "attn_implementation", None) == "flex_attention":
        return "attn_implementation flex_attention runs through torch.compile, which does not run under a FLOP counter"
    return None


def compute_dtype(trainer: "L.Trainer") -> torch.dtype:
    """The dtype the matmuls run in: FSDP's param dtype if it sets one, else the precision's."""
    strategy = trainer.strategy
    mixed = getattr(strategy, "mixed_precision", None)
    if mixed is not None and getattr(mixed, "param_dtype", None) is not None:
        return mixed.param_dtype
    return _PRECISION_DTYPES.get(str(trainer.precision), torch.float32)


# Peak dense FLOP/s of the devices Lightning's table does not find by the name they report, by
# substring of torch.cuda.get_device_name. The H200 is in Lightning's table under names no H200
# reports ("h200 sxm1"); its compute is the H100 SXM's (the same GH100 chip with more memory), whose
# figures these are (NVIDIA's H100 datasheet, dense, as in Lightning's "h100 sxm" entry).
_PEAK_FLOPS = {
    "h200": {
        torch.float64: 33.5e12, torch.float32: 66.9e12, "tfloat32": 494.7e12,
        torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.int8: 1978.9e12,
    },
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Peak dense FLOP/s of one device for ``dtype`` (our table for the devices it names, else
    Lightning's ``get_available_flops``), or None if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for chip, table in _PEAK_FLOPS.items():
            if chip in name:
                ampere_or_later = torch.cuda.get_device_capability(device) >= (8, 0)
                if dtype is torch.float32 and ampere_or_later and torch.get_float32_matmul_precision() != "highest":
                    return table["tfloat32"]  # float32 matmuls run on the TF32 tensor cores
                return table.get(dtype)
    return get_available_flops(device, dtype)


class TrainingThroughput(L.Callback):
    """Log tokens/s and MFU during training (see the module docstring for the keys).

    Args:
        window: Optimiser steps in the rolling window the rates are computed over (>= 1).
        peak_flops: Peak FLOP/s of one device; default: looked up for the device and precision.
        measure_flops: Count the FLOPs of the first training micro-batch (needed for FLOP/s, MFU).
        flops_per_micro_batch: Model FLOPs of one training micro-batch on one rank, counted
            elsewhere (e.g. the line a short run with ``attn_implementation: sdpa`` logs): used
            instead of counting (FLOPs cannot be counted with FlexAttention).
    """

    def __init__(
        self,
        window: int = 20,
        peak_flops: Optional[float] = None,
        measure_flops: bool = True,
        flops_per_micro_batch: Optional[float] = None,
    ):
        super().__init__()
        if window < 1:
            raise DLMError(f"TrainingThroughput window must be >= 1 optimiser step, got {window}")
        if peak_flops is not None and peak_flops <= 0:
            raise DLMError(f"TrainingThroughput peak_flops must be > 0 FLOP/s per device, got {peak_flops}")
        if flops_per_micro_batch is not None and flops_per_micro_batch <= 0:
            raise DLMError(f"TrainingThroughput flops_per_micro_batch must be > 0, got {flops_per_micro_batch}")
        self.window = window
        self.peak_flops = peak_flops
        self.measure_flops = measure_flops
        self.given_flops = flops_per_micro_batch
        self.step_flops: Optional[StepFlops] = None  # the measurement, once done
        self._count_next = False
        self._measuring: Optional[StepFlops] = None
        self._marks: Deque[Tuple[int, float, int, int]] = deque()  # (step, time, tokens, micro-batches)
        self._tokens = 0
        self._micro_batches = 0
        self._last_step = -1
        self._peak: Optional[float] = None

    @property
    def flops_per_micro_batch(self) -> Optional[float]:
        """Model FLOPs of one training micro-batch on one rank (None until counted, if not given)."""
        if self.given_flops is not None:
            return self.given_flops
        return None if self.step_flops is None else self.step_flops.model_flops

    # --- setup ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        dtype = compute_dtype(trainer)
        self._peak = self.peak_flops or device_peak_flops(trainer.strategy.root_device, dtype)
        if self._peak is None:
            rank_zero_info(
                f"throughput: no peak FLOP/s known for {trainer.strategy.root_device.type} in {dtype}: logging tokens/s "
                "and FLOP/s but not MFU (set the callback's peak_flops to log it)"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._marks.clear()
        self._last_step = trainer.global_step
        self._count_next = self.measure_flops and self.given_flops is None and self.step_flops is None
        reason = uncountable_reason(pl_module) if self._count_next else None
        if reason is not None:
            self._count_next = False
            rank_zero_info(
                f"throughput: FLOPs not counted ({reason}): logging tokens/s only; give the callback's "
                "flops_per_micro_batch (e.g. counted in a short run with attn_implementation sdpa) to log MFU"
            )
        if not self._count_next:
            self._mark(trainer)

    # --- the measured micro-batch ---------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._count_next:
            self._count_next = False
            self._measuring = StepFlops()
            self._measuring.start()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._measuring is not None:
            self._measuring.backward_starts()

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._measuring is not None:
            self._measuring.backward_ends()

    def _finish_measurement(self, trainer, batch) -> None:
        measured, self._measuring = self._measuring, None
        measured.stop()
        self.step_flops = measured
        shape = "x".join(str(d) for d in batch["input_ids"].shape)
        recompute = f", recomputed forward {measured.recompute / 1e9:.4g} left out" if measured.recompute else ""
        rank_zero_info(
            f"throughput: one training micro-batch ({shape} tokens per rank) = {measured.model_flops / 1e9:.4g} GFLOP "
            f"(forward {measured.forward / 1e9:.4g}, backward {(measured.backward - measured.recompute) / 1e9:.4g}"
            f"{recompute})"
        )

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._measuring is not None:
            self._measuring.stop()
            self._measuring = None

    # --- rates ----------------------------------------------------------------------------------
    def _mark(self, trainer) -> None:
        """A timing point: the device synchronised first (its queued work is part of the interval)."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._marks.append((trainer.global_step, time.perf_counter(), self._tokens, self._micro_batches))
        # the oldest mark kept is the newest one at least `window` optimiser steps back
        while len(self._marks) > 2 and self._marks[1][0] <= trainer.global_step - self.window:
            self._marks.popleft()

    @staticmethod
    def logs_at(trainer) -> bool:
        """Whether the logger writes this optimiser step's metrics (called after the step): every
        ``log_every_n_steps`` (0 counts as 1, as the module's own logging does) and the last step."""
        step = trainer.global_step
        every = max(1, int(trainer.log_every_n_steps or 1))
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        return step % every == 0 or last or trainer.should_stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += int(batch["input_ids"].numel())
        self._micro_batches += 1
        if self._measuring is not None:
            self._finish_measurement(trainer, batch)
            self._marks.clear()
            self._last_step = trainer.global_step
            self._mark(trainer)  # the window starts after the measured step (one sync, once per fit)
            return
        if trainer.global_step == self._last_step:  # accumulating: no optimiser step yet
            return
        self._last_step = trainer.global_step
        if not self.logs_at(trainer):  # no host sync on the steps nothing is written
            return
        self._mark(trainer)
        if len(self._marks) < 2:
            return
        (_, t0, tokens0, micro0), (_, t1, tokens1, micro1) = self._marks[0], self._marks[-1]
        seconds = t1 - t0
        if seconds <= 0:
            return
        per_device = (tokens1 - tokens0) / seconds
        log = dict(on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log("perf/tokens_per_s", per_device * trainer.world_size, **log)
        pl_module.log("perf/tokens_per_s_per_device", per_device, **log)
        if self.flops_per_micro_batch is not None:
            flops_per_s = (micro1 - micro0) * self.flops_per_micro_batch / seconds
            pl_module.log("perf/flops_per_s_per_device", flops_per_s, **log)
            if self._peak:
                pl_module.log("perf/mfu", flops_per_s / self._peak, **log)
                if self.step_flops is not None and self.step_flops.recompute:
                    hardware = (micro1 - micro0) * self.step_flops.hardware_flops / seconds
                    pl_module.log("perf/hfu", hardware / self._peak, **log)

    def on_validation_end(self, trainer, pl_module) -> None:
        # restart the window after validation so its time is not counted as training time
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._marks.clear()
            self._mark(trainer)
