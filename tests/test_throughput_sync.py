"""TrainingThroughput times (and synchronises the device) only on the steps the logger writes."""

import lightning as L
import pytest

from lightning_dlm.data import CorpusSource, TextDataModule
from lightning_dlm.training.callbacks import TrainingThroughput
from tests.conftest import TINY_CORPUS, TINY_TOKENIZER
from tests.test_throughput import BATCH, SEQ_LEN, make_module


class CountMarks(TrainingThroughput):
    """Records the optimiser step of every timing point (where the device is synchronised)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.marked_at = []
        self.logged_at = []

    def _mark(self, trainer):
        self.marked_at.append(trainer.global_step)
        super()._mark(trainer)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        log = pl_module.log

        def recording(name, value, **kwargs):
            if name == "perf/tokens_per_s":
                self.logged_at.append(trainer.global_step)
            return log(name, value, **kwargs)

        pl_module.log = recording


def fit(callback, steps, log_every_n_steps, accumulate=1):
    data = TextDataModule(train=[CorpusSource(path=TINY_CORPUS, sample_by="paragraph")], tokenizer=TINY_TOKENIZER,
                          seq_len=SEQ_LEN, batch_size=BATCH)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=log_every_n_steps, accumulate_grad_batches=accumulate, callbacks=[callback])
    trainer.fit(make_module(), data)
    return trainer


def test_marks_only_on_logging_steps_and_the_rates_span_the_window():
    callback = CountMarks(window=3)
    trainer = fit(callback, steps=7, log_every_n_steps=2)
    # once after the measured first step, then every second step and the last
    assert callback.marked_at == [1, 2, 4, 6, 7]
    assert callback.logged_at == [2, 4, 6, 7]  # from the second mark on
    # the window reaches back at least 3 optimiser steps: marks 4, 6, 7 at step 7 (3 steps)
    assert [mark[0] for mark in callback._marks] == [4, 6, 7]
    metrics = trainer.callback_metrics
    per_token = callback.step_flops.model_flops / (BATCH * SEQ_LEN)
    assert metrics["perf/flops_per_s_per_device"].item() / metrics["perf/tokens_per_s"].item() == pytest.approx(
        per_token, rel=1e-5)


def test_accumulation_marks_on_optimiser_steps_only():
    callback = CountMarks(window=2, measure_flops=False)
    fit(callback, steps=4, log_every_n_steps=1, accumulate=2)
    assert callback.marked_at == [0, 1, 2, 3, 4]  # the start, then each optimiser step (not each micro-batch)
