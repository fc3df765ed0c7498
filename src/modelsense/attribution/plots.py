"""Figures of attribution results (matplotlib, Agg backend): numbers in, a Figure out.

    >>> fig = self_influence_histograms({"gex": s}, corrupted)
    >>> fig.savefig("hist.png")
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
from typing import Any  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modelsense.attribution.evaluation import detection_curve  # noqa: E402


def self_influence_histograms(scores: dict[str, np.ndarray], corrupted: np.ndarray, what: str = "self-influence"):
    """One panel per method: histogram of self-influence, clean vs corrupted labels (log-spaced
    bins on the positive scores, where the GEX paper contrasts multi-modal and χ²-like shapes)."""
    n = len(scores)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        s = np.asarray(s, dtype=np.float64)
        mask = np.zeros(len(s), dtype=bool)
        mask[corrupted] = True
        pos = s[np.isfinite(s) & (s > 0)]
        if len(pos) > 0.95 * len(s) and pos.max() > 100 * np.percentile(pos, 5):
            bins = np.geomspace(np.percentile(pos, 0.5), pos.max(), 40)
            ax.set_xscale("log")
        else:
            lo, hi = np.nanpercentile(s, [0.5, 99.5])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(s[~mask], bins=bins, alpha=0.6, label="clean", color="tab:blue")
        ax.hist(s[mask], bins=bins, alpha=0.7, label="corrupted", color="tab:red")
        ax.set_title(name)
        ax.set_xlabel(what)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    return fig


def detection_curves(scores: dict[str, np.ndarray], corrupted: np.ndarray):
    """Fraction of corrupted labels found vs fraction of the training set inspected (by score)."""
    fig, ax = plt.subplots(figsize=(5.2, 4))
    colors = plt.get_cmap("tab20").colors
    for k, (name, s) in enumerate(scores.items()):
        x, y = detection_curve(s, corrupted)
        ax.plot(x, y, label=name, color=colors[(2 * k) % 20 + (k // 10) % 2], ls=("-", "--")[(k // 10) % 2])
    frac = len(corrupted) / len(next(iter(scores.values())))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="chance (expected)")
    ax.plot([0, frac, 1], [0, 1, 1], color="black", ls="--", lw=0.8, label="oracle")
    ax.set_xlim(0, min(1, 4 * frac))
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of corrupted labels found")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pruning_figure(ks, metrics: dict[str, Any], remove: str):
    """Test accuracy after retraining against the number `ks` of examples removed, per method and for
    random removal (± std)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for m, acc in metrics["accuracy"].items():
        ax.plot(ks, acc, marker="o", label=m)
    mean, std = np.array(metrics["random_accuracy"]), np.array(metrics["random_accuracy_std"])
    ax.errorbar(ks, mean, yerr=std, color="grey", ls=":", marker="s", label="random")
    if metrics.get("full_test_accuracy") is not None:
        ax.axhline(metrics["full_test_accuracy"], color="black", lw=0.8, ls="--", label="all data")
    ax.set_xlabel(f"training examples removed ({remove} self-influence first)")
    ax.set_ylabel("test accuracy after retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lds_figure(metrics: dict[str, Any]):
    """Bar chart of each method's LDS, annotated with its value and seconds."""
    names = list(metrics["lds"])
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 1.5), 3.6))
    ax.bar(names, [metrics["lds"][n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(
            i,
            metrics["lds"][n],
            f"{metrics['lds'][n]:.3f}\n{metrics['seconds'][n]:.1f}s",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylabel(f"LDS (α = {metrics['alpha']}, {metrics['n_models']} models)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def is_image(input_shape: tuple[int, ...]) -> bool:
    """Whether examples of this shape are images (C, H, W) with one or three channels."""
    return len(input_shape) == 3 and input_shape[0] in (1, 3)


def show_image(ax: Any, x: Any, title: str) -> None:
    """One image tensor (C, H, W) on `ax`, rescaled to [0, 1], with a small title."""
    img = x.detach().cpu().float()
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    lo, hi = float(img.min()), float(img.max())
    ax.imshow(((img - lo) / (hi - lo + 1e-12)).numpy(), cmap="gray" if img.ndim == 2 else None)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def image_grid(x: Any, y: Any, title: str):
    """Images `x` (n, C, H, W) with their labels `y`, ten per row."""
    n = len(x)
    cols = min(10, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, xi, yi in zip(axes.flat, x, y):
        show_image(ax, xi, f"label {int(yi)}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def top_k_figure(x_train: Any, y_train: Any, x_test: Any, y_test: Any, helpful: np.ndarray, harmful: np.ndarray,
                 block: np.ndarray):
    """Rows: test examples j; columns: the test image, its top-k helpful, then top-k harmful training
    images (`helpful`/`harmful` (rows, k) training indices; `block` (N, rows) the scores)."""
    rows, k = helpful.shape
    fig, axes = plt.subplots(rows, 1 + 2 * k, figsize=(1.05 * (1 + 2 * k), 1.2 * rows + 0.3), squeeze=False)
    for j in range(rows):
        show_image(axes[j, 0], x_test[j], f"test {j}: y={int(y_test[j])}")
        for c, i in enumerate(helpful[j]):
            show_image(axes[j, 1 + c], x_train[i], f"+{block[i, j]:.2g} y={int(y_train[i])}")
        for c, i in enumerate(harmful[j]):
            show_image(axes[j, 1 + k + c], x_train[i], f"{block[i, j]:.2g} y={int(y_train[i])}")
    fig.suptitle("test example | most helpful (score > 0) | most harmful (score < 0)", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["detection_curves", "image_grid", "is_image", "lds_figure", "pruning_figure", "self_influence_histograms",
           "show_image", "top_k_figure"]


def relabel_figure(metrics: dict[str, Any]):
    """Test accuracy after retraining on the relabeled training set against the number of examples
    relabeled: per method (Otsu's budget as a star), at random (mean ± std), none and clean labels."""
    fig, ax = plt.subplots(figsize=(5.6, 4))
    budgets = metrics["budgets"]
    colors = plt.get_cmap("tab10").colors
    for k, (m, acc) in enumerate(metrics["accuracy"].items()):
        ax.plot(budgets, acc, marker="o", color=colors[k % 10], label=m)
        o = metrics["otsu"].get(m, {})
        if "accuracy" in o:
            ax.plot([o["budget"]], [o["accuracy"]], marker="*", ms=13, color=colors[k % 10], ls="none",
                    label=f"{m}, Otsu ({o['budget']})")
    ax.errorbar(budgets, metrics["random_accuracy"], yerr=metrics["random_accuracy_std"], color="grey", ls=":",
                marker="s", label="random")
    ax.axhline(metrics["none_accuracy"], color="black", lw=0.8, ls="--", label="no relabeling")
    if "clean_accuracy" in metrics:
        ax.axhline(metrics["clean_accuracy"], color="tab:green", lw=0.8, ls="-.", label="clean labels")
    ax.set_xlabel(f"training examples relabeled (highest score first; target: {metrics['target']})")
    ax.set_ylabel("test accuracy after retraining")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def module_share_figure(shares: dict[str, dict[str, float]], param_shares: dict[str, float], title: str):
    """Bars per module: its share of the parameters and of the top helpful / harmful influence pairs
    (`evaluation.module_shares`)."""
    names = list(param_shares)
    series = {"parameters": param_shares, **{k if "self" in k else f"top {k} pairs": v for k, v in shares.items()}}
    width = 0.8 / len(series)
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.2))
    for k, (label, values) in enumerate(series.items()):
        ax.bar(pos + (k - (len(series) - 1) / 2) * width, [values[m] for m in names], width, label=label)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylabel("share")
    ax.set_xlabel("module")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
