"""Step checkpoints that keep what a resume needs, and nothing twice.

Lightning's ``ModelCheckpoint`` with ``save_last`` writes every step file and ``last.ckpt`` in
full: the weights plus the optimizer state (AdamW: two more fp32 copies of the weights), so a run
holds three full copies of the model per checkpoint interval, and the latest one twice.
:class:`StepCheckpoint` writes

* ``last.ckpt`` with the full state (weights, optimizer, learning-rate schedule, loops, data
  position, callbacks): what ``--ckpt_path`` resumes from, rewritten at every save, never a link;
* the step files (``step0000080.ckpt``, ...) weights-only (``save_weights_only``, the default
  here): the model, its hyper-parameters, lightning_dlm's metadata, the loops and data position,
  but no optimizer, scheduler or callback state. They load everywhere a checkpoint loads for
  inference (``DiffusionModel.from_pretrained``, ``dlm sample``, ``dlm eval``, ``dlm export``,
  ``dlm validate --ckpt_path``); resuming from one is refused with one line naming ``last.ckpt``
  (:func:`lightning_dlm.training.resume.check_resume`);
* ``keep_last_k``: keep only the ``k`` most recent step files (older ones of this run are
  deleted after each save; ``0``: none, only ``last.ckpt``). ``None`` (the default) keeps them all.

``save_weights_only: false`` writes the step files in full again (Lightning's behaviour), e.g. to
resume from an earlier step than the last.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Dict, List, Literal, Optional, Union

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dlm.core.errors import DLMError


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing a full ``last.ckpt`` and weights-only step files (see the module).

    Args (beyond :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s):
        save_weights_only: the step files hold the weights only (default ``True``); ``last.ckpt``
            always holds the full state.
        keep_last_k: how many of the most recent step files to keep (``None``: all; ``0``: none).
    """

    def __init__(
        self,
        dirpath: Optional[Union[str, os.PathLike]] = None,
        filename: Optional[str] = None,
        monitor: Optional[str] = None,
        verbose: bool = False,
        save_last: Optional[Union[bool, Literal["link"]]] = True,
        save_top_k: int = -1,
        save_on_exception: bool = False,
        save_weights_only: bool = True,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: Optional[int] = None,
        train_time_interval: Optional[timedelta] = None,
        every_n_epochs: Optional[int] = None,
        save_on_train_epoch_end: Optional[bool] = None,
        enable_version_counter: bool = True,
        keep_last_k: Optional[int] = None,
    ):
        if save_weights_only and not save_last:
            raise DLMError("checkpoint.save_last false with checkpoint.save_weights_only true leaves no checkpoint to "
                           "resume from: keep save_last true, or set save_weights_only false")
        if save_weights_only and save_last == "link":
            raise DLMError("checkpoint.save_last 'link' would point last.ckpt at a weights-only step file: use "
                           "save_last true (last.ckpt holds the full state), or set save_weights_only false")
        if keep_last_k is not None:
            if keep_last_k < 0:
                raise DLMError(f"checkpoint.keep_last_k must be 0 or more (or null: keep all), got {keep_last_k}")
            if monitor is not None or save_top_k != -1:
                raise DLMError("checkpoint.keep_last_k keeps the most recent step files: use it with save_top_k -1 and "
                               "no monitor (for the best files by a metric, use monitor and save_top_k instead)")
            if keep_last_k == 0:
                save_top_k = 0  # only last.ckpt
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose, save_last=save_last,
            save_top_k=save_top_k, save_on_exception=save_on_exception, save_weights_only=save_weights_only,
            mode=mode, auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=enable_version_counter,
        )
        self.keep_last_k = keep_last_k
        self.step_files: List[str] = []  # the step files written in this folder, oldest first

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: a run started with Lightning's callback resumes with this one (its
        # last_model_path restored, so last.ckpt is rewritten rather than a last-v1.ckpt added)
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        step_file = filepath != self.last_model_path  # _save_last_checkpoint sets it before saving
        weights_only = self.save_weights_only
        self.save_weights_only = weights_only and step_file  # last.ckpt: always the full state
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self.save_weights_only = weights_only
        if step_file:
            self._keep_last(trainer, filepath)

    def _keep_last(self, trainer, filepath: str) -> None:
        if filepath in self.step_files:
            self.step_files.remove(filepath)
        self.step_files.append(filepath)
        if self.keep_last_k is None:
            return
        while len(self.step_files) > self.keep_last_k:
            old = self.step_files.pop(0)
            # never the file this run resumed from, nor one outside the checkpoint folder
            if self._should_remove_checkpoint(trainer, old, filepath):
                self._remove_checkpoint(trainer, old)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "step_files": list(self.step_files)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.step_files = [str(path) for path in state_dict.get("step_files", [])]
