"""Matplotlib figures of :mod:`lightning_dlm.research.analysis` results (for ``notebooks/``).

Each function returns a ``matplotlib.figure.Figure`` made with ``pyplot.subplots`` (shown by a
notebook's inline backend, written with ``fig.savefig`` elsewhere) and never calls ``show``, so
it runs under the non-interactive Agg backend too.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from lightning_dlm.research.analysis import NoiseGrid, Trajectory
from lightning_dlm.research.compare import RunSummary


def _pyplot():
    """pyplot, imported on first use (whatever backend the caller chose: inline, Agg, ...)."""
    import matplotlib.pyplot as plt

    return plt


def _label(text: str) -> str:
    """A token's text as an axis label: whitespace made visible, ``$`` not read as TeX."""
    return text.replace("\n", "\\n").replace(" ", "\u2423").replace("$", r"\$") or "\u2205"


def plot_nelbo_by_t(grids: Mapping[str, NoiseGrid]):
    """Left: the NELBO integrand against t (w(t) x masked CE per target token; its mean over t, the
    NELBO, in the legend). Right: the plain CE per masked token against t. One line per model."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, grid in grids.items():
        by_t = grid.by_t()
        se = grid.nelbo_se
        spread = f" \u00b1 {se:.3f}" if se == se else ""
        left.plot(by_t["t"], by_t["nelbo"], marker="o", ms=3, label=f"{name}: NELBO {grid.nelbo:.3f}{spread}")
        right.plot(by_t["t"], by_t["masked_ce"], marker="o", ms=3, label=name)
    left.set(xlabel="noise level t (fraction masked)", ylabel="w(t) \u00b7 masked CE / target tokens (nats)",
             title="contribution to the NELBO at t")
    right.set(xlabel="noise level t (fraction masked)", ylabel="CE per masked token (nats)",
              title="loss of a masked token at t")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_by_position(curves: Mapping[str, torch.Tensor], smooth: int = 1):
    """The mean NELBO contribution of each position of the sequence (``NoiseGrid.by_position``),
    one line per model; ``smooth`` > 1 draws a moving average of that many positions."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for name, curve in curves.items():
        y = np.asarray(curve, dtype=float)
        x = np.arange(len(y))
        keep = ~np.isnan(y)
        x, y = x[keep], y[keep]
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1:]
        ax.plot(x, y, label=f"{name} (mean {np.mean(np.asarray(curve, dtype=float)[keep]):.3f})")
    ax.set(xlabel="position in the sequence", ylabel="expected w(t) \u00b7 CE (nats)",
           title="loss by position" + (f" (moving average of {smooth})" if smooth > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_trajectory(traj: Trajectory, ax, colorbar: bool = True, label_tokens: bool = True):
    """One decode on ``ax``: a column per generated slot, a row per step (the first at the top);
    the cell at (step, slot) where the slot was committed is coloured by the probability of the
    committed token; grey cells are slots already decided, white ones still masked. Returns the
    image of the committed cells (NaN elsewhere)."""
    length = len(traj.token_ids)
    committed_at = traj.committed_at.numpy()
    steps = np.arange(traj.steps)[:, None]
    decided = (steps > committed_at[None, :]).astype(float)
    committed = np.full((traj.steps, length), np.nan)
    committed[committed_at, np.arange(length)] = traj.probability.numpy()
    ax.imshow(decided, cmap="Greys", vmin=0, vmax=4, aspect="auto", interpolation="nearest")
    image = ax.imshow(np.ma.masked_invalid(committed), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="generated slot", ylabel="denoising step",
           title=f"{traj.strategy} order: {length} slots in {traj.steps} steps")
    if label_tokens and length <= 80:
        ax.set_xticks(np.arange(length))
        ax.set_xticklabels([_label(t) for t in traj.tokens], rotation=90, fontsize=7)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="p(committed token) at its step", fraction=0.04)
    return image


def plot_trajectories(trajectories: Sequence[Trajectory]):
    """:func:`draw_trajectory` of each decode, side by side."""
    plt = _pyplot()
    n = len(trajectories)
    width = max(len(t.token_ids) for t in trajectories)
    fig, axes = plt.subplots(1, n, figsize=(max(5.0, 0.16 * width + 2.5) * n, 5.2), squeeze=False,
                             layout="constrained")
    for traj, ax in zip(trajectories, axes[0]):
        draw_trajectory(traj, ax)
    return fig


def plot_token_nll(tokens: Sequence[str], ar_nll, bound, labels=("original AR model: NLL", "diffusion bound")):
    """Top: each token's NLL under the original AR model next to its share of the diffusion bound.
    Bottom: the bound against the AR NLL, token by token (above the diagonal: the diffusion model
    pays more for that token)."""
    plt = _pyplot()
    ar_nll = np.asarray(ar_nll, dtype=float).reshape(-1)
    bound = np.asarray(bound, dtype=float).reshape(-1)
    n = len(ar_nll)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.17 * n + 2), 8), height_ratios=[1.2, 1])
    x = np.arange(n)
    top.bar(x - 0.2, ar_nll, width=0.4, label=f"{labels[0]} (mean {ar_nll.mean():.3f})")
    top.bar(x + 0.2, bound, width=0.4, label=f"{labels[1]} (mean {bound.mean():.3f})")
    top.set_xticks(x)
    top.set_xticklabels([_label(t) for t in tokens], rotation=90, fontsize=7)
    top.set(ylabel="nats", title="per-token negative log-likelihood on the same text")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, axis="y")
    bottom.scatter(ar_nll, bound, s=12, alpha=0.7)
    hi = float(max(np.nanmax(ar_nll), np.nanmax(bound), 1.0)) * 1.05
    bottom.plot([0, hi], [0, hi], color="grey", lw=1, ls="--")
    bottom.set(xlabel=labels[0] + " (nats)", ylabel=labels[1] + " (nats)", xlim=(0, hi), ylim=(0, hi),
               title="token by token (dashed: equal)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_arms(rows: Sequence[RunSummary]):
    """The final val/nelbo of each arm (``compare.summarize``) with +-2 standard errors; arms
    without a validation yet are left out (a note says so when none has one)."""
    plt = _pyplot()
    rows = [r for r in rows if r.val_nelbo is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8))
    y = np.arange(len(rows))
    err = [2 * r.val_nelbo_se if r.val_nelbo_se is not None else 0.0 for r in rows]
    ax.errorbar([r.val_nelbo for r in rows], y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(y)
    ax.set_yticklabels([r.arm for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="final val/nelbo (nats per token, a bound; bars: \u00b12 SE)", title="arms side by side")
    ax.grid(alpha=0.3, axis="x")
    if not rows:
        ax.text(0.5, 0.5, "no arm has a validation yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig
