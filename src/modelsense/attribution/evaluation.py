"""How good are attribution scores: noisy-label detection (ROC AUC, average precision, the detection
curve) and the linear datamodeling score (LDS), each with its standard error; the share of each
module in the most helpful / harmful pairs of a per-module breakdown (`module_shares`).

    >>> auc, ap = auc_ap(self_scores, corrupted)
    >>> (auc, auc_se), (ap, ap_se) = auc_ap_with_errors(self_scores, corrupted, n_bootstrap=200)
    >>> lds, per_test = linear_datamodeling_score(scores, masks, losses)
    >>> lds_standard_error(per_test)
    >>> masks, losses = lds_ground_truth(data_cfg, data, model_cfg, train_cfg, n_test, n_models=50, alpha=0.5,
    ...                                  root="store")   # the M retrained models of the LDS
    >>> helpful, harmful = most_influential(scores, k=5)  # (n_test, k) training indices

Standard errors: AUC and AP by the bootstrap over training examples (resampled with replacement,
stratified by clean / corrupted, so every resample has both); LDS as the standard error of the mean
over test examples (std / sqrt(n) of the per-test Spearman correlations).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from modelsense.data import DataConfig, Dataset
    from modelsense.models import ModelConfig
    from modelsense.retraining.store import RetrainOptions
    from modelsense.training.config import TrainConfig


def _labels(n: int, corrupted: np.ndarray) -> np.ndarray:
    labels = np.zeros(n, dtype=int)
    labels[np.asarray(corrupted, dtype=np.int64)] = 1
    return labels


def _finite(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    return np.where(finite, s, (s[finite].min() - 1) if finite.any() else 0.0)  # NaN/inf rank last


def auc_ap(scores: np.ndarray, corrupted: np.ndarray) -> tuple[float, float]:
    """ROC AUC and average precision of `scores` (N,) ranking the `corrupted` indices first."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, s = _labels(len(scores), corrupted), _finite(scores)
    return float(roc_auc_score(labels, s)), float(average_precision_score(labels, s))


def auc_ap_with_errors(scores: np.ndarray, corrupted: np.ndarray, n_bootstrap: int = 200,
                       seed: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """((AUC, its bootstrap standard error), (AP, its standard error)); 0 resamples give NaN errors."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    auc, ap = auc_ap(scores, corrupted)
    if n_bootstrap < 1:
        return (auc, float("nan")), (ap, float("nan"))
    labels, s = _labels(len(scores), corrupted), _finite(scores)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rng = np.random.default_rng(seed)
    aucs, aps = np.empty(n_bootstrap), np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        aucs[b] = roc_auc_score(labels[idx], s[idx])
        aps[b] = average_precision_score(labels[idx], s[idx])
    return (auc, float(aucs.std(ddof=1))), (ap, float(aps.std(ddof=1)))


def detection_curve(scores: np.ndarray, corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of training data inspected, fraction of corrupted labels found), highest scores first."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hit = _labels(len(scores), corrupted).astype(bool)
    found = np.cumsum(hit[order]) / max(hit.sum(), 1)
    return np.arange(1, len(scores) + 1) / len(scores), found


def negated_test_influence(attributor, x_val, y_val) -> np.ndarray:
    """−(1/V) Σ_j score(i, j) over V validation examples, (N,): minus the influence of each training
    example on the mean validation loss (high = removing it would lower that loss: harmful), from a
    fitted attributor's pairwise `scores`."""
    return -attributor.scores(x_val, y_val).double().mean(1).numpy()


def linear_datamodeling_score(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> tuple[float, np.ndarray]:
    """LDS: mean over test examples j of Spearman_m(losses[m, j], −Σ_i masks[m, i] scores[i, j]).

    scores (N, n_test), masks (M, N) bool, losses (M, n_test). Test examples whose actual or
    predicted losses are constant over the M subsets are left out of the mean (NaN per test).
    Returns (LDS, per-test correlations (n_test,)).
    """
    from scipy.stats import rankdata

    pred = -(masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64))
    ra, rp = rankdata(losses, axis=0), rankdata(pred, axis=0)
    ra, rp = ra - ra.mean(0), rp - rp.mean(0)
    denom = np.sqrt((ra**2).sum(0) * (rp**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (ra * rp).sum(0) / denom, np.nan)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"), rho


def lds_standard_error(per_test: np.ndarray) -> float:
    """Standard error over test examples of the LDS (std / sqrt(n) of the finite per-test values)."""
    rho = np.asarray(per_test, dtype=np.float64)
    rho = rho[np.isfinite(rho)]
    return float(rho.std(ddof=1) / np.sqrt(len(rho))) if len(rho) > 1 else float("nan")


def module_shares(parts: dict[str, np.ndarray], fraction: float = 0.01) -> dict[str, dict[str, float]]:
    """The share of each module in the most helpful and the most harmful scores.

    `parts`: {module: scores of any one shape} summing to the total S (`scores(..., by_module=True)`).
    With T the `fraction` of entries (at least one) with the largest total S ("helpful") or the most
    negative ("harmful"):  share_m = Σ_{(i,j) ∈ T} part_m(i, j) / Σ_{(i,j) ∈ T} S(i, j),
    so the shares of one set sum to 1 (a module pulling the other way has a negative share).
    Returns {"helpful": {module: share}, "harmful": {module: share}}.
    """
    if not parts:
        raise ValueError("no modules given")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], received {fraction}")
    names = list(parts)
    flat = np.stack([np.asarray(parts[m], dtype=np.float64).reshape(-1) for m in names])  # (modules, pairs)
    total = flat.sum(0)
    k = max(1, int(round(fraction * total.size)))
    order = np.argsort(total, kind="stable")
    out = {}
    for kind, chosen in (("helpful", order[-k:]), ("harmful", order[:k])):
        denominator = total[chosen].sum()
        out[kind] = {m: float(flat[r, chosen].sum() / denominator) if denominator != 0 else float("nan")
                     for r, m in enumerate(names)}
    return out


def lds_ground_truth(data_cfg: DataConfig, data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, n_test: int,
                     *, n_models: int, alpha: float, root: str | Path, retrain_options: RetrainOptions | None = None,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(masks (M, N) bool, test losses (M, n_test)) of M models trained from scratch on random α-subsets:
    the jobs `subset_jobs(N, α, range(M), seed0=train_cfg.seed)` of the ground-truth store under `root`
    (shared with memorization at ρ = α on the same recipe), trained where `retrain_options` say."""
    from dataclasses import replace

    from modelsense.retraining.store import RetrainOptions, RetrainRecipe, subset_jobs, train_jobs

    options = retrain_options or RetrainOptions()
    recipe = RetrainRecipe(data_cfg, model_cfg, replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=()))
    jobs = subset_jobs(data.n_train, alpha, range(n_models), seed0=train_cfg.seed)
    tables = train_jobs(recipe, jobs, root, data=data, backend=options.backend, address=options.address,
                        chunk_models=options.chunk_size, progress=progress, log=log)
    return tables["masks"], tables["test_loss"][:, :n_test].astype(np.float64)


def most_influential(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(helpful, harmful), each (n_test, k): per test column j of `scores` (N, n_test), the training
    indices of the k highest scores (most helpful first) and of the k lowest (most harmful first)."""
    s = np.asarray(scores)
    return np.argsort(-s, axis=0)[:k].T, np.argsort(s, axis=0)[:k].T


__all__ = ["auc_ap", "auc_ap_with_errors", "detection_curve", "lds_ground_truth", "lds_standard_error",
           "linear_datamodeling_score", "module_shares", "most_influential", "negated_test_influence"]
