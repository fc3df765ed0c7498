"""Figures for held-out subsample estimates: arrays in, a matplotlib `Figure` out.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state, rendered by Agg on
`fig.savefig`), so they work headless and in threads. Examples may be images (C, H, W) with C in
{1, 3}, (H, W), or 1-D signals (L,) such as MNIST-1D, which are drawn as curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from modelsense.errors import DataError
from modelsense.memorization.estimators import HIGH_MEMORIZATION_THRESHOLD, InfluenceEstimate


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _label_text(label: Any, class_names: Sequence[str] | None) -> str:
    label = int(label)
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def _draw_example(ax, x: np.ndarray) -> None:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 1:
        ax.plot(x, color="black", linewidth=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if x.ndim == 3 and x.shape[0] == 3:
        x = np.transpose(x, (1, 2, 0))
        low, high = x.min(), x.max()
        x = (x - low) / (high - low) if high > low else np.zeros_like(x)
        ax.imshow(x, interpolation="nearest")
    elif x.ndim == 2:
        ax.imshow(x, cmap="gray_r", interpolation="nearest")
    else:
        raise DataError(f"cannot draw an example of shape {x.shape}; expected (L,), (H, W) or (C, H, W), C in 1, 3")
    ax.axis("off")


def most_memorized_figure(examples: Any, labels: Any, mem: Any, *, n: int = 24, n_columns: int = 8,
                          class_names: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Grid of the n training examples with the highest memorization, titled "label  mem=...".

    examples: (N, ...) training inputs; labels: (N,) their (possibly corrupted) training labels;
    mem: (N,) memorization estimates (NaN, i.e. undefined or unreliable, never shown).
    """
    x, y, values = _numpy(examples), _numpy(labels).reshape(-1), _numpy(mem).astype(np.float64).reshape(-1)
    if not (x.shape[0] == y.shape[0] == values.shape[0]):
        raise DataError(
            f"examples, labels, mem: expected the same length, got {x.shape[0]}, {y.shape[0]}, {values.shape[0]}"
        )
    ranked = np.argsort(-np.where(np.isnan(values), -np.inf, values), kind="stable")
    chosen = ranked[: min(n, int(np.count_nonzero(~np.isnan(values))))]
    n_rows = max(1, int(np.ceil(len(chosen) / n_columns)))
    fig = Figure(figsize=(1.4 * n_columns, 1.6 * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen):
        ax.axis("on")
        _draw_example(ax, x[i])
        ax.set_title(f"#{i} y={_label_text(y[i], class_names)}\nmem={values[i]:.2f}", fontsize=7)
    fig.suptitle(title or "Most memorized training examples", fontsize=10)
    fig.tight_layout()
    return fig


def memorization_histogram(mem: Any, *, threshold: float = HIGH_MEMORIZATION_THRESHOLD, bins: int = 40,
                           corrupted: Any = None, title: str | None = None) -> Figure:
    """Histogram of memorization estimates with the selection threshold marked.

    With `corrupted` (indices of corrupted labels) the clean and corrupted examples are drawn as
    two stacked histograms.
    """
    values = _numpy(mem).astype(np.float64).reshape(-1)
    defined = ~np.isnan(values)
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    low = min(-0.1, float(values[defined].min())) if defined.any() else -0.1
    high = max(1.0, float(values[defined].max())) if defined.any() else 1.0
    edges = np.linspace(low, high, bins + 1)
    if corrupted is not None:
        is_corrupted = np.zeros(values.size, dtype=bool)
        is_corrupted[_numpy(corrupted).astype(np.int64)] = True
        ax.hist([values[defined & ~is_corrupted], values[defined & is_corrupted]], bins=edges, stacked=True,
                label=["clean", "corrupted"], color=["tab:blue", "tab:red"])
        ax.legend(fontsize=8)
    else:
        ax.hist(values[defined], bins=edges, color="tab:blue")
    high = int(np.count_nonzero(values[defined] >= threshold))
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, f" mem >= {threshold:g}: {high}", fontsize=8, va="top")
    ax.set_xlabel("memorization estimate")
    ax.set_ylabel("training examples")
    ax.set_yscale("log")
    left_out = int(values.size - defined.sum())
    default_title = f"Memorization of {int(defined.sum())} training examples" + (
        f"\n({left_out} without a reliable estimate left out: too few models)" if left_out else "")
    ax.set_title(title or default_title, fontsize=10)
    fig.tight_layout()
    return fig


def influence_pairs_figure(x_train: Any, y_train: Any, x_test: Any, y_test: Any, infl: Any, *,
                           n_test_examples: int = 10, n_influential: int = 4, n_random: int = 5,
                           seed: int = 0, class_names: Sequence[str] | None = None) -> Figure:
    """The original's mnist-examples figure: highest-influence train examples per test example.

    Rows: the `n_test_examples` test examples with the largest maximum influence. Each row shows
    the test example, its `n_influential` most influential training examples (titled with label and
    influence) and `n_random` random training examples of the test example's class (seeded, unlike
    the original). `infl` is an (M, N) test x train matrix or an `InfluenceEstimate` (top-k or full).
    NaN influences (training examples without a reliable estimate) are never shown.
    """
    xtr, ytr, xte, yte = _numpy(x_train), _numpy(y_train).reshape(-1), _numpy(x_test), _numpy(y_test).reshape(-1)
    if isinstance(infl, InfluenceEstimate) and infl.top_indices is not None:
        top_idx, top_val = infl.top_indices, infl.top_values
        if top_idx.shape[1] < n_influential:
            raise DataError(f"infl: has the top {top_idx.shape[1]} per test example, the figure needs {n_influential}")
        top_idx, top_val = top_idx[:, :n_influential], top_val[:, :n_influential]
    else:
        matrix = infl.scores if isinstance(infl, InfluenceEstimate) else infl
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (xte.shape[0], xtr.shape[0]):
            raise DataError(
                f"infl: expected shape (n_test, n_train) = {(xte.shape[0], xtr.shape[0])}, got {matrix.shape}"
            )
        filled = np.where(np.isnan(matrix), -np.inf, matrix)
        top_idx = np.argsort(-filled, axis=1, kind="stable")[:, :n_influential]
        top_val = np.take_along_axis(matrix, top_idx, axis=1)
    best = np.where(np.isnan(top_val[:, 0]), -np.inf, top_val[:, 0])
    rows = np.argsort(-best, kind="stable")[:n_test_examples]
    rng = np.random.default_rng(seed)
    n_columns = 1 + n_influential + n_random
    fig = Figure(figsize=(1.2 * n_columns, 1.35 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), n_columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, j in enumerate(rows):
        ax = axes[row, 0]
        _draw_example(ax, xte[j])
        ax.set_title(f"test {_label_text(yte[j], class_names)}", fontsize=7, color="tab:blue")
        for col, (i, value) in enumerate(zip(top_idx[j], top_val[j]), start=1):
            if np.isnan(value):  # fewer reliable training examples than columns
                continue
            _draw_example(axes[row, col], xtr[i])
            axes[row, col].set_title(f"{_label_text(ytr[i], class_names)} {value:.2f}", fontsize=7)
        same_class = np.flatnonzero(ytr == yte[j])
        n_picks = min(n_random, same_class.size)
        picks = rng.choice(same_class, size=n_picks, replace=False) if n_picks else []
        for col, i in enumerate(picks, start=1 + n_influential):
            _draw_example(axes[row, col], xtr[i])
            axes[row, col].set_title(f"rand {_label_text(ytr[i], class_names)}", fontsize=7, color="gray")
    fig.suptitle("Test example | most influential training examples | random same-class training examples",
                 fontsize=9)
    fig.tight_layout()
    return fig


def memorization_convergence_figure(n_models_grid: Any, mem_by_models: Any, *,
                                    threshold: float = HIGH_MEMORIZATION_THRESHOLD) -> Figure:
    """Memorization against the number of models (from `memorization_by_number_of_models`).

    n_models_grid: (K,) model counts; mem_by_models: (K, N) estimates from the first R' models.
    Panels: mean |mem_R' - mem_R| and Pearson correlation with the last row (R = most models), over
    examples defined at both; and the number of examples with mem >= threshold. The x axis is linear
    with at most 6 integer ticks (`MaxNLocator`), so its labels never overlap, whatever the grid.
    """
    grid = _numpy(n_models_grid).astype(np.int64).reshape(-1)
    table = _numpy(mem_by_models).astype(np.float64)
    if table.ndim != 2 or table.shape[0] != grid.size:
        raise DataError(f"mem_by_models: expected shape ({grid.size}, N), got {table.shape}")
    final = table[-1]
    distance, correlation, counts = [], [], []
    for row in table:
        both = ~np.isnan(row) & ~np.isnan(final)
        distance.append(np.mean(np.abs(row[both] - final[both])) if both.any() else np.nan)
        ok = both.sum() > 1 and np.std(row[both]) > 0 and np.std(final[both]) > 0
        correlation.append(np.corrcoef(row[both], final[both])[0, 1] if ok else np.nan)
        counts.append(int(np.count_nonzero(np.where(np.isnan(row), False, row >= threshold))))
    fig = Figure(figsize=(10, 3.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(grid, distance, marker="o")
    ax1.set_ylabel(f"mean |mem(R') - mem({grid[-1]})|")
    ax2.plot(grid, correlation, marker="o", color="tab:green")
    ax2.set_ylabel(f"correlation with mem({grid[-1]})")
    ax3.plot(grid, counts, marker="o", color="tab:red")
    ax3.set_ylabel(f"examples with mem >= {threshold:g}")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("number of models R'")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Memorization estimates against the number of models", fontsize=10)
    fig.tight_layout()
    return fig


def consistency_curves_figure(ratios: Any, panels: dict[str, dict[str, tuple[Any, Any, Any]]], *,
                              title: str | None = None) -> Figure:
    """Held-out accuracy against subset ratio, one line per group of examples (from `group_curves`).

    ratios: (K,) subset ratios in increasing order; panels: {panel title: {group name: (mean (K,),
    se (K,), n (K,))}}, e.g. "corrupted vs clean" and "C-score quantiles". Each line carries +- 1 SE
    bars and its group size in the legend; the C-score of an example is the mean of its points.
    """
    x = _numpy(ratios).astype(np.float64).reshape(-1)
    if not panels:
        raise DataError("consistency_curves_figure: expected at least one panel of curves")
    fig = Figure(figsize=(4.6 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, curves) in zip(axes, panels.items()):
        for group, (mean, se, n) in curves.items():
            mean, se = _numpy(mean).astype(np.float64), _numpy(se).astype(np.float64)
            if mean.shape != x.shape:
                raise DataError(f"curve {group!r}: expected {x.size} points (one per ratio), got {mean.shape}")
            size = int(np.max(_numpy(n))) if np.size(n) else 0
            ax.errorbar(x, mean, yerr=np.nan_to_num(se), marker="o", markersize=3, capsize=2,
                        label=f"{group} (n={size})")
        ax.set_xlabel("subset ratio (fraction of the training set each model saw)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Consistency (C-score) curves: accuracy on an example when it is held out", fontsize=10)
    fig.tight_layout()
    return fig


def farm_figures(farm: Any, data: Any = None, *, top_k: int = 10) -> dict[str, Figure]:
    """The figures of a farm's estimates (`modelsense.memorization.evaluation.FarmEstimates`), name -> Figure:
    memorization_histogram, memorization_convergence, consistency_curves (with several ratios) and, given
    the `Dataset` `data`, most_memorized and influence_pairs (with influence; `top_k` as estimated)."""
    mem = farm.memorization.estimate
    figures = {"memorization_histogram": memorization_histogram(mem, corrupted=farm.corrupted),
               "memorization_convergence": memorization_convergence_figure(*farm.convergence)}
    if farm.consistency_curves:
        figures["consistency_curves"] = consistency_curves_figure(farm.ratios, farm.consistency_curves)
    if data is not None:
        names = data.metadata.get("class_names")
        figures["most_memorized"] = most_memorized_figure(data.x_train, data.y_train, mem, class_names=names)
        if farm.influence is not None:
            figures["influence_pairs"] = influence_pairs_figure(data.x_train, data.y_train, data.x_test, data.y_test,
                                                                farm.influence, n_influential=min(4, top_k),
                                                                class_names=names)
    return figures
