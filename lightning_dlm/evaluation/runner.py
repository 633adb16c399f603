"""Run evaluation tasks on one or more models; results as JSON and a side-by-side table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.evaluators import EVALUATORS, load_evaluator
from lightning_dlm.evaluation.tasks import Task, build_task

#: The metrics the table shows per task kind (everything is in the JSON).
HEADLINE = {
    "likelihood": ("nll_per_token", "se", "ppl"),
    "multiple_choice": ("acc", "acc_norm"),
    "lambada": ("acc",),
    "short_answer": ("em", "f1"),
    "infilling": ("rouge1", "rouge2", "rougeL"),
    "gen_ppl": ("gen_ppl", "distinct_2", "entropy"),
    "gsm8k": ("em",),
    "humaneval_infill": ("pass_at_1",),
}


#: ``auto`` (the first evaluator class that matches the path) or a registered kind
MODEL_KINDS = ("auto", *EVALUATORS)


@dataclass
class ModelSpec:
    """One evaluated model: a diffusion checkpoint or a causal LM, its kind, its column name."""

    path: str
    kind: str = "auto"
    name: Optional[str] = None

    @classmethod
    def parse(cls, item: Any, kind: str = "auto") -> "ModelSpec":
        """From a path (with ``kind``) or a ``{path, kind, name}`` mapping, with one-line errors."""
        if isinstance(item, str):
            item = dict(path=item, kind=kind)
        if not isinstance(item, dict):
            raise DLMError(f"model entry {item!r} is neither a path nor a {{path, kind, name}} mapping")
        unknown = sorted(set(item) - {"path", "kind", "name"})
        if unknown:
            raise DLMError(f"model entry {item!r} has unknown key(s) {unknown}: use path, kind, name")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise DLMError(f"model entry {item!r} has no path: give path: <checkpoint or model folder>")
        spec = cls(**item)
        if spec.kind not in MODEL_KINDS:
            raise DLMError(f"model '{spec.path}' has kind '{spec.kind}': choose one of {list(MODEL_KINDS)}")
        return spec


@dataclass
class EvalConfig:
    models: List[ModelSpec]
    tasks: List[Dict[str, Any]]
    defaults: Dict[str, Any] = field(default_factory=dict)  # options given to every task that has them
    device: str = "cpu"
    dtype: str = "float32"
    out: Optional[str] = None
    threads: int = 0
    trust_checkpoint: bool = False  # unpickle diffusion checkpoints in full (only from --trust_checkpoint)


def _bar(enabled: bool):
    def make(total: int, label: str):
        if not enabled:
            return lambda n: None
        from lightning_dlm.training.callbacks.progress import progress_bar

        # a tqdm bar on stderr when it is a terminal, else plain lines ("label 40/200 | elapsed 12s | eta 48s")
        bar = progress_bar(total, label, leave=False, file=sys.stderr)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return advance

    return make


def check_out(path: Optional[str]) -> None:
    if path and os.path.isdir(path):
        raise DLMError(f"--out '{path}' is a folder: give a .json file path")
    parent = os.path.dirname(os.path.abspath(path)) if path else None
    if parent and not os.path.isdir(parent):
        raise DLMError(f"the folder of --out '{path}' does not exist: create it first")


def run_evaluation(config: EvalConfig, progress: bool = True, log=print) -> Dict[str, Any]:
    """Every task on every model; returns (and writes to ``config.out``) the results."""
    if not config.models:
        raise DLMError("no model given: pass --model <checkpoint or model folder> (several for a side-by-side table)")
    if not config.tasks:
        raise DLMError("no task given: pass --task <kind> --data <file>, or a config with a tasks list")
    check_out(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    tasks: List[Task] = [build_task(spec, config.defaults) for spec in config.tasks]  # all checked before any work
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DLMError(f"task names repeat ({names}): give every task its own name")
    results: Dict[str, Any] = dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
                     device=config.device),
        tasks={t.name: dict(kind=t.kind, options=asdict(t)) for t in tasks}, models={})
    for spec in config.models:
        evaluator = load_evaluator(spec.path, spec.kind, device=config.device, dtype=config.dtype, name=spec.name,
                                   trust_checkpoint=config.trust_checkpoint)
        label = evaluator.name
        if label in results["models"]:
            label = f"{label} ({len(results['models'])})"
        log(f"[eval] {label}: {evaluator.kind} model from {spec.path}")
        entry = dict(path=spec.path, kind=evaluator.kind, results={})
        for task in tasks:
            start = time.perf_counter()
            metrics = task.run(evaluator, _bar(progress))
            metrics["seconds"] = round(time.perf_counter() - start, 2)
            entry["results"][task.name] = metrics
            shown = ", ".join(f"{k} {_fmt(metrics.get(k))}" for k in HEADLINE[task.kind])
            log(f"[eval] {label} / {task.name}: {shown} ({metrics['seconds']} s)")
        results["models"][label] = entry
        del evaluator
    if config.out:
        tmp = f"{config.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, default=str)
        os.replace(tmp, config.out)
        log(f"[eval] results written to {config.out}")
    return results


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def table(results: Dict[str, Any]) -> str:
    """A markdown table: one row per (task, metric), one column per model."""
    models = list(results["models"])
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for name, task in results["tasks"].items():
        for metric in HEADLINE[task["kind"]]:
            cells = []
            for model in models:
                res = results["models"][model]["results"].get(name, {})
                value = _fmt(res.get(metric))
                if task["kind"] == "likelihood" and metric == "ppl":
                    value += " (bound)" if res.get("bound") else " (exact)"
                cells.append(value)
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    for name, task in results["tasks"].items():
        shas = {results["models"][m]["results"].get(name, {}).get("tokens_sha1") for m in models}
        if task["kind"] == "likelihood" and len(shas) > 1:
            lines.append(f"\nnote: the models tokenize the '{name}' corpus differently; per-token figures differ in unit")
    return "\n".join(lines)
