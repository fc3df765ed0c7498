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
    if bool((lam > 0).all()):
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"eigenvalue λ_i ({spectrum.config.matrix}, {spectrum.config.reduction} loss)")
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
    fig = Figure(figsize=(13, 3.6))
    for ax, (values, label) in zip(fig.subplots(1, 3), panels):
        ax.axvspan(0, lo, color="tab:red", alpha=0.12, lw=0)
        ax.axvspan(lo, hi, color="gold", alpha=0.2, lw=0)
        ax.axvspan(hi, max(n[-1], hi), color="tab:green", alpha=0.12, lw=0)
        ax.plot(n, values.numpy(), color="k", lw=1.4)
        ax.axvline(result.n_params, color="grey", ls=":", lw=0.8)
        ax.set_xlim(0, max(n[-1], hi))
        ax.set_xlabel("number of data points n")
        ax.set_ylabel("N_eff")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"Bayesian linear regression, P = {result.n_params} Fourier features: posterior contraction")
    fig.tight_layout()
    return fig


__all__ = ["blr_figure", "spectrum_figure", "width_sweep_figure"]
