"""Repeated arms: the seeds of one arm averaged, with standard errors over the seeds.

A sweep whose grid lists ``seeds`` runs every arm once per seed as ``<arm>.seed<N>``
(:mod:`lightning_dlm.research.sweep`). Here those runs become one row per arm:

* :func:`by_seed` turns :class:`~lightning_dlm.research.compare.RunSummary` rows into
  :class:`SeedSummary` rows: every number is the mean over the seeds, and its standard error is
  the sample standard deviation over the seeds divided by sqrt(n) (the spread a rerun with new
  seeds would show; the within-run ``val/nelbo_se`` over validation batches is not it);
* :func:`seed_curves` aligns the seeds' validation points by step: the mean and standard error of
  ``val/nelbo`` at each validation, against tokens seen;
* :func:`tokens_to_reach` reads off a curve the tokens at which it first reaches a level
  (linear between validations), the "how many tokens does scratch need" question;
* :func:`plot_seed_curves` draws the mean curves with a band of one standard error.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from lightning_dlm.research.compare import RunSummary, read_scalars, validation_points
from lightning_dlm.research.sweep import split_seed


def mean_se(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and standard error of the mean (sample sd / sqrt(n)); se is None for one value."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class SeedSummary:
    arm: str
    seeds: List[int]
    val_nelbo: Optional[float]
    val_nelbo_se: Optional[float]  # over the seeds
    ppl_bound: Optional[float]  # exp(mean val/nelbo)
    tokens_seen: Optional[float]
    steps: Optional[float]
    wall_s: Optional[float]  # mean over the seeds
    evals: Dict[str, Tuple[Optional[float], Optional[float]]] = field(default_factory=dict)


def by_seed(rows: Sequence[RunSummary]) -> List[SeedSummary]:
    """One row per arm (its ``.seed<N>`` repeats merged), in the order arms first appear."""
    groups: Dict[str, List[Tuple[Optional[int], RunSummary]]] = {}
    for row in rows:
        arm, seed = split_seed(row.arm)
        groups.setdefault(arm, []).append((seed, row))
    out = []
    for arm, members in groups.items():
        runs = [row for _, row in members]
        nelbo, nelbo_se = mean_se([r.val_nelbo for r in runs])
        if len(runs) == 1:  # one run: its own (within-run) standard error is all there is
            nelbo_se = runs[0].val_nelbo_se
        columns = []
        for r in runs:
            columns += [c for c in r.evals if c not in columns]
        evals = {}
        for column in columns:
            cells = [r.evals[column] for r in runs if column in r.evals]
            value, se = mean_se([value for value, _ in cells])
            evals[column] = (value, cells[0][1] if len(cells) == 1 else se)
        out.append(SeedSummary(
            arm=arm, seeds=[s for s, _ in members if s is not None], val_nelbo=nelbo, val_nelbo_se=nelbo_se,
            ppl_bound=math.exp(nelbo) if nelbo is not None and nelbo < 700 else None,
            tokens_seen=mean_se([r.tokens_seen for r in runs])[0], steps=mean_se([r.steps for r in runs])[0],
            wall_s=mean_se([r.wall_s for r in runs])[0], evals=evals))
    return out


@dataclass
class CurvePoint:
    steps: int
    tokens: Optional[float]
    nelbo: float  # mean over the seeds that reached this validation
    se: Optional[float]
    n: int


def curve_of(points_by_seed: Sequence[Sequence]) -> List[CurvePoint]:
    """Validation points of several seeds (each a list with ``steps``, ``tokens``, ``nelbo``),
    aligned by step."""
    by_step: Dict[int, List] = {}
    for points in points_by_seed:
        for p in points:
            by_step.setdefault(p.steps, []).append(p)
    curve = []
    for steps in sorted(by_step):
        ps = by_step[steps]
        nelbo, se = mean_se([p.nelbo for p in ps])
        tokens = mean_se([p.tokens for p in ps if p.tokens is not None])[0]
        curve.append(CurvePoint(steps, tokens, nelbo, se, len(ps)))
    return curve


def seed_curves(run_dirs: Sequence[str], arms: Optional[Sequence[str]] = None) -> Dict[str, List[CurvePoint]]:
    """``arm -> curve``: each arm's seeds' ``val/nelbo`` aligned by step (``arms``: the run
    folders' arm names, default their folder names)."""
    import os

    names = list(arms) if arms is not None else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    grouped: Dict[str, List] = {}
    for run_dir, name in zip(run_dirs, names):
        grouped.setdefault(split_seed(name)[0], []).append(validation_points(read_scalars(run_dir)))
    return {arm: curve_of(points) for arm, points in grouped.items()}


def tokens_to_reach(points: Sequence, level: float) -> Optional[float]:
    """Tokens at which a curve (points with ``tokens`` and ``nelbo``, in step order) first reaches
    ``level`` or below, linear between validations; None if it never does."""
    previous = None
    for p in points:
        if p.tokens is None:
            continue
        if p.nelbo <= level:
            if previous is None:
                return float(p.tokens)
            (t0, y0) = previous
            return t0 + (y0 - level) / (y0 - p.nelbo) * (p.tokens - t0)
        previous = (float(p.tokens), float(p.nelbo))
    return None


def reach_tokens(run_dirs: Sequence[str], arms: Sequence[str], level: float) -> Dict[str, Tuple[Optional[float],
                                                                                            Optional[float], int, int]]:
    """``arm -> (mean, se, reached, seeds)``: the tokens each seed of an arm needed to reach ``level``
    (:func:`tokens_to_reach` on its own validation curve), averaged over the seeds that reached it."""
    per_arm: Dict[str, List[Optional[float]]] = {}
    for run_dir, name in zip(run_dirs, arms):
        points = validation_points(read_scalars(run_dir))
        per_arm.setdefault(split_seed(name)[0], []).append(tokens_to_reach(points, level))
    out = {}
    for arm, values in per_arm.items():
        reached = [v for v in values if v is not None]
        mean, se = mean_se(reached)
        out[arm] = (mean, se, len(reached), len(values))
    return out


def plot_seed_curves(curves: Dict[str, List[CurvePoint]], path: str, title: str,
                     levels: Optional[Dict[str, float]] = None, ylabel: str = "val/nelbo (nats per token)") -> str:
    """Mean ``val/nelbo`` against tokens seen, one line per arm with a band of one standard error
    over the seeds; ``levels``: horizontal reference lines (label -> value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, curve in curves.items():
        pts = [p for p in curve if p.tokens is not None]
        if not pts:
            continue
        x = [p.tokens for p in pts]
        y = [p.nelbo for p in pts]
        n = max(p.n for p in pts)
        line, = ax.plot(x, y, marker="o", markersize=3, label=f"{arm} ({n} seed{'s' if n != 1 else ''})")
        if any(p.se for p in pts):
            lo = [p.nelbo - (p.se or 0.0) for p in pts]
            hi = [p.nelbo + (p.se or 0.0) for p in pts]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for label, value in (levels or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (ax.get_xlim()[1], value), ha="right", va="bottom", fontsize=8, color="dimgray")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _cell(value: Optional[float], se: Optional[float], digits: int = 4) -> str:
    return _fmt(value, digits) if se is None else f"{_fmt(value, digits)} ± {_fmt(se, digits)}"


def _reach_cell(entry) -> str:
    if entry is None:
        return "-"
    mean, se, reached, seeds = entry
    if reached == 0:
        return f"not reached ({seeds} seed{'s' if seeds != 1 else ''})"
    text = f"{mean:,.0f}" + (f" ± {se:,.0f}" if se is not None else "")
    return text if reached == seeds else f"{text} ({reached} of {seeds} seeds reached it)"


def render_seeds(rows: Sequence[SeedSummary], reach: Optional[Tuple[str, Dict]] = None) -> str:
    """A markdown table: one row per arm, means ± standard errors over the seeds; ``reach``:
    ``(reference arm, reach_tokens(...))`` adds the tokens each arm needed to reach the
    reference's final val/nelbo."""
    columns: List[str] = []
    for r in rows:
        columns += [c for c in r.evals if c not in columns]
    header = ["arm", "seeds", "val/nelbo", "ppl bound", "tokens seen", "steps", "train s", *columns]
    if reach is not None:
        header.append(f"tokens to reach {reach[0]}")
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for r in rows:
        cells = [r.arm, str(len(r.seeds) or 1), _cell(r.val_nelbo, r.val_nelbo_se), _fmt(r.ppl_bound, 2),
                 _fmt(r.tokens_seen, 0) if r.tokens_seen is None or r.tokens_seen < 1000 else f"{r.tokens_seen:,.0f}",
                 _fmt(r.steps, 0), _fmt(r.wall_s, 1),
                 *[_cell(*r.evals[c]) if c in r.evals else "-" for c in columns]]
        if reach is not None:
            cells.append(_reach_cell(reach[1].get(r.arm)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
