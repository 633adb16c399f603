"""TrainingThroughput's FLOPs checked against counts made without it.

tests/test_throughput.py checks the callback's bookkeeping (its logged rates against its own
count). Here its count, and the FLOP/s, MFU and HFU it logs, are checked against two counts that
do not go through the callback: ``torch.utils.flop_counter.FlopCounterMode`` run around the very
same measured micro-batch (same batch, same noise draw, same ops), and the textbook transformer
count done by hand from the built model's weight shapes (6 N FLOPs per token for the N weights
of the layers, the LM head on the scored rows only, and the attention). Both must agree exactly:
a count that is off by any factor fails.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.training.callbacks import TrainingThroughput
from tests.test_throughput import BATCH, HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, SEQ_LEN, fit

PEAK = 1e12  # FLOP/s, so that MFU (and HFU) are logged on the CPU

_aten = torch.ops.aten
# torch's FlopCounterMode has no formula for the CPU flash-attention kernels SDPA runs on the CPU
# (it has them for the CUDA kernels): give it torch's attention formulas for them.
_CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


class AlsoCountedByTorch(TrainingThroughput):
    """The callback unchanged, with torch's FlopCounterMode entered before the callback starts
    counting its measured micro-batch and left after it stops: both see the same ops."""

    reference = None  # torch's total over the measured micro-batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._torch_counter = None
        if self.reference is None and self.step_flops is None:
            self._torch_counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
            self._torch_counter.__enter__()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._torch_counter is not None:
            self._torch_counter.__exit__(None, None, None)
            self.reference = self._torch_counter.get_total_flops()
            self._torch_counter = None


CASES = {
    "bidirectional": dict(),
    "block": dict(diffusion=DiffusionConfig(attention="block", block_size=8)),  # 2L positions per row
    "checkpointed": dict(gradient_checkpointing=True),  # the recomputed forward is not model FLOPs
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_match_torch_flop_counter_and_the_hand_count(case):
    callback = AlsoCountedByTorch(window=2, peak_flops=PEAK)
    trainer, rows = fit(callback, steps=3, **CASES[case])
    flops = callback.step_flops
    assert flops is not None and callback.reference is not None

    # the hand count, from the weights of the model that ran
    net = trainer.lightning_module.net.model
    head = net.get_output_embeddings()
    n_layers = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    head_dim = HIDDEN // HEADS
    assert n_layers == LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * head_dim * KV_HEADS + 3 * HIDDEN * INTER)  # q, o; k, v; MLP
    tokens = BATCH * SEQ_LEN  # data tokens of the micro-batch (tokens/s counts these)
    positions = 2 * SEQ_LEN if case == "block" else SEQ_LEN  # block mode: noised and clean copy side by side
    scored = rows[0]  # rows the LM head ran on in the measured forward
    assert 0 < scored < tokens
    # forward: 2 FLOPs per weight per position, the head on the scored rows, and per layer the two
    # attention matmuls (QK^T, AV) over every key; backward: twice the forward's matmuls, and for the
    # attention kernels five matmuls (the recomputed scores included)
    linear_forward = 2 * BATCH * positions * n_layers
    head_forward = 2 * scored * head.weight.numel()
    attention_forward = LAYERS * 2 * (2 * BATCH * HEADS * positions * positions * head_dim)
    hand = 3 * (linear_forward + head_forward) + attention_forward * 7 // 2

    assert flops.model_flops == hand
    assert callback.flops_per_micro_batch == hand
    assert callback.reference == flops.hardware_flops  # torch counts what ran, the recomputation included
    recomputed = callback.reference - hand
    if case == "checkpointed":
        # at most each layer's forward again (torch's checkpoint stops a recomputation once the
        # tensors the backward needs are back: the last MLP matmul of a layer is not rerun)
        assert 0 < recomputed <= linear_forward + attention_forward and flops.recompute == recomputed
    else:
        assert recomputed == 0 and flops.recompute == 0

    # the logged rates: FLOP/s over tokens/s is the FLOPs per data token; MFU and HFU over the peak
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    per_second = metrics["perf/tokens_per_s"]
    assert per_second > 0 and metrics["perf/tokens_per_s_per_device"] == per_second  # one device
    assert metrics["perf/flops_per_s_per_device"] / per_second == pytest.approx(hand / tokens, rel=1e-5)
    assert metrics["perf/mfu"] * PEAK / per_second == pytest.approx(hand / tokens, rel=1e-5)
    if recomputed:
        assert metrics["perf/hfu"] * PEAK / per_second == pytest.approx(callback.reference / tokens, rel=1e-5)
    else:
        assert "perf/hfu" not in metrics
