"""``dlm eval``: score checkpoints (diffusion or plain AR) on the paper's protocols.

    dlm eval --model runs/x/last.ckpt --model assets/smollm2-135m \\
        --task likelihood --data assets/shakespeare/val --set max_blocks=32 --set draws=4
    dlm eval --config experiments/eval/shakespeare.yaml [--model ...] [--out results.json]

Parsed by jsonargparse, like ``dlm fit``, ``dlm sample`` and ``dlm export``. ``--config`` is a
YAML of this command's options by their names: mostly ``models`` (paths, or ``{path, kind,
name}``), ``tasks`` (a list of ``{task: <kind>, name, data, <options>}``), ``defaults`` (options
for every task that has them), ``device``, ``dtype``, ``threads`` and ``out``. A flag given after
``--config`` overrides its key; ``--model`` (repeatable) replaces its models, ``--task`` (with
``--data``, ``--format``, ``--name`` and ``--set key=value``) replaces its tasks, and ``--set``
without ``--task`` applies to every task of the config. Bad input stops with one line.
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentError
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from lightning_dlm.core.errors import DLMError

TASK_KEYS = ("data", "format", "name")  # the flags that describe the one --task
REPEATABLE = ("--model", "--set")  # lists that a repeated flag appends to (jsonargparse's --model+)


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: Optional[List[str]]) -> Dict[str, Any]:
    """``["levels=8", "limit=100"]`` -> ``{"levels": 8, "limit": 100}`` (values read as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise DLMError(f"--set '{item}' is not key=value: write e.g. --set levels=8")
        key, value = item.split("=", 1)
        out[key.strip()] = _value(value)
    return out


def build_parser() -> ArgumentParser:
    """The ``dlm eval`` parser (jsonargparse); its defaults are :class:`EvalConfig`'s."""
    from lightning_dlm.commands.sample import TRUST_HELP
    from lightning_dlm.evaluation.runner import EvalConfig
    from lightning_dlm.evaluation.tasks import TASKS

    d = EvalConfig(models=[], tasks=[])
    p = ArgumentParser(prog="dlm eval", description=__doc__.split("\n")[0].strip("`").replace("``", ""),
                       epilog=f"tasks: {', '.join(sorted(TASKS))}. Flags after --config override its keys.",
                       exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML of these options (models, tasks, defaults, device, dtype, threads, out, ...)")
    p.add_argument("--models", type=List[Union[str, Dict[str, Any]]], default=[],
                   help="the models to compare: paths or {path, kind, name} mappings (a config key)")
    p.add_argument("--model", type=List[str], default=[],
                   help="a diffusion checkpoint (.ckpt, sharded or exported folder) or a causal LM; "
                        "repeat for side-by-side columns (replaces models)")
    p.add_argument("--kind", type=Literal["auto", "diffusion", "ar"], default="auto",
                   help="model kind of every model given as a path (auto: from its files)")
    p.add_argument("--tasks", type=List[Dict[str, Any]], default=[],
                   help="the tasks: {task: <kind>, name, data, <options>} mappings (a config key)")
    p.add_argument("--defaults", type=Dict[str, Any], default={},
                   help="options given to every task that has them, e.g. {seed: 0}")
    p.add_argument("--task", type=Optional[str], default=None, help="one task kind (replaces tasks)")
    p.add_argument("--data", type=Optional[str], default=None,
                   help="the --task's data file (a corpus file or folder for likelihood)")
    p.add_argument("--format", type=Optional[str], default=None,
                   help="the --task file's format (hellaswag, winogrande, siqa, piqa, choice, lambada, ...)")
    p.add_argument("--name", type=Optional[str], default=None, help="the --task's name in the results")
    p.add_argument("--set", type=List[str], default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. levels=8; repeatable (without --task: for every task)")
    p.add_argument("--out", type=Optional[str], default=d.out, help="write the results here as JSON")
    p.add_argument("--device", type=str, default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=str, default=d.dtype, help="weights dtype of AR models (float32, bfloat16)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--progress", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="progress bars (--no-progress: none)")
    p.add_argument("--trust_checkpoint", "--trust-checkpoint", action=ActionYesNo, default=d.trust_checkpoint,
                   help=TRUST_HELP)
    return p


def _one_line(err: ArgumentError) -> str:
    """jsonargparse's message on one line, keys named as the flags."""
    text = re.sub(r'Parser key "([^"]+)":', r"--\1:", str(err))
    text = " ".join(text.split())
    text = re.sub(r"^--config: File does not exist: (.*)$", r"config file \1 does not exist", text)
    text = re.sub(r"^Option '(.*)' is not accepted$", r"the config key '\1' is no option of dlm eval", text)
    if text.startswith(("unrecognized arguments", "the config key")):
        text += " (see dlm eval --help)"
    return text


def _appending(argv: List[str]) -> List[str]:
    """``--model a --model b`` as jsonargparse's ``--model+ a --model+ b`` (append to the list)."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(f"{flag}+{eq}{value}" if flag in REPEATABLE else arg)
    return out


def parse_args(argv: List[str]) -> Namespace:
    """The options of ``dlm eval`` (jsonargparse's errors as one-line :class:`DLMError`)."""
    try:
        return build_parser().parse_args(_appending(list(argv)))
    except ArgumentError as err:
        raise DLMError(_one_line(err)) from None


def config_from_args(cfg: Namespace):
    """The :class:`EvalConfig` of parsed options: flags over the config file's keys."""
    from lightning_dlm.evaluation.runner import EvalConfig, ModelSpec

    models = [ModelSpec.parse(m, cfg.kind) for m in (cfg.model or cfg.models or [])]
    sets = parse_sets(cfg.set)
    if cfg.task:
        task = dict(task=cfg.task, **sets)
        task.update({key: cfg[key] for key in TASK_KEYS if cfg[key] is not None})
        tasks = [task]
    else:
        given = [f"--{key}" for key in TASK_KEYS if cfg[key] is not None]
        if given:
            raise DLMError(f"{' '.join(given)} describe(s) one --task: add --task <kind>, or set them in the "
                           f"config's tasks")
        tasks = [dict(t, **sets) for t in cfg.tasks or []]
    return EvalConfig(models=models, tasks=tasks, defaults=dict(cfg.defaults or {}), device=cfg.device,
                      dtype=cfg.dtype, out=cfg.out, threads=cfg.threads, trust_checkpoint=cfg.trust_checkpoint)


def eval_command(argv: List[str]) -> Dict[str, Any]:
    from lightning_dlm.evaluation.runner import run_evaluation, table

    cfg = parse_args(argv)
    config = config_from_args(cfg)
    results = run_evaluation(config, progress=cfg.progress, log=lambda m: print(m, file=sys.stderr))
    print(table(results))
    return results
