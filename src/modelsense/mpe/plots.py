"""Figures of the MPE experiments (`modelsense mpe ...`): numbers in, a matplotlib `Figure` out.

pyplot with the Agg backend, as `modelsense.attribution.plots`; imported inside the run functions,
so that `modelsense --help` does not import matplotlib.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from modelsense.data import Dataset
from modelsense.mpe.estimator import MPEResult
from modelsense.mpe.evaluation import smoothed_curves


def plot_loo_iterations(epochs, test_nll, checkpoints, estimated, title: str = ""):
    """Test NLL over epochs and the MPE's LOO-CV estimate at the checkpoints (log scale)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(epochs, test_nll, color="0.6", label="test NLL")
    ax.plot(checkpoints, estimated, "ks", label="LOO-CV estimate (MPE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_loo_l2reg(deltas, estimated, test_nll, title: str = "", window: int = 1):
    """Test NLL and LOO-CV estimate over δ (log axis), each after a moving average of `window`
    (`smoothed_curves`, Nickl et al. 2023: 4), with their minima marked."""
    c = smoothed_curves(deltas, estimated, test_nll, window)
    d = c["deltas"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(d, c["test_nll"], "-o", color="0.5", ms=3, label="test NLL")
    ax.plot(d, c["estimated_nll"], "-s", color="k", ms=3, label="LOO-CV estimate (MPE)")
    ax.axvline(d[int(np.argmin(c["test_nll"]))], color="0.5", ls=":")
    ax.axvline(d[int(np.argmin(c["estimated_nll"]))], color="k", ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("prior precision δ" + (f" (moving average of {window})" if window > 1 else ""))
    ax.set_ylabel("NLL")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_validation(true, estimated, title: str = "", slope: float | None = None, pearson: float | None = None):
    """Scatter of estimated vs true deviation. Each axis fits its own data (0 to 1.05 x its maximum),
    so a wrong scale shows: the y = x line (dashed) and the fitted y = slope · x (solid) are drawn
    across the x range and clipped at the top."""
    true, estimated = np.asarray(true, dtype=float), np.asarray(estimated, dtype=float)
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.scatter(true, estimated, s=10, alpha=0.7, color="tab:blue", edgecolors="none")
    x_top = float(max(np.max(true), 1e-12)) * 1.05
    y_top = float(max(np.max(estimated), 1e-12)) * 1.05
    ax.plot([0, x_top], [0, x_top], "k--", lw=1, label="y = x")
    if slope is not None and np.isfinite(slope):
        label = f"y = {slope:.3g} x (slope)" + (f", Pearson {pearson:.3f}" if pearson is not None else "")
        ax.plot([0, x_top], [0, slope * x_top], color="tab:red", lw=1, label=label)
    ax.set_xlim(0, x_top)
    ax.set_ylim(0, y_top)
    ax.set_xlabel("true deviation (retrained without i)")
    ax.set_ylabel("estimated deviation (MPE)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_most_sensitive(data: Dataset, mpe: MPEResult, n_show: int = 16):
    """The `n_show` training images of highest sensitivity titled with label y, prediction ŷ and sensitivity s."""
    n_show = max(1, min(n_show, data.n_train))
    top = torch.argsort(mpe.sensitivity, descending=True)[:n_show]
    cols = min(8, n_show)
    rows = math.ceil(n_show / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.95 * rows), squeeze=False)
    probs = torch.softmax(mpe.logits, -1)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, top.tolist()):
        img = data.x_train[i]
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        ax.imshow(img.numpy(), cmap="gray_r" if img.dim() == 2 else None)
        label = int(data.y_train[i])
        pred = int(probs[i].argmax())
        ax.set_title(f"y={label} ŷ={pred}\ns={float(mpe.sensitivity[i]):.2g}", fontsize=7)
    fig.suptitle("most sensitive training examples", fontsize=9)
    fig.tight_layout()
    return fig


def plot_evolving(binned: np.ndarray, iterations, title: str = ""):
    """Binned sensitivity per checkpoint iteration, examples ranked by the last checkpoint (log scale)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = np.arange(binned.shape[1])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(iterations)))
    for row, it, c in zip(binned, iterations, colors):
        ax.plot(x, row, color=c, label=f"iteration {it}")
    ax.set_yscale("log")
    ax.set_xlabel("examples ranked by the last checkpoint's sensitivity (bins, most sensitive first)")
    ax.set_ylabel("mean sensitivity in bin")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


#: marker and colour of each overlaid loco run: the original's MLP red circles, LeNet blue squares
LOCO_STYLES = (("o", "tab:red"), ("s", "tab:blue"), ("^", "tab:green"), ("D", "tab:purple"))


def plot_loco(runs, title: str = ""):
    """Leave one class out: estimated NLL (y) vs true test NLL after retraining without the class (x), one
    point per class, annotated with the class, of size 10 + 1800 · (accuracy drop). `runs`: one dict per
    run (keys `true_test_nll`, `estimated_nll`, `accuracy_drop`, `classes`, and `label` for the legend
    where there are several), drawn with LOCO_STYLES in turn."""
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    for k, r in enumerate(runs):
        marker, color = LOCO_STYLES[k % len(LOCO_STYLES)]
        sizes = 10 + 1800 * np.clip(np.asarray(r["accuracy_drop"]), 0, None)
        ax.scatter(r["true_test_nll"], r["estimated_nll"], s=sizes, marker=marker, color=color, alpha=0.6,
                   edgecolors="k", label=r.get("label"))
        for t, e, c in zip(r["true_test_nll"], r["estimated_nll"], r["classes"]):
            ax.annotate(str(c), (t, e), fontsize=8, ha="center", va="center")
    if len(runs) > 1:
        ax.legend(fontsize=8, markerscale=0.5)
    ax.set_xlabel("true test NLL after removing the class")
    ax.set_ylabel("estimated NLL of the removed class (MPE)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
