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

A run folder moved or copied elsewhere resumes in place: resumed from a checkpoint of its own
checkpoint folder, the paths the state remembers (``last.ckpt``, the step files, the best ones)
are read as files of the folder it is in now, and ``last.ckpt`` and the step files there are
rewritten, never joined by a ``last-v1.ckpt`` or ``step0000080-v1.ckpt`` (a step file newer than
``last.ckpt``, left by a Ctrl-C between the two saves of a step, is rewritten by the resumed
run). Pruning (``keep_last_k``, ``save_top_k``) counts the step files found in the folder too, so
the files a ``kill -9`` left beyond the limit go at the next save.
"""

from __future__ import annotations

import os
import re
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
        self.last_full_step: Optional[int] = None  # the step of the last.ckpt this run wrote

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
        if not step_file:
            self.last_full_step = trainer.global_step
        if step_file:
            if filepath in self.step_files:
                self.step_files.remove(filepath)
            self.step_files.append(filepath)
        self._prune(trainer, filepath)

    # --- the run's own folder -------------------------------------------------------------------------

    def resumed_here(self, trainer) -> bool:
        """Whether the run resumed from a checkpoint of this callback's folder: its files are the run's
        (a fresh run keeps Lightning's behaviour towards files it finds there: versioned names)."""
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if not ckpt_path or not self.dirpath or "://" in str(ckpt_path) or "://" in str(self.dirpath):
            return False
        folder = os.path.dirname(os.path.realpath(str(ckpt_path)).rstrip(os.sep))
        return folder == os.path.realpath(str(self.dirpath))

    def step_file_names(self) -> Optional["re.Pattern[str]"]:
        """The names of this callback's step files (its ``filename`` template, any version suffix);
        None when the template names sub-folders."""
        template = self.filename or "{epoch}-{step}"  # Lightning's default
        if "/" in template or os.sep in template:
            return None
        body = ".+?".join(re.escape(part) for part in re.split(r"\{[^{}]*\}", template))
        return re.compile(rf"^{body}(-v\d+)?{re.escape(self.FILE_EXTENSION)}$")

    def found_step_files(self) -> List[str]:
        """The step files in the checkpoint folder (not ``last.ckpt``, nor hidden temp files)."""
        pattern = self.step_file_names()
        if pattern is None or not self.dirpath or not os.path.isdir(str(self.dirpath)):
            return []
        last = re.compile(rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-v?\d+)?{re.escape(self.FILE_EXTENSION)}$")
        names = sorted(name for name in os.listdir(str(self.dirpath))
                       if pattern.match(name) and not last.match(name) and not name.startswith("."))
        return [os.path.join(str(self.dirpath), name) for name in names]

    def file_exists(self, filepath, trainer) -> bool:
        # In the folder the run resumed from, last.ckpt and the step files are the run's own:
        # rewritten, never versioned. A step file can be newer than last.ckpt (Ctrl-C between the
        # two saves of a checkpoint step, the step file first); the resumed run reaches that step
        # again with the same state (resume is exact) and rewrites it. The same answer on every
        # rank: no collective is skipped on one rank only.
        name, pattern = os.path.basename(str(filepath)), self.step_file_names()
        step_file = pattern.match(name) if pattern is not None else None
        own = name == self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION or (
            step_file is not None and step_file.group(1) is None)  # group 1: a version suffix
        if own and self.dirpath and os.path.dirname(str(filepath)) == str(self.dirpath) and self.resumed_here(trainer):
            return False
        return super().file_exists(filepath, trainer)

    def _kept(self) -> Optional[set]:
        """The step files to keep after a save (None: all)."""
        if self.keep_last_k is not None:
            return set(self.step_files[-self.keep_last_k:]) if self.keep_last_k else set()
        if self.save_top_k == -1:
            return None
        if self.save_top_k == 0:
            return set()
        if self.monitor is not None:
            return set(self.best_k_models)
        return {self.best_model_path}  # save_top_k 1 without a monitor: the latest

    def _prune(self, trainer, current: str) -> None:
        keep = self._kept()
        if keep is None:
            return
        candidates = list(self.step_files)
        if self.resumed_here(trainer):  # also those a kill -9 left behind, which no state remembers
            candidates += [path for path in self.found_step_files() if path not in candidates]
        for old in candidates:
            if old in keep or old == current:
                continue
            if old in self.step_files:
                self.step_files.remove(old)
            # never the file this run resumed from, nor one outside the checkpoint folder
            if self._should_remove_checkpoint(trainer, old, current):
                self._remove_checkpoint(trainer, old)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "step_files": list(self.step_files)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # called right before load_state_dict: the run resumes from a checkpoint of this folder
        self._moved_here = self.resumed_here(trainer)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    _moved_here = False

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        old = state_dict.get("dirpath", self.dirpath)
        if old and self.dirpath and old != self.dirpath and self._moved_here:
            state_dict = self.moved_state(state_dict, str(old))  # the folder was moved or copied here
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.step_files = [str(path) for path in state_dict.get("step_files", [])]

    def moved_state(self, state_dict: Dict[str, Any], old: str) -> Dict[str, Any]:
        """The state of a run whose checkpoint folder was ``old``, read in the folder it is in now:
        the paths in ``old`` become the same files here (dropped where no such file is here); paths
        outside ``old`` are dropped (they are no files of this folder)."""
        def here(path) -> str:
            path = str(path or "")
            if not path.startswith(os.path.join(old, "")):
                return ""
            moved = os.path.join(str(self.dirpath), os.path.relpath(path, old))
            return moved if os.path.exists(moved) else ""

        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = here(state[key])
        if "best_k_models" in state:
            state["best_k_models"] = {here(path): score for path, score in state["best_k_models"].items() if here(path)}
        state["step_files"] = [here(path) for path in state.get("step_files", []) if here(path)]
        return state
