"""How MPE estimates compare with their ground truth, the estimates over a grid (prior precisions,
training snapshots), and the small choices of the MPE experiments (Nickl et al. 2023): which examples
to retrain without, at which steps to look, how to smooth a curve.

The `modelsense mpe` commands compose these: `loo_nll_over_deltas` (loo-l2reg), `validation_metrics`
(validation), `sensitivities_over_training` with `binned_by_rank` and `agreement_with_last` (evolving),
`loco_metrics` (loco).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.data import Dataset
from modelsense.errors import ConfigError
from modelsense.mpe.estimator import (
    VARIANTS,
    MPEResult,
    MPESettings,
    mc_prediction_error,
    memory_perturbation,
    per_example_nll,
    softmax_deviation,
)
from modelsense.mpe.predictive import loo_estimates, posterior_at, predictive_covariances
from modelsense.progress import progress_bar
from modelsense.training.config import TrainConfig

#: the damping values α of the `loo` variant that validation also reports (α = 0: `full` through the exact softmax)
LOO_DAMPING_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def training_steps(n_train: int, bs: int, epochs: int) -> int:
    """Optimizer steps of `epochs` epochs over n_train examples in batches of bs: ceil(n_train / bs) · epochs."""
    return math.ceil(n_train / bs) * epochs


def checkpoint_iterations(n_train: int, bs: int, epochs: int, requested: Sequence[int] = ()) -> tuple[int, ...]:
    """The steps at which to look during training: `requested`, or `default_checkpoint_iterations`;
    ConfigError for a step beyond the `training_steps`."""
    total = training_steps(n_train, bs, epochs)
    its = tuple(requested) or default_checkpoint_iterations(total)
    late = [i for i in its if i > total]
    if late:
        raise ConfigError(f"checkpoint iterations {late} exceed the {total} steps of training ({epochs} epochs x "
                          f"{math.ceil(n_train / bs)})")
    return its


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



def best_deltas(deltas: Sequence[float], estimated: Sequence[float], test_nll: Sequence[float]) -> dict[str, float]:
    """The prior precision each curve selects: `best_delta_estimated` (least estimated LOO NLL) and
    `best_delta_test` (least test NLL); the first on ties."""
    d = np.asarray(deltas, dtype=float)
    return {"best_delta_estimated": float(d[int(np.argmin(estimated))]),
            "best_delta_test": float(d[int(np.argmin(test_nll))])}


def smoothed_best_deltas(deltas: Sequence[float], estimated: Sequence[float], test_nll: Sequence[float],
                         window: int) -> dict[str, Any]:
    """`smoothed_curves` as lists with the δ each smoothed curve selects (`best_deltas`)."""
    c = smoothed_curves(deltas, estimated, test_nll, window)
    return {k: v.tolist() for k, v in c.items()} | best_deltas(c["deltas"], c["estimated_nll"], c["test_nll"])


def loo_nll_over_deltas(model_fn: Callable[[int], nn.Module], data: Dataset, train_cfg: TrainConfig,
                        deltas: np.ndarray, *, structure: str = "kfac", chunk_size: int = 500, variant: str = "full",
                        loo_damping: float = 1.0, progress: bool = True,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """For each prior precision δ_m: a model trained with δ_m from the same init (seed `train_cfg.seed`,
    same batch order), its LOO-CV NLL estimated by the MPE of every variant (a Laplace posterior of
    `structure` with prior precision δ_m) and its test NLL and accuracy (Nickl et al. 2023, Fig. 4).

    All δ are trained at once by the retraining engine: model m gets uniform example weights
    s_m = δ_max/δ_m, which leave its mean minibatch loss unchanged and turn the engine's prior term
    δ_max/(2 Σ_i w_mi)‖θ‖² into δ_m/(2N)‖θ‖².
    Returns lists over δ: `deltas`, `estimated_nll` (of `variant`), `test_nll`, `test_accuracy`, the
    `best_deltas`, `spearman` (estimated vs test NLL), `estimated_nll_by_variant` and
    `best_delta_estimated_by_variant`. `log` gets one line per δ.
    """
    from modelsense.training.ensemble import train_ensemble

    d_max = float(deltas.max())
    weights = torch.tensor(d_max / deltas, dtype=torch.float32).unsqueeze(1).expand(len(deltas), data.n_train)
    res = train_ensemble(model_fn, data.x_train, data.y_train, weights.contiguous(),
                         replace(train_cfg, delta=d_max, eval_every=0),
                         seeds=torch.full((len(deltas),), train_cfg.seed, dtype=torch.long),
                         queries={"test": (data.x_test, data.y_test)}, return_params=True, progress=progress)
    test_nll = res.outputs["test"]["loss"].mean(1).tolist()
    by_variant: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with progress_bar(len(deltas), "posteriors over δ", enabled=progress) as bar:
        for m, delta in enumerate(deltas):
            module = model_fn(train_cfg.seed).to(train_cfg.device)
            module.load_state_dict({k: v[m] for k, v in res.params.items()}, strict=False)
            post = posterior_at(module.eval(), data.x_train, data.y_train, prior_precision=float(delta),
                                structure=structure, chunk_size=chunk_size)
            for v, r in loo_estimates(post, data.x_train, data.y_train, chunk_size, loo_damping)[2].items():
                by_variant[v].append(r.estimated_loo_nll)
            if log is not None:
                log(f"delta {delta:.4g}: estimated LOO NLL {by_variant[variant][-1]:.4f}, test NLL {test_nll[m]:.4f}")
            bar.advance(1)
    estimated = by_variant[variant]
    return {"deltas": deltas.tolist(), "estimated_nll": estimated, "test_nll": test_nll,
            "test_accuracy": res.outputs["test"]["correct"].float().mean(1).tolist(),
            **best_deltas(deltas, estimated, test_nll),
            "spearman": correlations(np.array(estimated), np.array(test_nll))["spearman"],
            "estimated_nll_by_variant": by_variant,
            "best_delta_estimated_by_variant": {v: best_deltas(deltas, e, test_nll)["best_delta_estimated"]
                                                for v, e in by_variant.items()}}


def validation_metrics(logits: Tensor, y: Tensor, V: Tensor, variants: dict[str, MPEResult], indices: Tensor,
                       loo_logits: Tensor, control_logits: Tensor, *, variant: str = "full",
                       reference: str = "control") -> tuple[dict[str, Any], np.ndarray]:
    """Estimated vs true softmax deviation of the retrained examples `indices` (Nickl et al. 2023, Fig. 2).

    The truth: ‖softmax(f_i^{\\i}) − softmax(r_i)‖₁ with f^{\\i} = `loo_logits` (M, C) of the models
    retrained without each example and r = `control_logits` (M, C) of the control retrained on all
    data (`reference` "control") or the trained model's `logits[indices]` ("trained"). The estimates:
    the sensitivities of `variants` (`all_variants` over all N: logits (N, C), V (N, C, C)).
    Returns the true deviations (M,) and the metrics: `pearson`, `spearman`, `slope` (`correlations`)
    of `variant`, `n_retrain`, `by_variant` (with `loo_nll`, the mean estimated LOO NLL of the
    retrained examples), `by_loo_damping` (the `loo` variant at each α of LOO_DAMPING_SWEEP),
    `mean_true_deviation`, `mean_estimated_deviation`, `true_loo_nll` and `estimated_loo_nll` over
    the retrained examples, `estimated_loo_nll_all` over all N, `mean_control_drift` (trained vs control).
    """
    idx = torch.as_tensor(indices)
    reference_logits = control_logits if reference == "control" else logits[idx]
    true = softmax_deviation(reference_logits, loo_logits).numpy()
    by_variant = {v: {**correlations(r.sensitivity[idx].numpy(), true), "loo_nll": float(r.loo_nll[idx].mean())}
                  for v, r in variants.items()}
    by_loo_damping = {str(a): correlations(memory_perturbation(logits[idx], y[idx], V[idx], MPESettings("loo", a))
                                           .sensitivity.numpy(), true) for a in LOO_DAMPING_SWEEP}
    chosen = variants[variant]
    return {**{k: by_variant[variant][k] for k in ("pearson", "spearman", "slope")}, "n_retrain": len(idx),
            "by_variant": by_variant, "by_loo_damping": by_loo_damping, "mean_true_deviation": float(true.mean()),
            "mean_estimated_deviation": float(chosen.sensitivity[idx].numpy().mean()),
            "true_loo_nll": float(per_example_nll(loo_logits, y[idx]).mean()),
            "estimated_loo_nll": by_variant[variant]["loo_nll"], "estimated_loo_nll_all": chosen.estimated_loo_nll,
            "mean_control_drift": float(softmax_deviation(logits[idx], control_logits).mean())}, true


def sensitivities_over_training(model_fn: Callable[[int], nn.Module], snapshots: Sequence[dict[str, Any]],
                                x: Tensor, y: Tensor, settings: MPESettings, *, source: str = "laplace",
                                prior_precision: float | None = None, structure: str = "kfac",
                                chunk_size: int = 500, mc_samples: int = 150, seed: int = 0, device: str = "cpu",
                                progress: bool = True) -> np.ndarray:
    """MPE sensitivities (K, N) at K snapshots of training (`training.recorder.OptimizerStateRecorder`;
    Nickl et al. 2023, Fig. 3b/11): at each, the posterior of `source` (`posterior_at`; ivon | adam
    read the snapshot's optimizer state) and the Monte-Carlo residual ē_i = mean_s softmax(f̃_s) − y_i,
    f̃_s ~ N(f_i, V_i) (`mc_prediction_error`, diagonal V for the `diag` variant; one generator seeded
    with `seed` across snapshots). The module is `model_fn(seed)` with the snapshot's parameters.
    """
    from modelsense.training.recorder import stand_in_optimizer

    gen = torch.Generator().manual_seed(seed)
    sens = []
    with progress_bar(len(snapshots), "sensitivities", enabled=progress) as bar:
        for snap in snapshots:
            module = model_fn(seed).to(device)
            module.load_state_dict(snap["params"], strict=False)
            opt = None if source == "laplace" else stand_in_optimizer(module, snap)
            post = posterior_at(module.eval(), x, y, source=source, prior_precision=prior_precision,
                                structure=structure, chunk_size=chunk_size, optimizer=opt)
            logits, V = predictive_covariances(post, x, chunk_size)
            err = mc_prediction_error(logits, y, V, mc_samples, diagonal=settings.variant == "diag", generator=gen)
            sens.append(memory_perturbation(logits, y, V, settings, error=err).sensitivity.numpy())
            bar.advance(1)
    return np.stack(sens)


def loco_metrics(estimates: dict[str, Any], tables: dict[str, np.ndarray]) -> dict[str, Any]:
    """Leave one class out (Nickl et al. 2023, Fig. 3a): `class_removal_estimates` against the models
    retrained without each class (`tables` of `retrain_without_in_store`, the control last).

    Returns lists over the classes: `classes`, `estimated_nll`, `estimated_nll_joint`, `true_test_nll`
    (the retrained models' mean test NLL), `true_test_accuracy`, `accuracy_drop` (control accuracy −
    retrained), `true_removed_train_nll` (the removed examples' mean NLL under the retrained model, what
    the estimates predict directly); `control_test_nll`, `control_test_accuracy`; `spearman` and
    `pearson` of the per-example estimate vs the true test NLL, `spearman_joint`, `spearman_removed`,
    `spearman_joint_removed`.
    """
    estimated, joint = estimates["estimated_nll"].numpy(), np.array(estimates["estimated_nll_joint"])
    true_nll = tables["test_loss"][:-1].mean(1).astype(np.float64)
    train_loss = tables["train_loss"][:-1]  # (classes, N)
    removed_nll = np.array([float(train_loss[m, r.numpy()].mean()) for m, r in enumerate(estimates["removed"])])
    true_acc = tables["test_correct"][:-1].astype(np.float64).mean(1)
    control_acc = float(tables["test_correct"][-1].mean())
    by_example = correlations(estimated, true_nll)
    return {"classes": estimates["classes"], "estimated_nll": estimated.tolist(), "estimated_nll_joint": joint.tolist(),
            "true_test_nll": true_nll.tolist(), "true_test_accuracy": true_acc.tolist(),
            "accuracy_drop": (control_acc - true_acc).tolist(),
            "control_test_nll": float(tables["test_loss"][-1].mean()), "control_test_accuracy": control_acc,
            "spearman": by_example["spearman"], "pearson": by_example["pearson"],
            "spearman_joint": correlations(joint, true_nll)["spearman"],
            "true_removed_train_nll": removed_nll.tolist(),
            "spearman_removed": correlations(estimated, removed_nll)["spearman"],
            "spearman_joint_removed": correlations(joint, removed_nll)["spearman"]}
