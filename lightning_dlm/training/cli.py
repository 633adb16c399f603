"""The Lightning CLI of ``dlm fit/validate/test`` (and ``dlm sft``, ``dlm demo``): LightningCLI with a
step-based checkpoint callback, the tokenizer linked model -> data, resume checks and atomic
checkpoint files; Ctrl-C in a fit is one line saying what to resume from (exit 130)."""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_dlm.core.errors import DLMError
from lightning_dlm.data import TextDataModule
from lightning_dlm.io.safe_read import NO_TRUST_HINT, is_exported_folder, load_checkpoint_file
from lightning_dlm.training.callbacks.checkpointing import StepCheckpoint
from lightning_dlm.training.callbacks.progress import add_step_progress
from lightning_dlm.training.checkpoint_io import AtomicCheckpointIO
from lightning_dlm.training.distributed import check_devices
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.resume import check_resume, ckpt_path_target
from lightning_dlm.training.runs import isolate_run, lock_run, release_run


def _tokenizer_of(tokenizer: Optional[str], pretrained: Optional[str]) -> Optional[str]:
    return tokenizer or pretrained


def check_ckpt_path(path: str) -> None:
    """``dlm validate|test|predict --ckpt_path``: read as tensors and plain data before Lightning reads
    it, so a missing, truncated, foreign or crafted file (one that pickles code) is one line, not
    Lightning's traceback. (``fit --ckpt_path`` is checked by :func:`check_resume`.)"""
    if is_exported_folder(path):
        raise DLMError(f"--ckpt_path {path} is a folder written by dlm export, not a training checkpoint: give a .ckpt "
                       f"written by dlm fit (an exported model is scored with dlm eval)")
    target = ckpt_path_target(path)  # the path, or a sharded folder's meta.pt
    sharded = target != path
    checkpoint = load_checkpoint_file(target, hint=NO_TRUST_HINT)  # tensors memory-mapped: cheap
    if not isinstance(checkpoint, dict) or (not sharded and not isinstance(checkpoint.get("state_dict"), dict)):
        raise DLMError(f"--ckpt_path {path} is not a checkpoint written by dlm fit (it holds no state_dict): "
                       f"give runs/<run>/checkpoints/last.ckpt or a step file")


def parse_error_line(err: BaseException, command: str) -> DLMError:
    """jsonargparse's error (after the whole usage, many lines: every type it tried) as one line, the
    key and the reason that matters, and a pointer to the help."""
    lines = [line.strip().lstrip("- ").strip() for line in str(err).strip().splitlines() if line.strip()]
    lines = lines or [type(err).__name__]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:  # 'Parser key "trainer.callbacks":' says where, a later line what
        # a class named in the config that does not load says most; else the first reason that is not a fallback tried
        reason = next((f"{line.rstrip(':')}: {lines[i + 1]}" for i, line in enumerate(lines[:-1])
                       if line.startswith("Problem with given class_path")), None)
        reason = reason or next((line for line in lines[1:] if not line.startswith("Expected a path")), lines[1])
        text = f"{text.rstrip(':')}: {reason}"
    return DLMError(f"{text[:400]}: see {command} --help")


class DLMCLI(LightningCLI):
    """LightningCLI with a step-based checkpoint callback and the tokenizer linked model -> data."""

    command = "dlm"  # how the help is named in one-line parse errors ("see dlm fit --help")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # a full last.ckpt to resume from, weights-only step files (checkpoint.keep_last_k: how many)
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments(
            ("model.backbone.tokenizer", "model.backbone.pretrained"), "data.tokenizer", compute_fn=_tokenizer_of
        )

    def before_instantiate_classes(self) -> None:
        if self._resume_ckpt_path is not None:  # hidden from LightningCLI's own reading (parse_arguments)
            self.config[self.subcommand].ckpt_path = self._resume_ckpt_path
        # before anything is built or written: FSDP or a GPU accelerator on a machine without CUDA,
        # and a fresh fit into a folder that holds another run's checkpoints
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_devices(config.trainer)
        # fit: the run folder is this run's until it ends (a second run into it stops with one line)
        self._run_locks = lock_run(config, self.subcommand)
        isolate_run(config, self.subcommand)

    _run_locks: list = []  # the run folder locks of fit, released when the CLI's run ends (__init__)

    def __init__(self, *args, **kwargs) -> None:
        try:
            super().__init__(*args, **kwargs)
        except SystemExit as stop:
            # Lightning catches Ctrl-C, stops gracefully (callbacks told, loggers closed) and exits 1
            # without a word in quiet mode: say where the run stands and exit as any Ctrl-C does (130)
            trainer = getattr(self, "trainer", None)
            if stop.code == 1 and trainer is not None and trainer.interrupted:
                raise FitInterrupted(interrupted_line(trainer) if trainer.is_global_zero else "") from None
            raise
        finally:  # the run ended, failed or was interrupted: its folders are free again
            release_run(self._run_locks)
            self._run_locks = []

    _resume_ckpt_path = None  # fit --ckpt_path, while hidden from LightningCLI (see parse_arguments)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # fit --ckpt_path: the config's options win over the checkpoint's, changes printed, forbidden ones
        # refused (check_resume). Right after this hook LightningCLI parses the checkpoint's
        # hyper-parameters over the config, without a word and with no public hook to change it; it
        # finds no ckpt_path to read, and before_instantiate_classes puts the path back before anything
        # reads it. validate / test keep Lightning's behaviour (the checkpoint's options).
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # parser_kwargs exit_on_error=False: the error alone, without ~120 lines of usage
            given = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, tuple, type(None))) else []
            subcommand = next((arg for arg in given if arg in self.subcommands()), None)
            raise parse_error_line(err, f"{self.command} {subcommand}" if subcommand else self.command) from None
        subcommand = self.config.get("subcommand")
        if subcommand in ("validate", "test", "predict") and self.config[subcommand].get("ckpt_path"):
            check_ckpt_path(str(self.config[subcommand].ckpt_path))  # before LightningCLI reads it
        if subcommand != "fit" or not self.config[subcommand].get("ckpt_path"):
            return
        path = str(self.config[subcommand].ckpt_path)
        for key, old, new in check_resume(path, self.config[subcommand].model):
            print(f"resume: model.{key} changed from {old!r} (checkpoint) to {new!r}", file=sys.stderr)
        self._resume_ckpt_path = self.config[subcommand].ckpt_path
        self.config[subcommand].ckpt_path = None

    def instantiate_trainer(self, **kwargs):
        # step n/N, loss, tokens/s, ETA (plain lines when not a terminal) unless the config has a progress bar
        add_step_progress(self._get(self.config_init, "trainer", default={}))
        trainer = super().instantiate_trainer(**kwargs)
        # checkpoint files written atomically in their own folder (Lightning stages them in /tmp)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


class FitInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a fit: its message is the line to print (empty on ranks other than 0)."""


def interrupted_line(trainer) -> str:
    """Where a fit stopped by Ctrl-C stands: its step and the checkpoint to resume from, if any."""
    step = trainer.global_step
    checkpoint = trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", "") if checkpoint is not None else ""
    if last and os.path.isfile(last):
        saved = getattr(checkpoint, "last_full_step", None)
        at = f" (step {saved})" if saved is not None else ""
        return f"interrupted at step {step}: resume from its last checkpoint{at} with --ckpt_path {last}"
    return f"interrupted at step {step}, before its first checkpoint: nothing was saved to resume from"


def lightning_kwargs() -> dict:
    """How ``dlm`` builds its LightningCLI (shared by the demo, which runs several in one process)."""
    return dict(
        model_class=DiffusionLM,
        datamodule_class=TextDataModule,
        # exit_on_error False: a bad option raises, and DLMCLI.parse_arguments says it in one line
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs"},
        seed_everything_default=0,
    )


def _run_cli(cli_class, args: Optional[List[str]], **kwargs) -> None:
    try:
        cli_class(args=args, **kwargs)
    except ArgumentError as err:  # parsed after parse_arguments: validate/test's checkpoint hyper-parameters
        given = list(sys.argv[1:] if args is None else args)
        raise parse_error_line(err, f"{cli_class.command} {given[0]}" if given else cli_class.command) from None


def lightning_main(args: Optional[List[str]]) -> None:
    """``dlm fit|validate|test|predict``: ``args`` is the command line (None: LightningCLI reads sys.argv)."""
    _run_cli(DLMCLI, args, **lightning_kwargs())


class SFTCLI(DLMCLI):
    """``dlm sft``'s CLI (its errors point to ``dlm sft fit --help``)."""

    command = "dlm sft"


def sft_main(args: List[str]) -> None:
    """``dlm sft fit|validate``: the Lightning CLI with the SFT data module (prompt never noised nor
    scored, EOS padding scored)."""
    from lightning_dlm.data.sft_datamodule import SFTDataModule

    if not args or args[0] not in ("fit", "validate", "-h", "--help"):
        raise DLMError("usage: dlm sft fit --config experiments/sft/smollm2_arith.yaml (or dlm sft validate ...)")
    _run_cli(SFTCLI, args, **{**lightning_kwargs(), "datamodule_class": SFTDataModule})
