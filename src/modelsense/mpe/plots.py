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
from modelsense.mpe.evaluation import moving_average


def plot_loo_iterations(epochs, test_nll, checkpoints, estimated, title: str = ""):
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
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    d = np.asarray(deltas)[: len(moving_average(test_nll, window))]
    ax.plot(d, moving_average(test_nll, window), "-o", color="0.5", ms=3, label="test NLL")
    ax.plot(d, moving_average(estimated, window), "-s", color="k", ms=3, label="LOO-CV estimate (MPE)")
    ax.axvline(d[int(np.argmin(moving_average(test_nll, window)))], color="0.5", ls=":")
    ax.axvline(d[int(np.argmin(moving_average(estimated, window)))], color="k", ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("prior precision δ")
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


def plot_loco(true_nll, estimated, acc_drop, classes, title: str = ""):
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    sizes = 10 + 1800 * np.clip(np.asarray(acc_drop), 0, None)
    ax.scatter(true_nll, estimated, s=sizes, color="tab:red", alpha=0.6, edgecolors="k")
    for t, e, c in zip(true_nll, estimated, classes):
        ax.annotate(str(c), (t, e), fontsize=8, ha="center", va="center")
    ax.set_xlabel("true test NLL after removing the class")
    ax.set_ylabel("estimated NLL of the removed class (MPE)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
