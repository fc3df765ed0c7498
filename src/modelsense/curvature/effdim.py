"""Effective dimensionality (Maddox, Benton & Wilson 2020) and its Bayesian-linear-regression origin.

    N_eff(K, s) = Σ_i λ_i / (λ_i + s)

λ_i the eigenvalues of a curvature K (usually the top-k Lanczos Ritz values of the Hessian of the
training loss at the solution) and s > 0. Each term is in [0, 1): eigenvalues far above s count as
one determined direction, those far below as none.

Choices of s (they scale with the reduction of the loss: the Hessian of the summed loss is N times
that of the mean loss, so N_eff(H_sum, N·s) = N_eff(H_mean, s)):
  - s = 1, the original's default for its (mean-loss) Hessians;
  - s = prior precision = N × weight decay for the summed-loss Hessian (weight decay wd on the mean
    loss is the prior N(0, 1/(N wd))); then N_eff is the number of parameters the data determine
    (MacKay's γ) for a linear-Gaussian model. See `effdim_scale`.
  With s far below the smallest of the top-k eigenvalues every term is ≈ 1 and N_eff saturates at k.

Treatment of computed eigenvalues (`effective_dimension`):
  - negative eigenvalues (a Hessian away from a minimum, or noise) contribute 0 (clipped; a term
    λ/(λ + s) with λ < 0 is negative and diverges at λ = −s). `negative="abs"` uses |λ| instead.
  - unconverged Ritz values are dropped when a `converged` mask is given (the original dropped
    values exactly equal to 1.0 as "not converged"). Ritz values from the top of the spectrum are
    lower bounds of the top eigenvalues, and the eigenvalues left out are non-negative for a PSD K,
    so N_eff from the top k is a lower bound of the full N_eff.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modelsense.errors import ConfigError, shown

NEGATIVE = ("clip", "abs")


def effective_dimension(
    eigenvalues: Tensor,
    s: float = 1.0,
    *,
    converged: Tensor | None = None,
    negative: str = "clip",
) -> float:
    """N_eff = Σ_i λ_i/(λ_i + s) over the given eigenvalues (shape (k,)); see the module docstring."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
        raise ConfigError(f"effective dimension needs a finite s > 0, received s={shown(s)}")
    if negative not in NEGATIVE:
        raise ConfigError(f"unknown negative={negative!r}; expected one of {NEGATIVE}")
    if converged is not None:
        mask = torch.as_tensor(converged, dtype=torch.bool).reshape(-1)
        if mask.shape != lam.shape:
            raise ConfigError(f"converged mask has shape {tuple(mask.shape)}, eigenvalues {tuple(lam.shape)}")
        lam = lam[mask]
    lam = lam.clamp_min(0) if negative == "clip" else lam.abs()
    return float((lam / (lam + s)).sum())


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation of a and b; None for fewer than 2 points or a constant input."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(a, b)[0])
    return None if not math.isfinite(rho) else rho


def width_sweep_summary(results: Sequence[dict[str, Any]], s: Sequence[float], threshold: float) -> dict[str, Any]:
    """N_eff against generalisation over models of several widths (Maddox et al. 2020, Fig. 1).

    `results`: one dict per model with width, n_params, train_loss, train_accuracy, test_loss,
    test_error, k, eigenvalues and eigenvalues_converged (its top-k spectrum). Returns per-model
    lists sorted by width, N_eff for every s (`effective_dimension` over the converged eigenvalues;
    the first s is the headline), and the Spearman correlations with the test loss:
    spearman_effdim_test_loss / spearman_params_test_loss over the models whose train loss is below
    `threshold` (interpolating; None with fewer than two), the `_all` variants over every model.
    """
    results = sorted(results, key=lambda r: r["width"])
    neff = {float(v): [effective_dimension(torch.tensor(r["eigenvalues"]), float(v),
                                           converged=torch.tensor(r["eigenvalues_converged"])) for r in results]
            for v in s}
    head = neff[float(s[0])]
    test_loss = [r["test_loss"] for r in results]
    params = [r["n_params"] for r in results]
    interp = [r["train_loss"] < threshold for r in results]
    sel = [i for i, ok in enumerate(interp) if ok]

    def pick(values: Sequence[float]) -> list[float]:
        return [values[i] for i in sel]

    return {
        "widths": [r["width"] for r in results],
        "n_params": params,
        "train_loss": [r["train_loss"] for r in results],
        "train_accuracy": [r["train_accuracy"] for r in results],
        "test_loss": test_loss,
        "test_error": [r["test_error"] for r in results],
        "effective_dimension": head,
        "effective_dimension_by_s": {str(v): vals for v, vals in neff.items()},
        "s": [float(v) for v in s],
        "k": [r["k"] for r in results],
        "n_converged": [int(sum(r["eigenvalues_converged"])) for r in results],
        "interpolating": interp,
        "train_loss_threshold": threshold,
        "n_interpolating": len(sel),
        "spearman_effdim_test_loss": spearman(pick(head), pick(test_loss)),
        "spearman_params_test_loss": spearman(pick(params), pick(test_loss)),
        "spearman_effdim_test_loss_all": spearman(head, test_loss),
        "spearman_params_test_loss_all": spearman(params, test_loss),
    }


def grid_summary(results: Sequence[dict[str, Any]], widths: Sequence[int], depths: Sequence[int],
                 s: Sequence[float], threshold: float) -> dict[str, Any]:
    """N_eff and generalisation over a width x depth grid of models (Maddox et al. 2020, Fig. 2), with
    repeats (seeds) per cell.

    `results`: one dict per model with width, depth, seed, n_params, train_loss, test_loss, test_error,
    eigenvalues and eigenvalues_converged. Every statistic is a (depths, widths) nested list, rows in
    the order of sorted `depths`, columns of sorted `widths`: the mean over a cell's seeds (`*_std`: the
    standard deviation, ddof 0; `*_all`: each seed's value, (D, W, R) for R seeds); N_eff for every s
    (the first is the headline `effective_dimension`). A cell is interpolating when its mean train loss
    is below `threshold`; spearman_effdim_test_loss / spearman_params_test_loss rank the interpolating
    cells' means (None with fewer than two), the `_all` variants every cell.
    """
    widths, depths = sorted(int(w) for w in widths), sorted(int(d) for d in depths)
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {(d, w): [] for d in depths for w in widths}
    for r in results:
        key = (int(r["depth"]), int(r["width"]))
        if key in cells:
            cells[key].append(r)
    empty = [f"depth {d}, width {w}" for (d, w), rs in cells.items() if not rs]
    if empty:
        raise ConfigError(f"no result for the grid cells {', '.join(empty)}")
    for rs in cells.values():
        rs.sort(key=lambda r: r["seed"])

    def neff(r: dict[str, Any], v: float) -> float:
        return effective_dimension(torch.tensor(r["eigenvalues"]), float(v),
                                   converged=torch.tensor(r["eigenvalues_converged"]))

    def per_seed(value) -> np.ndarray:  # (D, W, R)
        return np.array([[[value(r) for r in cells[(d, w)]] for w in widths] for d in depths], dtype=float)

    stats = {"test_loss": per_seed(lambda r: r["test_loss"]), "train_loss": per_seed(lambda r: r["train_loss"]),
             "test_error": per_seed(lambda r: r["test_error"])}
    by_s = {float(v): per_seed(lambda r, v=v: neff(r, v)) for v in s}
    stats["effective_dimension"] = by_s[float(s[0])]
    n_params = np.array([[cells[(d, w)][0]["n_params"] for w in widths] for d in depths], dtype=np.int64)
    mean = {k: v.mean(-1) for k, v in stats.items()}
    interp = mean["train_loss"] < threshold
    sel = interp.ravel()

    def rho(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
        a, b = a.ravel(), b.ravel()
        return spearman(a[mask], b[mask]) if mask is not None else spearman(a, b)

    out: dict[str, Any] = {"widths": widths, "depths": depths, "repeats": min(len(rs) for rs in cells.values()),
                           "n_params": n_params.tolist()}
    for k in ("test_loss", "train_loss", "test_error", "effective_dimension"):
        out[k] = mean[k].tolist()
        out[f"{k}_std"] = stats[k].std(-1).tolist()
        out[f"{k}_all"] = stats[k].tolist()
    out.update({
        "effective_dimension_by_s": {str(v): vals.mean(-1).tolist() for v, vals in by_s.items()},
        "s": [float(v) for v in s],
        "interpolating": interp.tolist(),
        "train_loss_threshold": threshold,
        "n_interpolating": int(sel.sum()),
        "spearman_effdim_test_loss": rho(mean["effective_dimension"], mean["test_loss"], sel),
        "spearman_params_test_loss": rho(n_params.astype(float), mean["test_loss"], sel),
        "spearman_effdim_test_loss_all": rho(mean["effective_dimension"], mean["test_loss"]),
        "spearman_params_test_loss_all": rho(n_params.astype(float), mean["test_loss"]),
    })
    return out


def _spearman_line(m: dict[str, Any], noun: str, count: int) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    return (f"Spearman with test loss, {m['n_interpolating']} {noun} with train loss < {m['train_loss_threshold']:g}: "
            f"N_eff {fmt(m['spearman_effdim_test_loss'])}, params {fmt(m['spearman_params_test_loss'])}; "
            f"all {count}: N_eff {fmt(m['spearman_effdim_test_loss_all'])}, "
            f"params {fmt(m['spearman_params_test_loss_all'])}")


def describe_width_sweep(m: dict[str, Any]) -> str:
    """A table of `width_sweep_summary` `m` (one row per width) and its Spearman correlations."""
    lines = [f"{'width':>6} {'params':>8} {'train loss':>10} {'test loss':>9} {'test err':>8} {'N_eff':>7}"]
    lines += [f"{w:>6} {m['n_params'][i]:>8} {m['train_loss'][i]:>10.4g} {m['test_loss'][i]:>9.4g} "
              f"{m['test_error'][i]:>8.3f} {m['effective_dimension'][i]:>7.3g}" for i, w in enumerate(m["widths"])]
    return "\n".join([*lines, _spearman_line(m, "models", len(m["widths"]))])


def describe_grid(m: dict[str, Any]) -> str:
    """A table of `grid_summary` `m` (one row per cell: the means over its seeds) and its Spearman correlations."""
    lines = [f"{'depth':>5} {'width':>6} {'params':>8} {'train loss':>10} {'test loss':>9} {'N_eff':>7}"]
    lines += [f"{d:>5} {w:>6} {m['n_params'][i][j]:>8} {m['train_loss'][i][j]:>10.4g} {m['test_loss'][i][j]:>9.4g} "
              f"{m['effective_dimension'][i][j]:>7.3g}" for i, d in enumerate(m["depths"])
              for j, w in enumerate(m["widths"])]
    return "\n".join([*lines, _spearman_line(m, "cells", len(m["depths"]) * len(m["widths"]))])


def effdim_scale(weight_decay: float, n_train: int, reduction: str = "sum") -> float:
    """s = prior precision matching weight decay: N·wd for the summed-loss Hessian, wd for the mean."""
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")
    if weight_decay <= 0 or n_train < 1:
        raise ConfigError(f"need weight_decay > 0 and n_train >= 1, received {weight_decay}, {n_train}")
    return weight_decay * n_train if reduction == "sum" else weight_decay


def fourier_features(x: Tensor, n_frequencies: int = 100) -> Tensor:
    """φ(x) = [cos((f+1)πx) for f < F, sin((f+1)πx) for f < F], shape (n, 2F)."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)
    freq = (torch.arange(n_frequencies, dtype=torch.float64) + 1) * math.pi
    return torch.cat([torch.cos(x * freq), torch.sin(x * freq)], dim=1)


@dataclass(frozen=True)
class BLRContraction:
    """N_eff against the number n of points seen, all shape (N,).

    effdim_posterior: N_eff of the posterior covariance Σ_n (eigenvalues 1/(μ/σ² + 1/τ²)), s_parameter;
    effdim_function:  N_eff of the function-space covariance Φ_n Σ_n Φ_nᵀ (non-zero eigenvalues
                      μ/(μ/σ² + 1/τ²)), s_function;
    effdim_hessian:   N_eff of the data precision Φ_nᵀΦ_n/σ² with s = 1/τ² (the prior precision):
                      the number of well-determined parameters, P − tr(Σ_n)/τ².
    (μ: eigenvalues of Φ_nᵀ Φ_n.)
    """

    n: Tensor
    effdim_posterior: Tensor
    effdim_function: Tensor
    effdim_hessian: Tensor
    n_params: int

    def summary(self) -> dict[str, Any]:
        """n_params, n_points, and each N_eff curve at its last point (the posterior's also at its first)
        and at n = P − P/8, P, P + P/8 (`blr_regions`; those within 1..N: `*_at`, keys "n=<n>")."""
        P, N = self.n_params, len(self.n)
        lo, hi = blr_regions(P)
        at = {f"n={m}": m for m in (int(lo), P, int(hi)) if 1 <= m <= N}
        out: dict[str, Any] = {"n_params": P, "n_points": N,
                               "effdim_posterior_first": float(self.effdim_posterior[0])}
        for name in ("posterior", "function", "hessian"):
            curve = getattr(self, f"effdim_{name}")
            out[f"effdim_{name}_last"] = float(curve[-1])
            out[f"effdim_{name}_at"] = {k: float(curve[m - 1]) for k, m in at.items()}
        return out


def blr_regions(n_params: int) -> tuple[float, float]:
    """Where the BLR posterior contracts: P ∓ P/8 points (175 and 225 for P = 200, as the notebook of Maddox et al. "
    "2020)."""
    return n_params - n_params / 8, n_params + n_params / 8


def blr_posterior_contraction(
    features: Tensor | None = None,
    *,
    n_points: int = 300,
    n_frequencies: int = 100,
    x_max: float = 50.0,
    noise_variance: float = 0.1,
    prior_variance: float = 3.0,
    s_parameter: float = 5.0,
    s_function: float = 5.0,
    seed: int = 0,
    shuffle: bool = True,
) -> BLRContraction:
    """Posterior contraction of Bayesian linear regression y = Φα + ε, α ~ N(0, τ² I), ε ~ N(0, σ²),
    as points are added one at a time (in a random order when `shuffle`), closed form:

        Σ_n = (Φ_nᵀ Φ_n / σ² + I/τ²)^{-1}   (independent of y)

    Default features: the original notebook's P = 200 Fourier features of x = linspace(0, x_max, n_points)
    (`fourier_features`), σ² = 0.1, τ² = 3, s = 5. Returns a BLRContraction (see its docstring).
    """
    if noise_variance <= 0 or prior_variance <= 0 or s_parameter <= 0 or s_function <= 0:
        raise ConfigError(
            "noise_variance, prior_variance, s_parameter and s_function must all be > 0, received "
            f"{noise_variance}, {prior_variance}, {s_parameter}, {s_function}"
        )
    if features is None:
        features = fourier_features(torch.linspace(0, x_max, n_points, dtype=torch.float64), n_frequencies)
    phi = torch.as_tensor(features, dtype=torch.float64)
    if phi.ndim != 2 or phi.shape[0] < 1:
        raise ConfigError(f"features must have shape (n, P) with n >= 1, received {tuple(phi.shape)}")
    N, P = phi.shape
    if shuffle:
        phi = phi[torch.randperm(N, generator=torch.Generator().manual_seed(seed))]
    mu = torch.empty(N, P, dtype=torch.float64)
    gram = torch.zeros(P, P, dtype=torch.float64)
    block = 64
    for start in range(0, N, block):  # cumulative Gram matrices Φ_nᵀΦ_n, eigenvalues in batches
        outer = phi[start : start + block, :, None] * phi[start : start + block, None, :]
        grams = gram + torch.cumsum(outer, dim=0)
        mu[start : start + block] = torch.linalg.eigvalsh(grams).clamp_min(0)
        gram = grams[-1]
    precision = mu / noise_variance + 1.0 / prior_variance
    post = 1.0 / precision
    func = mu / precision
    data = mu / noise_variance
    return BLRContraction(
        n=torch.arange(1, N + 1),
        effdim_posterior=(post / (post + s_parameter)).sum(1),
        effdim_function=(func / (func + s_function)).sum(1),
        effdim_hessian=(data / (data + 1.0 / prior_variance)).sum(1),
        n_params=P,
    )
