"""The ``dlm`` command: one table of subcommands (name, one line of help, entry point).

    dlm fit --config experiments/debug.yaml [--trainer.max_steps 100 ...]
    dlm validate --config experiments/smollm2_shakespeare.yaml [--ckpt_path ...]
    dlm sample --ckpt runs/.../last.ckpt --prompt "To be" [--suffix "..."]
    dlm eval --model runs/.../last.ckpt --model assets/smollm2-135m --task likelihood --data ...

Entry points import their command on first use, so ``dlm --help`` loads no model code. Output is
lightning_dlm's own lines: the libraries' chatter (Lightning's device lines and tips, warnings,
transformers' reports and bars) is off unless ``--verbose`` is given, anywhere on the command line,
or ``DLM_VERBOSE=1`` (:mod:`lightning_dlm.training.quiet`). A bad command line or input is one line
``error: ...`` (exit 2); Ctrl-C is one line (exit 130): ``interrupted``, or in a fit where it stopped and the checkpoint to resume from.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, List, NamedTuple, Optional

from lightning_dlm.core.errors import DLMError
from lightning_dlm.training.quiet import quiet_third_party, take_verbose


class Subcommand(NamedTuple):
    """One row of the table: ``entry`` is ``module:function``, imported when the subcommand runs;
    ``lightning``: a LightningCLI subcommand (the function gets the whole command line, its name
    included); ``needs``: the extra whose absence is one line instead of an ImportError."""

    name: str
    help: str
    entry: str
    lightning: bool = False
    needs: Optional[str] = None


LIGHTNING = "lightning_dlm.training.cli:lightning_main"

#: Every subcommand with its one line (LightningCLI's four, then lightning_dlm's own).
SUBCOMMANDS: List[Subcommand] = [
    Subcommand("fit", "adapt a causal LM into a diffusion LM (or resume: --ckpt_path) from a YAML config", LIGHTNING, True),
    Subcommand("validate", "the validation NELBO of a config's model or of a checkpoint (--ckpt_path)", LIGHTNING, True),
    Subcommand("test", "the NELBO on the config's data.test corpus", LIGHTNING, True),
    Subcommand("predict", "Lightning's predict loop (no predict step is defined: use sample or eval)", LIGHTNING, True),
    Subcommand("sample", "generate text from a checkpoint or exported model (continuation, infilling)",
               "lightning_dlm.commands.sample:sample_command"),
    Subcommand("demo", "adapt SmolLM2 on Shakespeare on the CPU, then show what it generates (make demo)",
               "lightning_dlm.commands.demo:demo_command"),
    Subcommand("export", "write a checkpoint as a Hugging Face folder that plain transformers loads",
               "lightning_dlm.commands.export:export_command"),
    Subcommand("eval", "evaluate diffusion and AR models side by side (likelihood, choice, generation tasks)",
               "lightning_dlm.commands.eval:eval_command"),
    Subcommand("lm-eval", "run lm-evaluation-harness with lightning_dlm registered as a model",
               "lightning_dlm.evaluation.harness:lm_eval_command", needs="eval"),
    Subcommand("sweep", "run a config under a grid of overrides, one run folder per arm (locally or on SLURM)",
               "lightning_dlm.commands.sweep:sweep_command"),
    Subcommand("compare", "put runs side by side from their TensorBoard logs: a table and PNG plots",
               "lightning_dlm.commands.compare:compare_command"),
    Subcommand("sft", "instruction-tune on prompt/response or chat records (dlm sft fit --config ...)",
               "lightning_dlm.training.cli:sft_main"),
    Subcommand("chat", "chat with a checkpoint in the terminal, watching each reply denoise",
               "lightning_dlm.commands.chat:chat_command"),
]
BY_NAME = {row.name: row for row in SUBCOMMANDS}


def entry_point(row: Subcommand) -> Callable[[Optional[List[str]]], None]:
    """The function of a row, imported now."""
    module, _, function = row.entry.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as err:
        if row.needs is None:
            raise
        raise DLMError(f"dlm {row.name} needs the '{row.needs}' extra ({err}): pip install 'lightning_dlm[{row.needs}]'") from None


def usage() -> str:
    width = max(len(row.name) for row in SUBCOMMANDS)
    lines = ["usage: dlm [--verbose] <subcommand> [options]   (dlm <subcommand> --help for its options)", "",
             "Adapt pretrained autoregressive LMs into masked diffusion LMs.", "", "subcommands:"]
    lines += [f"  {row.name.ljust(width)}  {row.help}" for row in SUBCOMMANDS]
    lines += ["", "options:",
              "  --verbose  also show what the libraries print (Lightning, transformers, warnings); anywhere on",
              "             the command line, or DLM_VERBOSE=1"]
    return "\n".join(lines)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def main(argv: Optional[List[str]] = None) -> None:
    args, verbose = take_verbose(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        sys.argv[1:] = args  # LightningCLI reads sys.argv: without --verbose
    try:
        if not args or args[0] in ("-h", "--help"):
            print(usage(), file=sys.stdout if args else sys.stderr)
            sys.exit(0 if args else 2)
        row = BY_NAME.get(args[0])
        if row is None and not args[0].startswith("-"):
            raise DLMError(f"unknown subcommand '{args[0]}': choose one of {', '.join(BY_NAME)} (dlm --help)")
        # before the subcommand imports anything: the libraries read some of their settings on import
        quiet_third_party(verbose)
        if row is None or row.lightning:
            # LightningCLI reads sys.argv itself when run as a program (args=None).
            entry_point(BY_NAME["fit"])(None if argv is None else args)
        else:
            entry_point(row)(args[1:])
    except DLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        # Ctrl-C anywhere a subcommand does not handle it itself (chat and sweep say their own line): one
        # line (a fit's names the checkpoint to resume from; the other ranks of a fit say nothing), the
        # shell's exit code for SIGINT, no traceback
        message = str(interrupt) if type(interrupt) is not KeyboardInterrupt else "interrupted"
        if message:
            print(("\n" if _is_terminal(sys.stderr) else "") + message, file=sys.stderr, flush=True)  # past the ^C
        sys.exit(130)
