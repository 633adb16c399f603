"""Read the TensorBoard logs of several runs and put them side by side.

``summarize(run_dirs)`` gives one row per run (arm): the final ``val/nelbo`` with its standard
error (``val/nelbo_se``, over the validation batches), the perplexity bound exp(NELBO), the
optimiser steps and tokens seen at that validation (read from the validation events, not from the
train logs, which ``log_every_n_steps`` thins) and wall time; ``plot_runs`` draws ``val/nelbo``
against the tokens seen at each validation and ``train/loss`` against the step, one line per arm.
Logs are read with ``tbparse`` (every event file under a run folder, all TensorBoard versions of a
resumed run merged by step).

TensorBoard's reader stops quietly at a truncated or corrupt record, so every event file's records
are checked first (:func:`event_file_problem`: each record whole, its length and data checksums
right): a run whose every event file is damaged is a one-line error naming the file; a run with
some good files keeps its row, marked (``damaged_logs``), and ``dlm compare`` warns in one line.

``add_eval(rows, results.json)`` joins the results of ``dlm eval`` (models named as the arms):
each task's headline metric with its standard error becomes a column, a model of the results
that is no run becomes a row of its own, and ``plot_eval`` draws them as bars with error bars.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from lightning_dlm.core.errors import DLMError

FORMATS = ("markdown", "csv", "json")
DAMAGED_MARK = "(damaged log)"  # after the arm of a row read from damaged TensorBoard logs (markdown)


@dataclass
class RunSummary:
    arm: str
    val_nelbo: Optional[float]
    val_nelbo_se: Optional[float]
    ppl_bound: Optional[float]
    tokens_seen: Optional[float]
    steps: Optional[int]
    wall_s: Optional[float]
    folder: str
    # "<task> <metric>" -> (value, standard error or None), from dlm eval's results
    evals: Dict[str, Tuple[float, Optional[float]]] = field(default_factory=dict)
    # event file -> what is wrong with it, for the damaged logs of a run that also has good ones (row marked)
    damaged_logs: Dict[str, str] = field(default_factory=dict)


_PROBLEMS: Dict[Tuple[str, int, int], Optional[str]] = {}  # (path, size, mtime): checked once per version of a file
#: an event file that ends inside a record and changed less than this long ago is still being written
#: (TensorBoard's writers flush every 120 s by default): its whole records are read, and it is not damaged
STILL_WRITING_S = 600.0


def event_file_problem(path: str) -> Optional[str]:
    """What is wrong with a TensorBoard event file, or None: every record (a length, its checksum,
    the data, its checksum: TFRecord framing) must be whole and match its checksums up to the file's
    end. TensorBoard's own reader (and so tbparse) stops at the first bad record without a word."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key in _PROBLEMS:
        return _PROBLEMS[key]
    with open(path, "rb") as fh:
        data = fh.read()
    size, offset, records, problem, cut = len(data), 0, 0, None, False
    while offset < size and problem is None:
        where = f"record {records + 1}, at byte {offset:,} of {size:,}"
        if size - offset < 12:
            problem, cut = f"it ends inside the header of {where}", True
            break
        (length,) = struct.unpack_from("<Q", data, offset)
        (length_crc,) = struct.unpack_from("<I", data, offset + 8)
        end = offset + 12 + length
        if masked_crc32c(data[offset:offset + 8]) != length_crc:
            problem = f"the length of {where} fails its checksum" + ("" if records else ": not an event file")
        elif end + 4 > size:
            problem, cut = f"it ends inside {where} ({size - offset:,} of its {length + 16:,} bytes)", True
        elif masked_crc32c(data[offset + 12:end]) != struct.unpack_from("<I", data, end)[0]:
            problem = f"the data of {where} fails its checksum"
        offset, records = end + 4, records + 1
    if cut and time.time() - stat.st_mtime < STILL_WRITING_S:
        problem = None  # a running fit's log: its writer flushes whole buffers, not whole records
    _PROBLEMS[key] = problem
    return problem


def _event_files(run_dir: str) -> List[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(run_dir) for name in names
                  if name.startswith("events.out.tfevents."))


def damaged_logs(run_dir: str) -> Dict[str, str]:
    """{event file: what is wrong with it} for the damaged or cut-short event files under ``run_dir``."""
    found = {path: event_file_problem(path) for path in _event_files(run_dir)}
    return {path: problem for path, problem in found.items() if problem is not None}


def damaged_log_line(path: str, problem: str) -> str:
    return f"the TensorBoard log '{path}' is damaged or cut short ({problem})"


def read_scalars(run_dir: str):
    """A DataFrame (step, tag, value, wall_time) of every scalar logged under ``run_dir``; when a
    resumed run logged a step twice, the later write wins. A run whose event files are all damaged
    or cut short is a one-line error (see :func:`event_file_problem`)."""
    from tbparse import SummaryReader

    if not os.path.isdir(run_dir):
        raise DLMError(f"run folder '{run_dir}' does not exist: give folders written by dlm fit or dlm sweep")
    events = _event_files(run_dir)
    if not events:
        raise DLMError(f"'{run_dir}' holds no TensorBoard logs (events.out.tfevents.*): give run folders of "
                       f"dlm fit / dlm sweep (their trainer.default_root_dir)")
    damaged = damaged_logs(run_dir)
    if len(damaged) == len(events):
        path, problem = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more event files of the run)" if len(damaged) > 1 else ""
        raise DLMError(f"{damaged_log_line(path, problem)}{more}: copy the run folder again from where it ran, "
                       f"or leave the run out of the comparison")
    frame = SummaryReader(run_dir, extra_columns={"wall_time"}).scalars
    if frame.empty:
        raise DLMError(f"the TensorBoard logs under '{run_dir}' hold no scalars: the run logged nothing yet")
    return frame.sort_values("wall_time").drop_duplicates(["tag", "step"], keep="last").sort_values(["tag", "step"])


def _last(frame, tag: str) -> Optional[float]:
    rows = frame[frame.tag == tag]
    return float(rows.value.iloc[-1]) if len(rows) else None


@dataclass
class ValidationPoint:
    """One validation of a run: after ``steps`` optimiser steps and ``tokens`` training tokens."""

    steps: int
    tokens: Optional[float]
    nelbo: float


def validation_points(frame) -> List[ValidationPoint]:
    """The run's validations, read from the validation events themselves: a ``val/nelbo`` event at
    TensorBoard step ``s`` was written after ``s + 1`` optimiser steps (Lightning numbers the steps
    of a fit's logs from 0), and ``val/tokens_seen`` at the same step is the number of training
    tokens seen then (the training module logs it with every validation). The train logs are
    written every ``log_every_n_steps`` only, so they need not hold the step of a validation: for
    logs written before ``val/tokens_seen`` existed, the tokens are the train logs' tokens per step
    (``train/tokens_seen`` over its steps, at the last train log up to the validation, else the
    first) times the validation's steps: exact for fixed-size batches."""
    val = frame[frame.tag == "val/nelbo"]
    at_val = frame[frame.tag == "val/tokens_seen"].set_index("step").value
    train = frame[frame.tag == "train/tokens_seen"].set_index("step").value
    points = []
    for step, nelbo in zip(val.step.tolist(), val.value.tolist()):
        tokens: Optional[float] = None
        if step in at_val.index:
            tokens = float(at_val[step])
        elif len(train):
            before = train[train.index <= step]
            known_step, known = (before.index[-1], before.iloc[-1]) if len(before) else (train.index[0], train.iloc[0])
            tokens = float(known) / (int(known_step) + 1) * (int(step) + 1)
        points.append(ValidationPoint(steps=int(step) + 1, tokens=tokens, nelbo=float(nelbo)))
    return points


def summarize_run(run_dir: str, arm: Optional[str] = None) -> RunSummary:
    """The run's row: its last validation (val/nelbo and its standard error) with the steps and tokens
    of that validation (:func:`validation_points`); a run that never validated: its last train log."""
    frame = read_scalars(run_dir)
    points = validation_points(frame)
    nelbo = points[-1].nelbo if points else None
    train = frame[frame.tag.str.startswith("train/")]
    if points:
        tokens, steps = points[-1].tokens, points[-1].steps
    else:
        tokens, steps = _last(frame, "train/tokens_seen"), (int(train.step.max()) + 1 if len(train) else None)
    return RunSummary(
        arm=arm or os.path.basename(os.path.normpath(run_dir)),
        val_nelbo=nelbo,
        val_nelbo_se=_last(frame, "val/nelbo_se"),
        ppl_bound=math.exp(min(nelbo, 700.0)) if nelbo is not None else None,
        tokens_seen=tokens,
        steps=steps,
        wall_s=float(frame.wall_time.max() - frame.wall_time.min()) if len(frame) > 1 else None,
        folder=os.path.abspath(run_dir),
        damaged_logs=damaged_logs(run_dir),
    )


def summarize(run_dirs: Sequence[str]) -> List[RunSummary]:
    if not run_dirs:
        raise DLMError("no run folders given: dlm compare runs/<sweep>/*")
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) != len(names):  # arms of different sweeps with the same name: keep them apart
        names = [os.path.normpath(d) for d in run_dirs]
    return [summarize_run(d, name) for d, name in zip(run_dirs, names)]


#: The metric a task kind contributes to the table where it is not the first of the evaluation's
#: headline metrics (:data:`lightning_dlm.evaluation.runner.HEADLINE`): infilling is compared by
#: ROUGE-L (the longest common subsequence: order matters, as it does for a filled-in line).
PRIMARY = {"infilling": "rougeL"}


def eval_metrics(results: Dict) -> Dict[str, Dict[str, Tuple[float, Optional[float]]]]:
    """model name -> {"<task> <metric>": (value, se)}: each task's primary metric (:data:`PRIMARY`,
    else the first of the evaluation's headline metrics) and its standard error where the task gives one."""
    from lightning_dlm.evaluation.runner import HEADLINE

    out: Dict[str, Dict[str, Tuple[float, Optional[float]]]] = {}
    for model, entry in results.get("models", {}).items():
        cells = out.setdefault(model, {})
        for task, metrics in entry.get("results", {}).items():
            kind = results.get("tasks", {}).get(task, {}).get("kind")
            metric = PRIMARY.get(kind) or (HEADLINE[kind][0] if kind in HEADLINE else None)
            if metric not in metrics:
                continue
            se = metrics.get(f"{metric}_se", metrics.get("se") if kind == "likelihood" else None)
            cells[f"{task} {metric}"] = (float(metrics[metric]), float(se) if se is not None else None)
    return out


def add_eval(rows: List[RunSummary], path: str) -> List[RunSummary]:
    """``rows`` with the results of ``dlm eval`` (``path``) joined by name (arm = model name);
    models of the results that are no run are appended as rows without training figures."""
    if not os.path.isfile(path):
        raise DLMError(f"eval results '{path}' do not exist: give the JSON written by dlm eval --out")
    try:
        with open(path, encoding="utf-8") as fh:
            results = json.load(fh)
    except (OSError, ValueError) as err:
        raise DLMError(f"'{path}' is not dlm eval's JSON ({err}): give the file written by dlm eval --out") from None
    metrics = eval_metrics(results)
    if not metrics:
        raise DLMError(f"'{path}' holds no model results: give the JSON written by dlm eval --out")
    by_arm = {r.arm: r for r in rows}
    out = list(rows)
    for model, cells in metrics.items():
        row = by_arm.get(model)
        if row is None:
            row = RunSummary(model, None, None, None, None, None, None, results["models"][model].get("path", ""))
            out.append(row)
        row.evals.update(cells)
    return out


def eval_columns(rows: Sequence[RunSummary]) -> List[str]:
    columns: List[str] = []
    for r in rows:
        columns += [c for c in r.evals if c not in columns]
    return columns


def _fmt_se(cell: Optional[Tuple[float, Optional[float]]]) -> str:
    if cell is None:
        return "-"
    value, se = cell
    return _fmt(value) if se is None or math.isnan(se) else f"{_fmt(value)} ± {_fmt(se)}"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render(rows: Sequence[RunSummary], fmt: str = "markdown") -> str:
    """The table as markdown, CSV or JSON."""
    if fmt not in FORMATS:
        raise DLMError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2)
    extra = eval_columns(rows)
    header = ["arm", "val/nelbo", "se", "ppl bound", "tokens seen", "steps", "wall s", *extra]
    cells = [[r.arm + (f" {DAMAGED_MARK}" if r.damaged_logs else ""), _fmt(r.val_nelbo), _fmt(r.val_nelbo_se),
              _fmt(r.ppl_bound, 2), _fmt(r.tokens_seen), _fmt(r.steps), _fmt(r.wall_s, 1),
              *[_fmt_se(r.evals.get(c)) for c in extra]] for r in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        flat = [name for c in extra for name in (c.replace(" ", "_"), c.replace(" ", "_") + "_se")]
        damaged = any(r.damaged_logs for r in rows)  # a column only when some run has a damaged log
        writer.writerow(["arm", "val_nelbo", "val_nelbo_se", "ppl_bound", "tokens_seen", "steps", "wall_s", "folder",
                         *flat, *(["damaged_logs"] if damaged else [])])
        for r in rows:
            values = [v for c in extra for v in (r.evals.get(c) or (None, None))]
            writer.writerow([r.arm, r.val_nelbo, r.val_nelbo_se, r.ppl_bound, r.tokens_seen, r.steps, r.wall_s,
                             r.folder, *values, *([";".join(r.damaged_logs)] if damaged else [])])
        return buffer.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def plot_runs(run_dirs: Sequence[str], out_dir: str, arms: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """PNG plots in ``out_dir``: ``val_nelbo.png`` (val/nelbo against tokens seen) and
    ``train_loss.png`` (train/loss against the step), one line per arm. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    arms = list(arms) if arms is not None else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    frames = [read_scalars(d) for d in run_dirs]
    paths = {}
    for name, tag, xlabel in [("val_nelbo", "val/nelbo", "tokens seen"), ("train_loss", "train/loss", "step")]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm, frame in zip(arms, frames):
            if xlabel == "tokens seen":  # each validation at the tokens seen when it ran
                points = [p for p in validation_points(frame) if p.tokens is not None]
                x, y = [p.tokens for p in points], [p.nelbo for p in points]
            else:
                rows = frame[frame.tag == tag]
                x, y = rows.step.to_numpy(), rows.value.to_numpy()
            if not len(x):
                continue
            ax.plot(x, y, marker="o" if len(x) < 30 else None, label=arm)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(tag + (" (nats per token, a bound)" if tag == "val/nelbo" else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        paths[name] = os.path.join(out_dir, f"{name}.png")
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def plot_eval(rows: Sequence[RunSummary], out_dir: str) -> Optional[str]:
    """``eval.png`` in ``out_dir``: one panel per measure (val/nelbo and each eval column), a bar
    per arm with its standard error; None when the rows hold no measure to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: List[Tuple[str, List[Optional[Tuple[float, Optional[float]]]]]] = []
    if any(r.val_nelbo is not None for r in rows):
        panels.append(("val/nelbo (lower is better)", [(r.val_nelbo, r.val_nelbo_se) if r.val_nelbo is not None else None
                                                       for r in rows]))
    panels += [(column, [r.evals.get(column) for r in rows]) for column in eval_columns(rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.8), squeeze=False)
    names = [r.arm for r in rows]
    for ax, (title, cells) in zip(axes[0], panels):
        values = [c[0] if c else float("nan") for c in cells]
        errors = [c[1] if c and c[1] is not None and not math.isnan(c[1]) else 0.0 for c in cells]
        ax.bar(range(len(rows)), values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "eval.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
