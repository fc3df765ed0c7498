"""How MPE estimates compare with their ground truth, and the small choices of the MPE experiments
(Nickl et al. 2023): which examples to retrain without, at which steps to look, how to smooth a curve."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def correlations(est: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman between estimated and true values, and `slope`, the least-squares slope
    of est ≈ slope · true through the origin, Σ est·true / Σ true² (1 when the estimates have the
    right scale; a correlation cannot see a wrong scale). NaN where undefined (fewer than 2 values,
    a constant side; the slope where Σ true² = 0)."""
    est, true = np.asarray(est, dtype=float), np.asarray(true, dtype=float)
    denom = float(true @ true)
    slope = float(est @ true) / denom if len(true) and denom > 0 else float("nan")
    if len(est) < 2 or np.std(est) == 0 or np.std(true) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "slope": slope}
    from scipy import stats

    return {"pearson": float(stats.pearsonr(est, true)[0]), "spearman": float(stats.spearmanr(est, true)[0]),
            "slope": slope}


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Means of `window` consecutive values, (len - window + 1,) (np.convolve's `valid`); the values
    unchanged when window <= 1 or longer than them (the smoothing of Nickl et al. 2023's δ curves)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def smoothed_curves(deltas: Sequence[float], estimated: Sequence[float], test_nll: Sequence[float],
                    window: int) -> dict[str, np.ndarray]:
    """The loo-l2reg curves over the δ grid after a moving average of `window` (`moving_average`):
    `deltas`, the geometric mean of each window's δ (its centre on the log axis), `estimated_nll` and
    `test_nll`, each (len - window + 1,) (unchanged for window <= 1)."""
    return {"deltas": 10.0 ** moving_average(np.log10(np.asarray(deltas, dtype=float)), window),
            "estimated_nll": moving_average(estimated, window), "test_nll": moving_average(test_nll, window)}


def retrain_indices(n: int, n_retrain: int) -> np.ndarray:
    """The examples to retrain without: the first n_retrain of a permutation seeded with 1 (as the original)."""
    order = np.arange(n)
    np.random.RandomState(1).shuffle(order)
    return order[: min(n_retrain, n)]


def default_checkpoint_iterations(total: int) -> tuple[int, ...]:
    """(10, 10 %, 40 %, 100 %) of the training steps, like the original's {10, 1000, 5000, 12250}."""
    return tuple(sorted({min(10, total), max(1, round(0.1 * total)), max(1, round(0.4 * total)), total}))


def binned_by_rank(sensitivities: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank the examples by the last row of `sensitivities` (K, N), most sensitive first (stable), and
    average every row over `n_bins` consecutive groups of that ranking (`np.array_split`, so N need not
    be divisible): (order (N,), binned (K, min(n_bins, N)))."""
    order = np.argsort(-sensitivities[-1], kind="stable")
    bins = np.array_split(order, min(n_bins, sensitivities.shape[1]))
    return order, np.stack([[s[b].mean() for b in bins] for s in sensitivities])


def agreement_with_last(sensitivities: np.ndarray) -> dict[str, list[float]]:
    """How each row of `sensitivities` (K, N) ranks the examples like the last row: `spearman_to_last`
    (Spearman correlation) and `top_decile_overlap_to_last` (the fraction of the last row's top
    max(1, N // 10) examples among the row's own top as many), one value per row."""
    from scipy import stats

    last = sensitivities[-1]
    top = np.argsort(-last, kind="stable")[: max(1, len(last) // 10)]
    return {"spearman_to_last": [float(stats.spearmanr(s, last)[0]) for s in sensitivities],
            "top_decile_overlap_to_last": [float(len(np.intersect1d(np.argsort(-s)[: len(top)], top)) / len(top))
                                           for s in sensitivities]}

