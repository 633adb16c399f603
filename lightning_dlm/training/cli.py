"""The Lightning CLI of ``dlm fit/validate/test`` (and ``dlm sft``, ``dlm demo``): LightningCLI with a
step-based checkpoint callback, the tokenizer linked model -> data, resume checks and atomic
checkpoint files."""

from __future__ import annotations

import sys
from typing import List, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_dlm.core.errors import DLMError
from lightning_dlm.data import TextDataModule
from lightning_dlm.training.callbacks.checkpointing import StepCheckpoint
from lightning_dlm.training.callbacks.progress import add_step_progress
from lightning_dlm.training.checkpoint_io import AtomicCheckpointIO
from lightning_dlm.training.distributed import check_devices
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.resume import check_resume
from lightning_dlm.training.runs import isolate_run


def _tokenizer_of(tokenizer: Optional[str], pretrained: Optional[str]) -> Optional[str]:
    return tokenizer or pretrained


class DLMCLI(LightningCLI):
    """LightningCLI with a step-based checkpoint callback and the tokenizer linked model -> data."""

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
        isolate_run(config, self.subcommand)

    _resume_ckpt_path = None  # fit --ckpt_path, while hidden from LightningCLI (see parse_arguments)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # fit --ckpt_path: the config's options win over the checkpoint's, changes printed, forbidden ones
        # refused (check_resume). Right after this hook LightningCLI parses the checkpoint's
        # hyper-parameters over the config, without a word and with no public hook to change it; it
        # finds no ckpt_path to read, and before_instantiate_classes puts the path back before anything
        # reads it. validate / test keep Lightning's behaviour (the checkpoint's options).
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
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


def lightning_kwargs() -> dict:
    """How ``dlm`` builds its LightningCLI (shared by the demo, which runs several in one process)."""
    return dict(
        model_class=DiffusionLM,
        datamodule_class=TextDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs"},
        seed_everything_default=0,
    )


def lightning_main(args: Optional[List[str]]) -> None:
    """``dlm fit|validate|test|predict``: ``args`` is the command line (None: LightningCLI reads sys.argv)."""
    DLMCLI(args=args, **lightning_kwargs())


def sft_main(args: List[str]) -> None:
    """``dlm sft fit|validate``: the Lightning CLI with the SFT data module (prompt never noised nor
    scored, EOS padding scored)."""
    from lightning_dlm.data.sft_datamodule import SFTDataModule

    if not args or args[0] not in ("fit", "validate", "-h", "--help"):
        raise DLMError("usage: dlm sft fit --config experiments/sft/smollm2_arith.yaml (or dlm sft validate ...)")
    DLMCLI(args=args, **{**lightning_kwargs(), "datamodule_class": SFTDataModule})
