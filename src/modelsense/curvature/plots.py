"""Figures of the curvature commands: numbers in, a matplotlib `Figure` out.

Built with `matplotlib.figure.Figure` (no pyplot, no global state, rendered by Agg on `fig.savefig`),
as `modelsense.memorization.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from modelsense.curvature.effdim import BLRContraction, blr_regions
from modelsense.curvature.spectrum import Spectrum


def spectrum_figure(spectrum: Spectrum, grid: np.ndarray | None = None, density: np.ndarray | None = None,
                    title: str = "") -> Figure:
    """Top-k eigenvalues (converged filled, unconverged open; log scale when all > 0) with a line at
    each s, and the SLQ density on `grid` (log scale) when given."""
    fig = Figure(figsize=(10 if grid is not None else 5, 3.6))
    axes = fig.subplots(1, 2 if grid is not None else 1, squeeze=False)
    ax = axes[0, 0]
    lam = spectrum.eigenvalues.double().cpu().numpy()
    conv = spectrum.converged.cpu().numpy().astype(bool)
    idx = np.arange(1, len(lam) + 1)
    ax.plot(idx[conv], lam[conv], "o", ms=4, label="converged")
    if (~conv).any():
        ax.plot(idx[~conv], lam[~conv], "o", ms=4, mfc="none", color="grey", label="not converged")
    for s in spectrum.config.s:
        ax.axhline(s, ls="--", lw=0.8, color="tab:red")
        ax.annotate(f"s = {s:g}", (idx[-1], s), ha="right", va="bottom", fontsize=8, color="tab:red")
    _eigenvalue_axes(ax, bool((lam > 0).all()), f"({spectrum.config.matrix}, {spectrum.config.reduction} loss)")
    ax.set_title(f"top {len(lam)} eigenvalues, N_eff = {spectrum.effective_dimension[spectrum.config.s[0]]:.3g}")
    ax.legend(fontsize=8)
    if grid is not None:
        ax = axes[0, 1]
        ax.semilogy(grid, np.maximum(density, 1e-300))
        ax.set_ylim(bottom=max(float(density.max()) * 1e-8, 1e-300))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title("spectral density (stochastic Lanczos quadrature)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _eigenvalue_axes(ax, log: bool, what: str) -> None:
    """Axes of eigenvalues λ_i against their index i (integer ticks; y label "eigenvalue λ_i `what`"), y on a
    log scale when `log` (every eigenvalue > 0)."""
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"eigenvalue λ_i {what}")


def module_spectra_figure(whole: Spectrum, modules: dict[str, Spectrum], title: str = "") -> Figure:
    """Top eigenvalues of each module's diagonal block (one line each) next to the whole matrix's
    (black), log scale when all are > 0, with a line at the first s; the legend gives each N_eff."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    s0 = whole.config.s[0]
    series = {"whole": whole, **modules}
    positive = True
    for k, (name, spec) in enumerate(series.items()):
        lam = spec.eigenvalues.double().cpu().numpy()
        positive = positive and bool((lam > 0).all())
        style = {"color": "black", "lw": 1.8} if k == 0 else {"lw": 1.0}
        ax.plot(np.arange(1, len(lam) + 1), lam, "o-", ms=3, label=f"{name} ({spec.n_params} params, "
                f"N_eff {spec.effective_dimension[s0]:.3g})", **style)
    ax.axhline(s0, ls="--", lw=0.8, color="tab:red")
    _eigenvalue_axes(ax, positive, f"({whole.config.matrix})")
    ax.set_title(f"diagonal blocks per module (s = {s0:g} dashed)")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def width_sweep_figure(summary: dict[str, Any], title: str = "") -> Figure:
    """Test/train loss, N_eff and parameter count against width (log x) from the summary of a width
    sweep (`effdim.width_sweep_summary`); filled markers = interpolating models."""
    w = np.asarray(summary["widths"], dtype=float)
    interp = np.asarray(summary["interpolating"], dtype=bool)
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)

    def mark(ax, y, color, label):
        ax.plot(w, y, "-", color=color, lw=1.2, label=label)
        ax.plot(w[interp], np.asarray(y)[interp], "o", color=color, ms=5)
        ax.plot(w[~interp], np.asarray(y)[~interp], "o", color=color, mfc="white", ms=5)

    def rho(key: str) -> str:
        return "n/a" if summary[key] is None else f"{summary[key]:.2f}"

    ax = axes[0]
    mark(ax, summary["test_loss"], "tab:blue", "test loss")
    ax.set_ylabel("test loss (mean NLL)", color="tab:blue")
    twin = ax.twinx()
    mark(twin, summary["effective_dimension"], "tab:red", "N_eff")
    twin.set_ylabel(f"N_eff (s = {summary['s'][0]:g})", color="tab:red")
    ax.set_title(f"Spearman(N_eff, test loss) = {rho('spearman_effdim_test_loss')} (interpolating)", fontsize=9)
    ax = axes[1]
    for key, vals in summary["effective_dimension_by_s"].items():
        ax.plot(w, vals, "o-", ms=4, label=f"s = {float(key):g}")
    ax.set_ylabel("effective dimension N_eff")
    ax.legend(fontsize=8)
    ax.set_title("N_eff for each s", fontsize=9)
    ax = axes[2]
    mark(ax, summary["n_params"], "tab:green", "parameters")
    ax.set_yscale("log")
    ax.set_ylabel("number of parameters", color="tab:green")
    twin = ax.twinx()
    twin.plot(w, summary["train_loss"], "s--", color="tab:grey", ms=3, lw=0.8)
    twin.axhline(summary["train_loss_threshold"], color="tab:grey", lw=0.6, ls=":")
    twin.set_yscale("log")
    twin.set_ylabel("train loss", color="tab:grey")
    ax.set_title(f"Spearman(params, test loss) = {rho('spearman_params_test_loss')}", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
    fig.suptitle(f"{title + ': ' if title else ''}filled markers = train loss < {summary['train_loss_threshold']:g}")
    fig.tight_layout()
    return fig


def grid_figure(summary: dict[str, Any], title: str = "") -> Figure:
    """Heatmaps over depth (rows) x width (columns) of N_eff, test loss and train loss (cell means over
    seeds; Maddox et al. 2020, Fig. 2), with level curves of the parameter count and a dot on the
    interpolating cells (mean train loss below the threshold), from `effdim.grid_summary`."""
    widths, depths = summary["widths"], summary["depths"]
    params = np.asarray(summary["n_params"], dtype=float)
    interp = np.asarray(summary["interpolating"], dtype=bool)
    panels = [("effective_dimension", f"N_eff (s = {summary['s'][0]:g})", "viridis"),
              ("test_loss", "test loss (mean NLL)", "magma"), ("train_loss", "train loss (mean NLL)", "magma")]
    fig = Figure(figsize=(4.4 * len(panels), 3.6))
    for ax, (key, label, cmap) in zip(fig.subplots(1, len(panels)), panels):
        values = np.asarray(summary[key], dtype=float)
        image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap)
        fig.colorbar(image, ax=ax)
        if len(widths) > 1 and len(depths) > 1 and np.ptp(np.log10(params)) > 0:
            contours = ax.contour(np.log10(params), colors="gold", linewidths=0.8, levels=4)
            ax.clabel(contours, fmt=lambda v: f"{10 ** v:.2g}", fontsize=7)
        rows, cols = np.nonzero(interp)
        ax.plot(cols, rows, ".", color="white", ms=4)
        ax.set_xticks(range(len(widths)), [str(w) for w in widths])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("width")
        ax.set_ylabel("depth")
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"{title + ': ' if title else ''}gold: parameter count; dots: train loss < "
                 f"{summary['train_loss_threshold']:g}", fontsize=10)
    fig.tight_layout()
    return fig


def grid_profiles_figure(summary: dict[str, Any], title: str = "") -> Figure:
    """N_eff (top) and test (solid) / train (dashed) loss (bottom) against the parameter count:
    increasing depth, one line per width (left), and increasing width, one line per depth (right);
    bands ± 2 standard deviations over the seeds of a cell (the two-spirals figure of Maddox et al. 2020)."""
    params = np.asarray(summary["n_params"], dtype=float)
    mean = {k: np.asarray(summary[k], dtype=float) for k in ("effective_dimension", "test_loss", "train_loss")}
    std = {k: np.asarray(summary[f"{k}_std"], dtype=float) for k in mean}
    fig = Figure(figsize=(11, 6.4))
    axes = fig.subplots(2, 2, sharex="col")
    colors = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray")]
    for col, (axis, other, fixed_name) in enumerate((("depth", "widths", "width"), ("width", "depths", "depth"))):
        fixed = summary[other]
        for i, value in enumerate(fixed):
            # lines along the axis that varies, at one value of the other
            pick = (slice(None), i) if axis == "depth" else (i, slice(None))
            x = params[pick]
            color = colors[i % len(colors)]
            for row, keys in enumerate((("effective_dimension",), ("test_loss", "train_loss"))):
                ax = axes[row, col]
                for key in keys:
                    y, e = mean[key][pick], std[key][pick]
                    ax.plot(x, y, "o-" if key != "train_loss" else "s--", color=color, ms=3, lw=1.2,
                            label=f"{fixed_name} {value}" if key != "train_loss" else None)
                    if summary["repeats"] > 1:
                        ax.fill_between(x, y - 2 * e, y + 2 * e, color=color, alpha=0.15, lw=0)
        axes[0, col].set_title(f"increasing {axis}", fontsize=10)
        axes[0, col].set_ylabel(f"N_eff (s = {summary['s'][0]:g})")
        axes[1, col].set_ylabel("loss: test (solid), train (dashed)")
        axes[1, col].set_xlabel("number of parameters")
        axes[0, col].legend(fontsize=7)
        for row in range(2):
            axes[row, col].set_xscale("log")
    fig.suptitle(f"{title + ': ' if title else ''}bands ± 2 std over seeds", fontsize=10)
    fig.tight_layout()
    return fig


#: colours of the perturbation directions: top (reds), bottom (blues), random (greys)
_KIND_COLORS = {"top": ("#8b0000", "#d62728", "#ff7f0e", "#e377c2"), "bottom": ("#1f77b4", "#17becf", "#9467bd"),
                "random": ("#555555", "#888888", "#2ca02c")}


def perturbation_figure(t: np.ndarray, names: Sequence[str], kinds: Sequence[str], train: dict[str, np.ndarray],
                        test: dict[str, np.ndarray], title: str = "") -> Figure:
    """The loss along θ + t·d per direction d (top eigenvectors red, low-curvature blue, random grey):
    train (solid) and test (dashed) loss, test accuracy, and the agreement of the train predictions
    with those at t = 0 (the original's classification homogeneity). `train` / `test`: dicts of
    (m, T) arrays "loss", "accuracy", "agreement" (`perturbation.LineScan`)."""
    fig = Figure(figsize=(10, 7.4))  # 2 x 2 (the fourth cell holds the legend): readable at a page's width
    grid = fig.subplots(2, 2)
    axes, legend_ax = [grid[0, 0], grid[0, 1], grid[1, 0]], grid[1, 1]
    seen: dict[str, int] = {}
    for i, (name, kind) in enumerate(zip(names, kinds)):
        palette = _KIND_COLORS.get(kind, ("k",))
        color = palette[seen.get(kind, 0) % len(palette)]
        seen[kind] = seen.get(kind, 0) + 1
        axes[0].plot(t, train["loss"][i], "-", color=color, lw=1.3, label=name)
        axes[0].plot(t, test["loss"][i], "--", color=color, lw=1.0)
        axes[1].plot(t, test["accuracy"][i], "-", color=color, lw=1.2)
        axes[2].plot(t, train["agreement"][i], "-", color=color, lw=1.2)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss (mean NLL): train solid, test dashed")
    axes[1].set_ylabel("test accuracy")
    axes[2].set_ylabel("train predictions unchanged (homogeneity)")
    for ax in axes:
        ax.set_xlabel("t (θ + t·d, ‖d‖ = 1)")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", ncol=2, title="direction d (train solid, test dashed)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def blr_figure(result: BLRContraction, s_parameter: float, s_function: float, prior_variance: float) -> Figure:
    """N_eff of the posterior, of the function-space covariance and of the data precision against n,
    shaded red (n < P - P/8), yellow (around P) and green (n > P + P/8): `effdim.blr_regions`."""
    n = result.n.numpy()
    lo, hi = blr_regions(result.n_params)
    panels: Sequence[tuple[Any, str]] = [
        (result.effdim_posterior, f"posterior covariance Σ_n (s = {s_parameter:g})"),
        (result.effdim_function, f"function space Φ_n Σ_n Φ_nᵀ (s = {s_function:g})"),
        (result.effdim_hessian, f"data precision Φ_nᵀΦ_n/σ² (s = 1/τ² = {1 / prior_variance:.3g})"),
    ]
    fig = Figure(figsize=(12, 4))
    for ax, (values, label) in zip(fig.subplots(1, 3), panels):
        ax.axvspan(0, lo, color="tab:red", alpha=0.12, lw=0)
        ax.axvspan(lo, hi, color="gold", alpha=0.2, lw=0)
        ax.axvspan(hi, max(n[-1], hi), color="tab:green", alpha=0.12, lw=0)
        ax.plot(n, values.numpy(), color="k", lw=1.4)
        ax.axvline(result.n_params, color="grey", ls=":", lw=0.8)
        ax.set_xlim(0, max(n[-1], hi))
        ax.set_xlabel("number of data points n")
        ax.set_ylabel("N_eff")
        ax.set_title(label, fontsize=10.5)
    fig.suptitle(f"Bayesian linear regression, P = {result.n_params} Fourier features: posterior contraction")
    fig.tight_layout()
    return fig


__all__ = ["blr_figure", "grid_figure", "grid_profiles_figure", "perturbation_figure", "spectrum_figure",
           "width_sweep_figure"]
