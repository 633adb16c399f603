"""``dlm eval``: score checkpoints (diffusion or plain AR) on the paper's protocols.

    dlm eval --model runs/x/last.ckpt --model assets/smollm2-135m \\
        --task likelihood --data assets/shakespeare/val --set max_blocks=32 --set draws=4
    dlm eval --config experiments/eval_shakespeare.yaml [--model ...] [--out results.json]

A config file holds ``models`` (paths, or ``{path, kind, name}``), ``tasks`` (a list of
``{task: <kind>, name, data, <options>}``), ``defaults`` (options for every task that has them),
``device``, ``dtype`` and ``out``. Flags override it: ``--model`` replaces its models, ``--task``
(with ``--data``, ``--format``, ``--name`` and ``--set key=value`` options) replaces its tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

import yaml

from lightning_dlm.errors import DLMError


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: List[str]) -> Dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise DLMError(f"--set '{item}' is not key=value: write e.g. --set levels=8")
        key, value = item.split("=", 1)
        out[key.strip()] = _value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    from lightning_dlm.evaluation.tasks import TASKS

    p = argparse.ArgumentParser(prog="dlm eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"tasks: {', '.join(sorted(TASKS))}")
    p.add_argument("--config", help="YAML file with models, tasks, defaults, out")
    p.add_argument("--model", action="append", default=[],
                   help="a diffusion checkpoint (.ckpt, sharded or exported folder) or a causal LM; repeat to compare")
    p.add_argument("--kind", default="auto", choices=["auto", "diffusion", "ar"], help="model kind of every --model")
    p.add_argument("--task", help="one task kind (replaces the config's tasks)")
    p.add_argument("--data", help="the task's data file (or corpus path for likelihood)")
    p.add_argument("--format", help="the task file's format (hellaswag, winogrande, siqa, piqa, choice, lambada, ...)")
    p.add_argument("--name", help="the task's name in the results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a task option, e.g. levels=8")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", help="weights dtype of AR models (float32, bfloat16)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust_checkpoint", "--trust-checkpoint", action="store_true",
                   help="unpickle diffusion checkpoints in full, which runs any code in them: only for files whose "
                        "author you trust (by default only tensors and plain data are read)")
    return p


def config_from_args(args: argparse.Namespace):
    from omegaconf import OmegaConf

    from lightning_dlm.evaluation.runner import EvalConfig, ModelSpec

    raw: Dict[str, Any] = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise DLMError(f"config file '{args.config}' does not exist")
        raw = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True) or {}
        unknown = sorted(set(raw) - {"models", "tasks", "defaults", "device", "dtype", "out", "threads"})
        if unknown:
            raise DLMError(f"config '{args.config}' has unknown key(s) {unknown}: use models, tasks, defaults, "
                           f"device, dtype, out, threads")
    models = [dict(path=m, kind=args.kind) for m in args.model] if args.model else raw.get("models") or []
    models = [ModelSpec(**({"path": m} if isinstance(m, str) else m)) for m in models]
    if args.task:
        task = dict(task=args.task, **parse_sets(args.set))
        for key in ("data", "format", "name"):
            if getattr(args, key) is not None:
                task[key] = getattr(args, key)
        tasks = [task]
    else:
        tasks = list(raw.get("tasks") or [])
        sets = parse_sets(args.set)
        tasks = [dict(t, **sets) for t in tasks] if sets else tasks
    return EvalConfig(models=models, tasks=tasks, defaults=raw.get("defaults") or {},
                      device=args.device or raw.get("device", "cpu"), dtype=args.dtype or raw.get("dtype", "float32"),
                      out=args.out or raw.get("out"), threads=args.threads or raw.get("threads", 0),
                      trust_checkpoint=bool(getattr(args, "trust_checkpoint", False)))


def eval_command(argv: List[str]) -> Dict[str, Any]:
    from lightning_dlm.evaluation.runner import run_evaluation, table

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    results = run_evaluation(config, progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
    print(table(results))
    return results
