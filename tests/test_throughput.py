"""TrainingThroughput: FLOPs counted on a real training step, tokens/s and MFU logged."""

import logging

import lightning as L
import pytest
import torch

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.data import CorpusSource, TextDataModule
from lightning_dlm.model import BackboneConfig, MaskTokenConfig
from lightning_dlm.training.callbacks import TrainingThroughput
from lightning_dlm.training.callbacks.throughput import uncountable_reason
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.optim import OptimConfig
from tests.conftest import TINY_CORPUS, TINY_TOKENIZER

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 4, 2, 513  # 512 + the added mask token
BATCH, SEQ_LEN = 4, 32


def make_module(gradient_checkpointing=False, attn_implementation="sdpa", diffusion=None):
    config = dict(model_type="llama", vocab_size=512, hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    return DiffusionLM(
        backbone=BackboneConfig(config=config, tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add"),
                                gradient_checkpointing=gradient_checkpointing, attn_implementation=attn_implementation),
        # the measured first step runs the dense annealing mask
        diffusion=diffusion if diffusion is not None else DiffusionConfig(anneal_steps=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
    )


def fit(callback, steps=4, **module_kw):
    module = make_module(**module_kw)
    rows = []  # rows the LM head scores in each training forward (it runs on the masked rows only)
    data = TextDataModule(train=[CorpusSource(path=TINY_CORPUS, sample_by="paragraph")], tokenizer=TINY_TOKENIZER,
                          seq_len=SEQ_LEN, batch_size=BATCH)

    class RecordRows(L.Callback):
        def on_train_start(self, trainer, pl_module):
            head = pl_module.net.model.get_output_embeddings()
            head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, callbacks=[callback, RecordRows()])
    trainer.fit(module, data)
    return trainer, rows


def test_counted_flops_match_the_analytic_count():
    callback = TrainingThroughput(window=2)
    trainer, rows = fit(callback)
    flops = callback.step_flops
    tokens = BATCH * SEQ_LEN
    head_dim = HIDDEN // HEADS
    linear = HIDDEN * HIDDEN * 2 + HIDDEN * head_dim * KV_HEADS * 2 + 3 * HIDDEN * INTER  # q, o; k, v; MLP
    attention = LAYERS * 2 * (2 * BATCH * HEADS * SEQ_LEN * SEQ_LEN * head_dim)  # QK^T and AV
    head = 2 * rows[0] * HIDDEN * VOCAB
    # the forward is exactly its matmuls: the layers on every token, the LM head on the scored rows
    assert 0 < rows[0] < tokens
    assert flops.forward == 2 * tokens * LAYERS * linear + head + attention
    # forward + backward is within a few % of the textbook 6 N per token + attention (the counted
    # attention backward includes the recomputed scores of the attention kernels)
    analytic = 6 * tokens * LAYERS * linear + 3 * head + 3 * attention
    assert abs(flops.model_flops - analytic) / analytic < 0.05
    assert flops.backward >= 2 * (flops.forward - attention) and flops.recompute == 0
    assert callback.flops_per_micro_batch == flops.model_flops


def test_block_mode_counts_the_2l_pass_and_tokens_per_s_counts_the_data():
    """A block-mode step runs the noised and the clean copy side by side (2L positions): the
    counted FLOPs are the 2L pass's, while tokens/s counts the L data tokens of each row."""
    callback = TrainingThroughput(window=2)
    trainer, rows = fit(callback, steps=3, diffusion=DiffusionConfig(attention="block", block_size=8))
    flops = callback.step_flops
    tokens = BATCH * SEQ_LEN
    head_dim = HIDDEN // HEADS
    linear = HIDDEN * HIDDEN * 2 + HIDDEN * head_dim * KV_HEADS * 2 + 3 * HIDDEN * INTER
    attention = LAYERS * 2 * (2 * BATCH * HEADS * (2 * SEQ_LEN) ** 2 * head_dim)  # dense mask over 2L keys
    head = 2 * rows[0] * HIDDEN * VOCAB
    assert 0 < rows[0] < tokens  # the head scores masked slots of the noised copy only
    assert flops.forward == 2 * (2 * tokens) * LAYERS * linear + head + attention
    metrics = trainer.callback_metrics
    per_token = flops.model_flops / tokens
    assert metrics["perf/flops_per_s_per_device"].item() / metrics["perf/tokens_per_s"].item() == pytest.approx(
        per_token, rel=1e-5)


def test_activation_checkpointing_recomputation_is_not_model_flops():
    plain = TrainingThroughput(window=2, peak_flops=1e12)
    fit(plain, steps=2)
    checkpointed = TrainingThroughput(window=2, peak_flops=1e12)
    trainer, _ = fit(checkpointed, steps=3, gradient_checkpointing=True)
    a, b = plain.step_flops, checkpointed.step_flops
    assert b.model_flops == a.model_flops and b.forward == a.forward  # same step, same noise draw
    assert b.recompute > 0.3 * b.forward and b.hardware_flops == a.model_flops + b.recompute
    metrics = trainer.callback_metrics
    assert metrics["perf/hfu"].item() == pytest.approx(
        metrics["perf/mfu"].item() * b.hardware_flops / b.model_flops, rel=1e-5)


def test_logged_rates_are_consistent(caplog):
    callback = TrainingThroughput(window=3)
    with caplog.at_level(logging.INFO):
        trainer, _ = fit(callback, steps=5)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    assert set(metrics) == {"perf/tokens_per_s", "perf/tokens_per_s_per_device", "perf/flops_per_s_per_device"}
    assert metrics["perf/tokens_per_s"] == metrics["perf/tokens_per_s_per_device"] > 0  # one device
    # FLOP/s and tokens/s come from the same window: their ratio is the FLOPs per token
    per_token = callback.step_flops.model_flops / (BATCH * SEQ_LEN)
    assert metrics["perf/flops_per_s_per_device"] / metrics["perf/tokens_per_s"] == pytest.approx(per_token, rel=1e-5)
    assert "no peak FLOP/s known for cpu in torch.float32" in caplog.text  # no MFU on a CPU, said once
    assert caplog.text.count("no peak FLOP/s known") == 1

    with_peak = TrainingThroughput(window=3, peak_flops=2.5e11)
    trainer, _ = fit(with_peak, steps=5)
    metrics = trainer.callback_metrics
    assert metrics["perf/mfu"].item() == pytest.approx(metrics["perf/flops_per_s_per_device"].item() / 2.5e11, rel=1e-5)
    assert "perf/hfu" not in metrics  # nothing recomputed


def test_given_flops_are_used_and_flex_attention_is_not_counted():
    given = TrainingThroughput(window=2, peak_flops=1e12, flops_per_micro_batch=2.0e7)
    trainer, _ = fit(given, steps=3)
    assert given.step_flops is None and given.flops_per_micro_batch == 2.0e7  # nothing counted
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["perf/flops_per_s_per_device"] / metrics["perf/tokens_per_s"] == pytest.approx(
        2.0e7 / (BATCH * SEQ_LEN), rel=1e-5)
    assert metrics["perf/mfu"] == pytest.approx(metrics["perf/flops_per_s_per_device"] / 1e12, rel=1e-5)
    # torch.compile (which FlexAttention runs through) refuses to run under a dispatch mode
    module = make_module(attn_implementation="flex_attention")
    module.configure_model()
    assert "flex_attention" in uncountable_reason(module)
    module = make_module()
    module.configure_model()
    assert uncountable_reason(module) is None


def test_bad_options_are_refused():
    with pytest.raises(DLMError, match="window must be >= 1"):
        TrainingThroughput(window=0)
    with pytest.raises(DLMError, match="peak_flops must be > 0"):
        TrainingThroughput(peak_flops=-1.0)
    with pytest.raises(DLMError, match="flops_per_micro_batch must be > 0"):
        TrainingThroughput(flops_per_micro_batch=0.0)


def test_grouped_query_attention_flops_count_every_query_head():
    """CUDA's SDPA kernels take GQA key/value heads as they are (enable_gqa): the count broadcasts
    them to the query heads, so torch versions whose formulas need equal heads do not fail."""
    from lightning_dlm.training.callbacks.throughput import _FORMULAS, broadcast_kv_heads

    aten = torch.ops.aten
    q, k, v = torch.empty(2, 8, 16, 4), torch.empty(2, 2, 16, 4), torch.empty(2, 2, 16, 4)
    packet = aten._scaled_dot_product_efficient_attention
    args = broadcast_kv_heads(packet, (q, k, v, None, False))
    assert [tuple(a.shape) for a in args[:3]] == [(2, 8, 16, 4)] * 3 and args[3:] == (None, False)
    assert _FORMULAS[packet](*args, out_val=None) == 4 * 2 * 8 * 16 * 16 * 4  # two (16x4)@(4x16)-sized bmms per head
    grad = torch.empty(2, 8, 16, 4)
    back = broadcast_kv_heads(aten._scaled_dot_product_efficient_attention_backward, (grad, q, k, v))
    assert [tuple(a.shape) for a in back] == [(2, 8, 16, 4)] * 4
    assert broadcast_kv_heads(aten.mm, (q, k, v)) == (q, k, v)  # other ops untouched
    same = (q, q, q)
    assert broadcast_kv_heads(packet, same) is same
