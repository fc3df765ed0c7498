"""Figures of the representation commands: numbers in, a matplotlib `Figure` out.

Built with `matplotlib.figure.Figure` (no pyplot, no global state, rendered by Agg on `fig.savefig`),
as `modelsense.memorization.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def similarity_heatmap(matrix: np.ndarray, layers_a: Sequence[str], layers_b: Sequence[str], title: str = "",
                       label_a: str = "A", label_b: str = "B") -> Figure:
    """Heatmap of a layer x layer similarity matrix (rows: A's layers, columns: B's), colour scale [0, 1]."""
    la, lb = len(layers_a), len(layers_b)
    fig = Figure(figsize=(1.6 + 0.55 * max(lb, 3), 1.2 + 0.5 * max(la, 3)))
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    ax.set_xticks(range(lb), list(layers_b), rotation=45, ha="right")
    ax.set_yticks(range(la), list(layers_a))
    ax.set_xlabel(f"layer of {label_b}")
    ax.set_ylabel(f"layer of {label_a}")
    if la * lb <= 144:
        for i in range(la):
            for j in range(lb):
                v = matrix[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="similarity")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def stitching_penalty_figure(layers: Sequence[str], penalty: dict[str, Sequence[float]],
                             stitched_accuracy: dict[str, Sequence[float]], clean_accuracy: Sequence[float],
                             title: str = "", penalty_std: dict[str, Sequence[float]] | None = None,
                             accuracy_std: dict[str, Sequence[float]] | None = None) -> Figure:
    """Penalty by layer (one line per kind, as the figures of Godfrey et al. 2022) and stitched accuracy
    by layer with the clean accuracies of A (dashed) and B (dotted); with `penalty_std` / `accuracy_std`
    (over random model pairs) as ± 1 sd error bars."""
    x = np.arange(len(layers))
    fig = Figure(figsize=(max(7.0, 2.5 + 0.9 * len(layers) * 2), 3.4))
    ax_p, ax_a = fig.subplots(1, 2)
    for kind, values in penalty.items():
        ax_p.errorbar(x, values, yerr=None if penalty_std is None else penalty_std[kind], marker="o", capsize=3,
                      label=kind)
        ax_a.errorbar(x, stitched_accuracy[kind], yerr=None if accuracy_std is None else accuracy_std[kind], marker="o",
                      capsize=3, label=kind)
    ax_p.axhline(0.0, color="gray", lw=0.8)
    for acc, style, name in zip(clean_accuracy, ("--", ":"), ("A", "B")):
        ax_a.axhline(acc, color="gray", ls=style, lw=0.9, label=f"clean {name}")
    for ax, ylabel in ((ax_p, "stitching penalty"), (ax_a, "stitched test accuracy")):
        ax.set_xticks(x, list(layers), rotation=30 if len(layers) > 4 else 0)
        ax.set_xlabel("stitched after layer")
        ax.set_ylabel(ylabel)
    ax_p.legend()
    ax_a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def probe_table_figure(table: np.ndarray, rows: Sequence[str], metrics: Sequence[str],
                       invariant: np.ndarray | None = None, title: str = "") -> Figure:
    """The invariance-probe table as a heatmap: rows (e.g. "act1 orthogonal pre"), columns the metrics,
    colour scale [0, 1], each cell annotated with its similarity; cells where `invariant` (same shape,
    bool) is True, the metrics that must give 1, are framed."""
    table = np.asarray(table, dtype=np.float64)
    n_rows, n_cols = table.shape
    fig = Figure(figsize=(2.6 + 0.95 * n_cols, 1.0 + 0.38 * n_rows))
    ax = fig.subplots()
    im = ax.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(n_cols), list(metrics), rotation=30, ha="right")
    ax.set_yticks(range(n_rows), list(rows), fontsize=8)
    for i in range(n_rows):
        for j in range(n_cols):
            v = table[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
            if invariant is not None and invariant[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="similarity (original vs transformed)")
    ax.set_title(title or "Invariance probe (framed: the metric is invariant to the transform, so must give 1)",
                 fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["probe_table_figure", "similarity_heatmap", "stitching_penalty_figure"]
