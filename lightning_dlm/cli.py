"""The ``dlm`` command: LightningCLI for fit/validate/test, plus lightning_dlm's own subcommands.

    dlm fit --config experiments/debug.yaml [--trainer.max_steps 100 ...]
    dlm validate --config experiments/smollm2_shakespeare.yaml [--ckpt_path ...]
    dlm sample --ckpt runs/.../last.ckpt --prompt "To be" [--suffix "..."]
    dlm eval --model runs/.../last.ckpt --model assets/smollm2-135m --task likelihood --data ...
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_dlm.callbacks.checkpointing import StepCheckpoint
from lightning_dlm.callbacks.progress import add_step_progress
from lightning_dlm.checkpoint_io import AtomicCheckpointIO
from lightning_dlm.data import TextDataModule
from lightning_dlm.distributed import check_devices
from lightning_dlm.errors import DLMError
from lightning_dlm.module import DiffusionLM
from lightning_dlm.resume import check_resume
from lightning_dlm.runs import isolate_run


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
        # before anything is built or written: FSDP or a GPU accelerator on a machine without CUDA,
        # and a fresh fit into a folder that holds another run's checkpoints
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_devices(config.trainer)
        isolate_run(config, self.subcommand)

    def _parse_ckpt_path(self) -> None:
        # fit: the config's options win over the checkpoint's, changes printed, forbidden ones refused
        # (LightningCLI would parse the checkpoint's hyper-parameters over them without a word)
        subcommand = self.config.get("subcommand")
        if subcommand != "fit" or not self.config[subcommand].get("ckpt_path"):
            super()._parse_ckpt_path()
            return
        path = str(self.config[subcommand].ckpt_path)
        for key, old, new in check_resume(path, self.config[subcommand].model):
            print(f"resume: model.{key} changed from {old!r} (checkpoint) to {new!r}", file=sys.stderr)

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
    DLMCLI(args=args, **lightning_kwargs())


def sample_main(args: List[str]) -> None:
    from lightning_dlm.commands.sample import sample_command

    sample_command(args)


def demo_main(args: List[str]) -> None:
    from lightning_dlm.commands.demo import demo_command

    demo_command(args)


def export_main(args: List[str]) -> None:
    from lightning_dlm.commands.export import export_command

    export_command(args)


def eval_main(args: List[str]) -> None:
    from lightning_dlm.commands.eval import eval_command

    eval_command(args)


def sweep_main(args: List[str]) -> None:
    from lightning_dlm.commands.sweep import sweep_command

    sweep_command(args)


def sft_main(args: List[str]) -> None:
    # fit / validate with the SFT data module (prompt never noised nor scored, EOS padding scored)
    from lightning_dlm.data.sft_datamodule import SFTDataModule

    if not args or args[0] not in ("fit", "validate", "-h", "--help"):
        raise DLMError("usage: dlm sft fit --config experiments/sft/smollm2_arith.yaml (or dlm sft validate ...)")
    DLMCLI(args=args, **{**lightning_kwargs(), "datamodule_class": SFTDataModule})


def chat_main(args: List[str]) -> None:
    from lightning_dlm.commands.chat import chat_command

    chat_command(args)


def compare_main(args: List[str]) -> None:
    from lightning_dlm.commands.compare import compare_command

    compare_command(args)


def lm_eval_main(args: List[str]) -> None:
    try:
        from lightning_dlm.evaluation.harness import lm_eval_command
    except ImportError as err:
        raise DLMError(f"dlm lm-eval needs lm-eval ({err}): pip install 'lightning_dlm[eval]'") from None
    lm_eval_command(args)


COMMANDS: Dict[str, Callable[[List[str]], None]] = {
    "sample": sample_main, "demo": demo_main, "export": export_main, "eval": eval_main, "lm-eval": lm_eval_main,
    "sweep": sweep_main, "compare": compare_main, "sft": sft_main, "chat": chat_main,
}

#: Every subcommand with its one line (LightningCLI's four, then lightning_dlm's own).
SUBCOMMANDS: Dict[str, str] = {
    "fit": "adapt a causal LM into a diffusion LM (or resume: --ckpt_path) from a YAML config",
    "validate": "the validation NELBO of a config's model or of a checkpoint (--ckpt_path)",
    "test": "the NELBO on the config's data.test corpus",
    "predict": "Lightning's predict loop (no predict step is defined: use sample or eval)",
    "sample": "generate text from a checkpoint or exported model (continuation, infilling)",
    "demo": "adapt SmolLM2 on Shakespeare on the CPU, then show what it generates (make demo)",
    "export": "write a checkpoint as a Hugging Face folder that plain transformers loads",
    "eval": "evaluate diffusion and AR models side by side (likelihood, choice, generation tasks)",
    "lm-eval": "run lm-evaluation-harness with lightning_dlm registered as a model",
    "sweep": "run a config under a grid of overrides, one run folder per arm (locally or on SLURM)",
    "compare": "put runs side by side from their TensorBoard logs: a table and PNG plots",
    "sft": "instruction-tune on prompt/response or chat records (dlm sft fit --config ...)",
    "chat": "chat with a checkpoint in the terminal, watching each reply denoise",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: dlm <subcommand> [options]   (dlm <subcommand> --help for its options)", "",
             "Adapt pretrained autoregressive LMs into masked diffusion LMs.", "", "subcommands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(usage(), file=sys.stdout if args else sys.stderr)
            sys.exit(0 if args else 2)
        if args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        elif args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
            raise DLMError(f"unknown subcommand '{args[0]}': choose one of {', '.join(SUBCOMMANDS)} (dlm --help)")
        else:
            # LightningCLI reads sys.argv itself when run as a program (args=None).
            lightning_main(None if argv is None else args)
    except DLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
