"""Progress a person can read: ``step n/N``, the loss, tokens/s and an ETA; plain lines when not a terminal.

:class:`StepProgress` is the progress bar of ``dlm fit`` (``dlm`` adds it unless the config gives
a progress bar of its own or ``trainer.enable_progress_bar: false``). Training is counted in
optimiser steps (the training stream is infinite, so Lightning's epochs mean nothing):

* on a terminal, a tqdm bar ``step 40/160 |####      | 25% [01:12<03:36, loss 5.812, 2,310 tok/s]``,
  with Lightning's bars for validation, and one line with ``val/nelbo`` after each validation;
* when stdout is not a terminal (output redirected to a file, a pipe, CI), plain lines instead,
  written as they happen (flushed)::

      step 40/160 | loss 5.812 | 2,310 tok/s | elapsed 1m12s | eta 3m36s
      validation at step 40/160 | val/nelbo 5.634 | val/ppl_bound 279.9 | took 4s

  one every ``every_n_steps`` optimiser steps (default: about 20 lines over the run, or every
  10 steps when the run has no step limit), plus the first step of the run and the last.

tokens/s is ``perf/tokens_per_s`` when :class:`~lightning_dlm.training.callbacks.TrainingThroughput`
logs it, else measured here (the batch's ``input_ids`` over the last ``window`` steps, all
ranks). The ETA is the remaining steps at the recent time per step, plus the remaining
validations at the duration of the last one.

:func:`progress_bar` is the same idea for loops outside Lightning (``dlm sample``, ``dlm eval``):
a tqdm bar on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, Iterator, Optional, TextIO, Tuple

from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar

# --- formatting -----------------------------------------------------------------------------------


def is_terminal(stream: Optional[TextIO]) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, captured output)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def format_duration(seconds: Optional[float]) -> str:
    """``45s``, ``1m12s``, ``2h03m``, ``3d04h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_count(value: float) -> str:
    """A rate or count with thousands separators: ``2,310``; below 10 with one decimal: ``3.5``."""
    if not math.isfinite(value):
        return "?"
    return f"{value:,.1f}" if abs(value) < 10 else f"{value:,.0f}"


def format_metric(value: float) -> str:
    """A loss-like value: ``5.812``; large or tiny ones in 4 significant digits."""
    if not math.isfinite(value) or abs(value) >= 1000 or (value != 0 and abs(value) < 0.001):
        return f"{value:.4g}"
    return f"{value:.3f}"


def progress_line(
    step: int,
    total: Optional[int],
    loss: Optional[float] = None,
    tokens_per_s: Optional[float] = None,
    elapsed: Optional[float] = None,
    eta: Optional[float] = None,
) -> str:
    """``step 40/160 | loss 5.812 | 2,310 tok/s | elapsed 1m12s | eta 3m36s`` (unknown parts left out)."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    if loss is not None:
        parts.append(f"loss {format_metric(loss)}")
    if tokens_per_s is not None:
        parts.append(f"{format_count(tokens_per_s)} tok/s")
    if elapsed is not None:
        parts.append(f"elapsed {format_duration(elapsed)}")
    if total and eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)


def _scalar(value: Any) -> Optional[float]:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


# --- the Lightning progress bar -------------------------------------------------------------------


class StepProgress(TQDMProgressBar):
    """Step-based progress of a fit: ``step n/N``, loss, tokens/s, ETA; plain lines when not a terminal.

    Args:
        every_n_steps: Plain mode: a line every this many optimiser steps (default: about 20 lines
            over the run, or every 10 steps without ``trainer.max_steps``).
        plain: True: plain lines; False: a tqdm bar; default: plain when stdout is not a terminal.
        window: Optimiser steps over which tokens/s and the time per step are measured.
        refresh_rate: Terminal mode: redraw the bar every this many optimiser steps (0 disables it).
        process_position: As Lightning's ``TQDMProgressBar``.
    """

    TRAIN_FORMAT = "step {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]"

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        plain: Optional[bool] = None,
        window: int = 20,
        refresh_rate: int = 1,
        process_position: int = 0,
    ):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"StepProgress every_n_steps must be >= 1, got {every_n_steps}")
        if window < 1:
            raise ValueError(f"StepProgress window must be >= 1, got {window}")
        self.every_n_steps = every_n_steps
        self.plain = plain
        self.window = window
        self._plain = bool(plain)
        self._every = every_n_steps or 10
        self._start_time = 0.0
        self._start_step = 0
        self._last_step = -1
        self._tokens = 0
        self._marks: Deque[Tuple[float, int, int]] = deque(maxlen=window + 1)  # (time, tokens, step)
        self._val_start: Optional[float] = None
        self._val_seconds: Optional[float] = None  # the last validation's
        self._pending_loss: Any = None  # the loss of the micro-batches of the step under way (a tensor)
        self._step_loss: Any = None  # the last step's, a tensor until read
        self._last_refresh = 0.0

    # --- what is shown --------------------------------------------------------------------------
    def total_steps(self) -> Optional[int]:
        """The step the fit stops at (``trainer.max_steps``), or None when it has no step limit."""
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else None

    def loss(self) -> Optional[float]:
        """The last optimiser step's loss (rank 0's micro-batches), else the last logged ``train/loss``."""
        if self._step_loss is not None:
            if not isinstance(self._step_loss, float):
                self._step_loss = _scalar(self._step_loss)  # one host sync, only when shown
            return self._step_loss
        metrics = self.trainer.callback_metrics
        value = metrics.get("train/loss", metrics.get("loss"))
        return None if value is None else _scalar(value)

    def tokens_per_s(self) -> Optional[float]:
        logged = self.trainer.callback_metrics.get("perf/tokens_per_s")
        if logged is not None:
            return _scalar(logged)
        rate = self._window_rates()
        return None if rate is None else rate[0]

    def _window_rates(self) -> Optional[Tuple[Optional[float], float]]:
        """(tokens/s over all ranks or None, seconds per step) over the window, None before 2 marks."""
        if len(self._marks) < 2:
            return None
        (t0, tokens0, step0), (t1, tokens1, step1) = self._marks[0], self._marks[-1]
        if t1 <= t0 or step1 <= step0:
            return None
        tokens = (tokens1 - tokens0) * self.trainer.world_size
        return (tokens / (t1 - t0) if tokens > 0 else None), (t1 - t0) / (step1 - step0)

    def eta(self) -> Optional[float]:
        """Seconds to the last step: remaining steps at the recent pace, plus the remaining validations."""
        total = self.total_steps()
        rate = self._window_rates()
        if total is None or rate is None:
            return None
        step = self.trainer.global_step
        seconds = (total - step) * rate[1]
        every = self._validation_every_steps()
        if every and self._val_seconds is not None:
            seconds += (total // every - step // every) * self._val_seconds
        return max(seconds, 0.0)

    def _validation_every_steps(self) -> Optional[int]:
        trainer = self.trainer
        batches = getattr(trainer, "val_check_batch", None)
        if trainer.check_val_every_n_epoch is not None or not isinstance(batches, int) or batches < 1:
            return None  # validation counted in epochs: not predictable in steps
        if not trainer.limit_val_batches:
            return None
        return max(1, batches // max(1, trainer.accumulate_grad_batches))

    def line(self) -> str:
        """The plain line for the current step."""
        return progress_line(self.trainer.global_step, self.total_steps(), self.loss(), self.tokens_per_s(),
                             time.perf_counter() - self._start_time, self.eta())

    def postfix(self) -> str:
        """What the terminal bar shows after the ETA: ``loss 5.812, 2,310 tok/s``."""
        parts = []
        loss, rate = self.loss(), self.tokens_per_s()
        if loss is not None:
            parts.append(f"loss {format_metric(loss)}")
        if rate is not None:
            parts.append(f"{format_count(rate)} tok/s")
        return ", ".join(parts)

    def validation_line(self) -> str:
        """``validation at step 40/160 | val/nelbo 5.634 | val/ppl_bound 279.9 | took 4s``."""
        total = self.total_steps()
        step = self.trainer.global_step
        parts = [f"validation at step {step}/{total}" if total else f"validation at step {step}"]
        metrics = {k: _scalar(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith("val") and not k.endswith("/tokens_seen")}  # the step says it already
        for key in sorted(metrics, key=lambda k: (not k.endswith("nelbo"), k)):
            if metrics[key] is not None:
                parts.append(f"{key} {format_metric(metrics[key])}")
        if self._val_seconds is not None:
            parts.append(f"took {format_duration(self._val_seconds)}")
        return " | ".join(parts)

    def get_metrics(self, trainer, pl_module) -> Dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _emit(self, text: str) -> None:
        if self._plain:
            print(text, file=sys.stdout, flush=True)
        elif self._train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.write(text, file=sys.stdout)
        else:
            print(text, file=sys.stdout, flush=True)

    # --- bars -----------------------------------------------------------------------------------
    def _disabled(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._disabled() if self._plain else super().init_sanity_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        return self._disabled() if self._plain else super().init_validation_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        return self._disabled() if self._plain else super().init_test_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        return self._disabled() if self._plain else super().init_predict_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        if self._plain:
            return self._disabled()
        return Tqdm(
            total=self.total_steps(),
            initial=self.trainer.global_step,  # resumed: the rate counts this run's steps only
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.TRAIN_FORMAT,
        )

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self._plain:
            print(*args, sep=sep, **{"flush": True, **kwargs})
        else:
            super().print(*args, sep=sep, **kwargs)

    # --- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._plain = self.plain if self.plain is not None else not is_terminal(sys.stdout)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_time = time.perf_counter()
        self._start_step = self._last_step = trainer.global_step
        self._tokens = 0
        self._pending_loss = self._step_loss = None
        self._marks.clear()
        self._marks.append((self._start_time, 0, trainer.global_step))
        total = self.total_steps()
        self._every = self.every_n_steps or (max(1, math.ceil((total - trainer.global_step) / 20)) if total else 10)
        self.train_progress_bar = self.init_train_tqdm()
        if self._plain and self.is_enabled:
            until = f"to step {total}" if total else "without a step limit"
            start = f" from step {trainer.global_step}" if trainer.global_step else ""
            every = "step" if self._every == 1 else f"{self._every} steps"
            self._emit(f"training{start} {until}: a progress line every {every} (stdout is not a terminal)")

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar over the steps of the whole fit: no epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        input_ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if input_ids is not None and hasattr(input_ids, "numel"):
            self._tokens += int(input_ids.numel())
        # Lightning's outputs["loss"]: the micro-batch's loss / accumulate_grad_batches, still on the device
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if hasattr(loss, "detach"):
            loss = loss.detach()
            self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimiser step yet
            return
        self._last_step = step
        self._step_loss, self._pending_loss = self._pending_loss, None
        self._marks.append((time.perf_counter(), self._tokens, step))
        if not self.is_enabled:
            return
        total = self.total_steps()
        bar = self.train_progress_bar
        if not bar.disable:
            if (step - self._start_step) % self.refresh_rate == 0 or step == total:
                bar.n = step
                now = time.perf_counter()
                if now - self._last_refresh >= 0.5 or step == total:  # the loss read (a host sync) twice a second
                    self._last_refresh = now
                    bar.set_postfix_str(self.postfix(), refresh=False)
                bar.refresh()
        elif self._plain and (step % self._every == 0 or step == total or step == self._start_step + 1):
            self._emit(self.line())

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._val_start is None:
            return
        now = time.perf_counter()
        self._val_seconds = now - self._val_start
        self._val_start = None
        # the pace is measured over training time only: restart the window after validation
        self._marks.clear()
        self._marks.append((now, self._tokens, trainer.global_step))
        if self.is_enabled:
            self._emit(self.validation_line())

    def on_train_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.set_postfix_str(self.postfix(), refresh=False)
            bar.refresh()
        bar.close()


# --- progress of loops outside Lightning ----------------------------------------------------------


class PlainProgress:
    """tqdm's ``update``/``close``/``write`` interface, writing a plain line every ``every`` units.

    ``sample 16/40 | elapsed 24s | eta 36s``: a line when created (``0/40``), then whenever the
    count passes a multiple of ``every`` (default: about 20 lines in all) and at the end.
    """

    def __init__(self, total: int, desc: str, file: Optional[TextIO] = None, every: Optional[int] = None,
                 unit: str = ""):
        self.total = total
        self.desc = desc
        self.file = file
        self.unit = unit
        self.n = 0
        self.every = every or max(1, math.ceil(total / 20))
        self.disable = False
        self._start = time.perf_counter()
        self._emit()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        unit = f" {self.unit}s" if self.unit else ""
        parts = [f"{self.desc} {self.n}/{self.total}{unit}", f"elapsed {format_duration(elapsed)}"]
        if 0 < self.n < self.total:
            parts.append(f"eta {format_duration(elapsed / self.n * (self.total - self.n))}")
        return " | ".join(parts)

    def _emit(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or (self.n >= self.total > before):
            self._emit()

    def write(self, text: str, file: Optional[TextIO] = None) -> None:
        print(text, file=file or self.file or sys.stderr, flush=True)

    @contextlib.contextmanager
    def external_write_mode(self, file: Optional[TextIO] = None) -> Iterator[None]:
        yield  # lines, not a bar: nothing to clear

    def close(self) -> None:
        pass  # nothing open: each line was written whole


class _NoProgress:
    n = 0
    disable = True

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, text: str, file: Optional[TextIO] = None) -> None:
        print(text, file=file or sys.stderr, flush=True)

    @contextlib.contextmanager
    def external_write_mode(self, file: Optional[TextIO] = None) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, *, enabled: bool = True, file: Optional[TextIO] = None, unit: str = "it",
                 leave: bool = True, every: Optional[int] = None):
    """A tqdm bar on ``file`` (default stderr) when it is a terminal, else :class:`PlainProgress` lines;
    an object that shows nothing when not ``enabled``. All three have ``update(n)``, ``write``, ``close`` and
    ``external_write_mode(file)`` (a context in which writing to ``file`` does not garble a bar)."""
    file = file or sys.stderr
    if not enabled:
        return _NoProgress()
    if not is_terminal(file):
        return PlainProgress(total, desc, file=file, every=every, unit="" if unit == "it" else unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=file, leave=leave, dynamic_ncols=True)


def add_step_progress(trainer_config) -> None:
    """Add a :class:`StepProgress` to a LightningCLI trainer config's ``callbacks`` (in place), unless
    they hold a progress bar already or ``enable_progress_bar`` is false (the config's list is kept:
    a default ``trainer.callbacks`` would be replaced by any config that lists callbacks)."""
    from lightning.pytorch.callbacks import ProgressBar

    if trainer_config.get("enable_progress_bar") is False:
        return
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not any(isinstance(c, ProgressBar) for c in callbacks):
        trainer_config["callbacks"] = [*callbacks, StepProgress()]
