"""``dlm compare``: the runs of a sweep (or any run folders) side by side, from their TensorBoard logs.

    dlm compare runs/schedules/*                                   # a markdown table on stdout
    dlm compare runs/schedules/* --format csv --out runs/schedules/compare   # + val_nelbo.png, train_loss.png
    dlm compare runs/ablation/* --eval runs/ablation/eval.json --out experiments/ablation   # + eval columns, eval.png
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import List, Literal, Optional

from jsonargparse import ArgumentParser

from lightning_dlm.commands import parse_or_one_line
from lightning_dlm.core.errors import DLMError


def compare(runs: List[str], format: Literal["markdown", "csv", "json"] = "markdown", out: Optional[str] = None,
            plots: bool = True, eval: Optional[str] = None, by_seed: bool = False, reach: Optional[str] = None) -> str:
    """Print one table of the runs (arm, final val/nelbo and its standard error, perplexity bound,
    tokens seen, steps, wall time) and, with ``out``, write it there with PNG plots.

    Args:
        runs: run folders (each a trainer.default_root_dir of dlm fit, or an arm of dlm sweep); globs work.
        format: markdown, csv or json.
        out: also write the table (compare.md / .csv / .json) and the plots (val_nelbo.png:
            val/nelbo against tokens seen; train_loss.png: train/loss against the step) into this folder.
        plots: write the PNG plots when out is given.
        eval: the JSON of ``dlm eval --out`` on the runs' checkpoints (models named as the arms):
            each task's headline metric and its standard error become columns (and eval.png).
        by_seed: merge the repeats of an arm (``<arm>.seed<N>``, from a grid with ``seeds``) into one
            row: means over the seeds with standard errors over the seeds (markdown), and
            val_nelbo_seeds.png (mean val/nelbo against tokens, a band of one standard error).
        reach: with by_seed, an arm: a column of the tokens every arm needed to reach that arm's
            final mean val/nelbo (read off each seed's validations, linear between them).
    """
    from lightning_dlm.research.compare import DAMAGED_MARK, add_eval, damaged_log_line, plot_eval, plot_runs, render, summarize

    folders = []
    for pattern in runs:
        if any(ch in pattern for ch in "*?["):  # a glob: its folders, less a sweep's own outputs
            folders += [path for path in sorted(glob.glob(pattern)) if os.path.isdir(path)
                        and os.path.basename(os.path.normpath(path)) not in ("compare", "slurm")]
        elif os.path.isfile(pattern):  # a shell glob over a sweep folder also names its files (eval.json, ...)
            print(f"skipping '{pattern}': a file, not a run folder", file=sys.stderr)
        else:
            folders.append(pattern)
    rows = summarize(folders)
    for row in rows:  # a run with good logs and damaged ones: its row stands, marked, and each damaged file is named
        for path, problem in row.damaged_logs.items():
            print(f"warning: {damaged_log_line(path, problem)}: the row of '{row.arm}' is marked {DAMAGED_MARK} "
                  f"(damaged_logs in csv/json) and shows only the records that could be read", file=sys.stderr)
    if eval:
        rows = add_eval(rows, eval)
    if by_seed:
        return _compare_by_seed(folders, rows, format, out, plots, reach)
    if reach:
        raise DLMError("--reach needs --by_seed true (it reads the seeds' validation curves)")
    table = render(rows, format)
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        suffix = {"markdown": "md", "csv": "csv", "json": "json"}[format]
        with open(os.path.join(out, f"compare.{suffix}"), "w", encoding="utf-8") as fh:
            fh.write(table + ("\n" if not table.endswith("\n") else ""))
        if plots:
            paths = list(plot_runs(folders, out, arms=[r.arm for r in rows][: len(folders)]).values())
            paths += [plot_eval(rows, out)] if eval else []
            for path in paths:
                print(f"wrote {path}", file=sys.stderr)
    return table


def _compare_by_seed(folders: List[str], rows, format: str, out: Optional[str], plots: bool,
                     reach: Optional[str] = None) -> str:
    from dataclasses import asdict

    from lightning_dlm.research.seeds import by_seed, plot_seed_curves, reach_tokens, render_seeds, seed_curves

    if format not in ("markdown", "json"):
        raise DLMError(f"--by_seed writes markdown or json, not {format}: drop --format or give --format json")
    merged = by_seed(rows)
    arms = [r.arm for r in rows][: len(folders)]
    reached = None
    if reach:
        reference = next((r for r in merged if r.arm == reach), None)
        if reference is None or reference.val_nelbo is None:
            known = ", ".join(r.arm for r in merged)
            raise DLMError(f"--reach '{reach}' is not an arm with a val/nelbo among the runs ({known}): name one of them")
        reached = (reach, reach_tokens(folders, arms, reference.val_nelbo))
    table = render_seeds(merged, reached) if format == "markdown" else json.dumps([asdict(r) for r in merged], indent=2)
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        name = "compare_seeds.md" if format == "markdown" else "compare_seeds.json"
        with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
        if plots:
            curves = seed_curves(folders, arms=arms)
            path = plot_seed_curves(curves, os.path.join(out, "val_nelbo_seeds.png"),
                                    "val/nelbo against tokens (mean over seeds, band: one standard error)")
            print(f"wrote {path}", file=sys.stderr)
    return table


def compare_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm compare", exit_on_error=False,
                            description="Put runs side by side from their TensorBoard logs: a table and PNG plots.")
    parser.add_argument("runs", nargs="*", help="run folders (trainer.default_root_dir of dlm fit, arms of dlm sweep); globs work")
    parser.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown", help="table format")
    parser.add_argument("--out", default=None, help="also write the table and val_nelbo.png / train_loss.png here")
    parser.add_argument("--plots", type=bool, default=True, help="write the PNG plots when --out is given")
    parser.add_argument("--eval", default=None, help="dlm eval's JSON on the runs' checkpoints (models named as the arms): "
                                                     "its headline metrics with standard errors join the table")
    parser.add_argument("--by_seed", type=bool, default=False,
                        help="merge an arm's seeds (<arm>.seed<N>) into one row: means, standard errors over the seeds")
    parser.add_argument("--reach", default=None, help="with --by_seed: an arm whose final mean val/nelbo every arm's "
                                                      "tokens-to-reach column reads against")
    cfg = parse_or_one_line(parser, args)
    compare(list(cfg.runs), format=cfg.format, out=cfg.out, plots=cfg.plots, eval=cfg.eval, by_seed=cfg.by_seed,
            reach=cfg.reach)
