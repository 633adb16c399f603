"""Progress a person can read: `dlm fit`'s step-based bar and plain lines, and the helpers of sample/eval."""

import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_dlm.cli import main
from lightning_dlm.training.callbacks import StepProgress, TrainingThroughput
from lightning_dlm.training.callbacks.progress import (
    PlainProgress,
    add_step_progress,
    format_count,
    format_duration,
    progress_bar,
    progress_line,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^step (\d+)/6 \| loss (\d+\.\d{3}) \| ([\d,]+(?:\.\d)?) tok/s \| elapsed (\S+) \| eta (\S+)$")
VAL_LINE = re.compile(r"^validation at step (\d+)/6 \| val/nelbo (\d+\.\d{3}) \|.* \| took \S+$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def fit_output(tmp_path_factory):
    """A short debug fit with stdout and stderr captured (not a terminal), and its folder."""
    root = tmp_path_factory.mktemp("progress")
    # in its own process: output to pipes (not a terminal), and nothing of this process's streams touched
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_dlm", "fit", "--config", os.path.join(REPO, "experiments", "debug.yaml"),
         "--trainer.max_steps", "6", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
         "--trainer.default_root_dir", str(root), "--checkpoint.dirpath", str(root / "ck"),
         "--checkpoint.every_n_train_steps", "6"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr, root


def test_fit_prints_plain_step_lines_when_not_a_terminal(fit_output):
    out, err, _ = fit_output
    lines = out.splitlines()
    assert "training to step 6: a progress line every step (stdout is not a terminal)" in lines
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert all(steps), [line for line in lines if line.startswith("step ")]
    assert [int(m.group(1)) for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps:
        assert 0 < float(m.group(2)) < 20  # the loss
        assert float(m.group(3).replace(",", "")) > 0  # tokens/s
        assert re.fullmatch(r"(\d+s|\d+m\d\ds)", m.group(4)) and re.fullmatch(r"(\d+s|\d+m\d\ds)", m.group(5))
    assert steps[-1].group(5) == "0s"  # nothing left at the last step
    vals = [VAL_LINE.match(line) for line in lines if line.startswith("validation")]
    assert all(vals) and [int(m.group(1)) for m in vals] == [3, 6]
    # the lines come in order: a validation line right after the step it ran at
    order = [line.split(" |")[0] for line in lines if line.startswith(("step ", "validation"))]
    assert order == ["step 1/6", "step 2/6", "step 3/6", "validation at step 3/6", "step 4/6", "step 5/6",
                     "step 6/6", "validation at step 6/6"]
    for text in (out, err):
        assert "Epoch" not in text and "v_num" not in text
        assert "\r" not in text  # no tqdm redraws in a file


def test_sample_shows_progress_from_the_first_batch_when_not_a_terminal(fit_output, capsys):
    ckpt = str(fit_output[2] / "ck" / "last.ckpt")
    main(["sample", "--ckpt", ckpt, "--prompt", "[a, b, c]", "--batch_size", "2", "--length", "3", "--steps", "3"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("sampling")]
    assert [line.split(" |")[0] for line in lines] == [
        "sampling (2 batches) 0/3 samples", "sampling (2 batches) 2/3 samples", "sampling (2 batches) 3/3 samples"]
    assert "eta" in lines[1] and "--- sample 3/3" in captured.out
    main(["sample", "--ckpt", ckpt, "--prompt", "a", "--length", "3", "--steps", "3"])  # one sample: no progress
    assert "sampling" not in capsys.readouterr().err


def test_line_formatting():
    assert [format_duration(s) for s in (0, 4.6, 59.4, 72, 3599, 3780, 86399, 3 * 86400 + 4 * 3600)] == [
        "0s", "5s", "59s", "1m12s", "59m59s", "1h03m", "23h59m", "3d04h"]
    assert format_duration(None) == format_duration(float("inf")) == format_duration(-1) == "?"
    assert [format_count(x) for x in (2310.4, 1234567, 12, 3.46, 0)] == ["2,310", "1,234,567", "12", "3.5", "0.0"]
    assert progress_line(40, 160, 5.81234, 2310.2, 72, 216) == (
        "step 40/160 | loss 5.812 | 2,310 tok/s | elapsed 1m12s | eta 3m36s")
    assert progress_line(40, None, 5.8, None, 3725, 10) == "step 40 | loss 5.800 | elapsed 1h02m"  # no limit, no eta
    assert progress_line(1, 6) == "step 1/6"


def _fake_trainer(**overrides):
    trainer = SimpleNamespace(
        max_steps=6, global_step=0, callback_metrics={}, world_size=1, check_val_every_n_epoch=None,
        val_check_batch=3, limit_val_batches=1, accumulate_grad_batches=1, is_global_zero=True,
        sanity_checking=False, state=SimpleNamespace(fn="fit"), loggers=[], progress_bar_metrics={},
    )
    trainer.__dict__.update(overrides)
    return trainer


def test_terminal_bar_shows_step_n_of_total_loss_and_tokens_per_s(monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    bar, trainer = StepProgress(), _fake_trainer()
    bar.setup(trainer, None, "fit")
    bar.on_train_start(trainer, None)
    assert not bar._plain  # stdout is a terminal: a tqdm bar
    for step in (1, 2, 3):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, {"loss": torch.tensor(5.81234)}, {"input_ids": torch.zeros(8, 64)}, step)
    shown = str(bar.train_progress_bar)
    assert shown.startswith("step 3/6 |") and " 50% " in shown, shown
    assert "loss 5.812" in shown and " tok/s" in shown
    assert "Epoch" not in screen.getvalue() and "v_num" not in screen.getvalue()
    assert "v_num" not in bar.get_metrics(SimpleNamespace(loggers=[], progress_bar_metrics={}), None)
    trainer.callback_metrics = {"val/nelbo": torch.tensor(5.634), "val/ppl_bound": torch.tensor(279.9)}
    bar._val_seconds = 4
    assert bar.validation_line() == "validation at step 3/6 | val/nelbo 5.634 | val/ppl_bound 279.900 | took 4s"
    bar.on_train_end(trainer, None)


def test_every_n_steps_and_the_eta():
    bar, trainer = StepProgress(every_n_steps=4, plain=True), _fake_trainer(max_steps=10)
    bar.setup(trainer, None, "fit")
    printed = []
    bar._emit = printed.append
    bar.on_train_start(trainer, None)
    for step in range(1, 11):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, {"loss": torch.tensor(5.0)}, {"input_ids": torch.zeros(2, 8)}, step)
    assert printed[0] == "training to step 10: a progress line every 4 steps (stdout is not a terminal)"
    assert [line.split(" |")[0] for line in printed[1:]] == ["step 1/10", "step 4/10", "step 8/10", "step 10/10"]
    # the ETA: remaining steps at the window's pace, plus the validations still to come at the last one's duration
    trainer.global_step = 4
    bar._marks.clear()
    bar._marks.extend([(0.0, 0, 2), (2.0, 1024, 4)])  # 1 s per step, 512 tokens/s
    assert bar.eta() == pytest.approx(6.0) and bar.tokens_per_s() == pytest.approx(512)
    bar._val_seconds = 3.0  # validation every 3 steps: at steps 6 and 9 still
    assert bar.eta() == pytest.approx(6.0 + 2 * 3.0)
    trainer.callback_metrics = {"perf/tokens_per_s": torch.tensor(2310.0)}  # TrainingThroughput's, when logged
    assert bar.tokens_per_s() == pytest.approx(2310)


def test_dlm_adds_the_step_bar_unless_the_config_has_one_or_disables_it():
    throughput = TrainingThroughput()
    config = {"callbacks": [throughput]}
    add_step_progress(config)
    assert config["callbacks"][0] is throughput and isinstance(config["callbacks"][1], StepProgress)
    add_step_progress(config)  # idempotent
    assert len(config["callbacks"]) == 2
    own = {"callbacks": [TQDMProgressBar()]}
    add_step_progress(own)
    assert len(own["callbacks"]) == 1
    off = {"callbacks": None, "enable_progress_bar": False}
    add_step_progress(off)
    assert off["callbacks"] is None
    empty = {}
    add_step_progress(empty)
    assert [type(c) for c in empty["callbacks"]] == [StepProgress]


def test_progress_bar_prints_plain_lines_off_a_terminal_and_tqdm_on_one():
    stream = io.StringIO()
    plain = progress_bar(40, "loglikelihood", file=stream)
    assert isinstance(plain, PlainProgress)
    for _ in range(5):
        plain.update(8)
    plain.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [f"loglikelihood {n}/40" for n in (0, 8, 16, 24, 32, 40)]
    assert "eta" in lines[1] and "eta" not in lines[-1]
    quiet = io.StringIO()
    off = progress_bar(40, "x", enabled=False, file=quiet)
    off.update(40)
    off.close()
    assert quiet.getvalue() == ""
    screen = _Terminal()
    bar = progress_bar(4, "sampling", file=screen, unit="sample")
    bar.update(2)
    bar.close()
    assert "sampling: " in screen.getvalue() and "2/4" in screen.getvalue() and "\r" in screen.getvalue()


def test_tokens_per_s_counts_every_rank(monkeypatch):
    # each of 2 ranks trains on its own 8x64 batch a step: 1,024 tokens a step across the job, 1 s a step
    from lightning_dlm.training.callbacks import progress

    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    bar, trainer = StepProgress(every_n_steps=1, plain=True), _fake_trainer(world_size=2, max_steps=4)
    bar.setup(trainer, None, "fit")
    printed = []
    bar._emit = printed.append
    bar.on_train_start(trainer, None)
    for step in (1, 2, 3):
        trainer.global_step, now[0] = step, float(step)
        bar.on_train_batch_end(trainer, None, {"loss": torch.tensor(5.0)}, {"input_ids": torch.zeros(8, 64)}, step)
    assert bar.tokens_per_s() == pytest.approx(2 * 8 * 64)  # not 512: one rank's tokens
    assert "| 1,024 tok/s |" in printed[-1], printed[-1]
