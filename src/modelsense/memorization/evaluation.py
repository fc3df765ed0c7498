"""Every estimate of a farm of subset-trained models at once, as `modelsense memorization` reports them.

    evaluate_farm(masks, correct_train, correct_test, corrupted=...) -> FarmEstimates

`FarmEstimates.arrays` holds the tables (name -> array: memorization, memorization_se, reliable,
heldout_accuracy, influence_top_indices / influence_top_values, consistency, ...), `metrics` the
summary numbers, and the estimator results the figures are drawn from
(`modelsense.memorization.plots.farm_figures`).

Minimum number of models (`min_held_out`, default `MIN_HELD_OUT` = 3): a training example held out
by fewer models, or trained on by fewer, has no reported estimate: its memorization (and its
column of influence) is NaN, `reliable` is False there, it never appears in the top-k influence
lists (a row with fewer than k reliable examples ends with index -1 and value NaN), in the figures
or in the counts above the thresholds, and the metrics count it: `n_unreliable_train` (training
examples) and `n_unreliable_pairs` (test x train pairs left out of influence, n_unreliable_train x
n_test). `auc_corrupted` is computed over the reliable examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelsense.errors import ConfigError
from modelsense.memorization import estimators as est

#: --influence: top-k influential training examples per test example, the full matrix, or none
INFLUENCE_MODES = ("topk", "full", "none")


def check_farm_size(min_held_out: Any, n_models: int) -> int:
    """`min_held_out` as an int >= 1 that a farm of `n_models` can satisfy on both sides (n_models >= 2 x it)."""
    try:
        min_held_out = est.check_min_held_out(min_held_out)
    except ConfigError:
        raise ConfigError(f"--min-held-out must be a whole number of models >= 1, got {min_held_out!r}") from None
    if n_models < 2 * min_held_out:
        raise ConfigError(
            f"--min-held-out {min_held_out} needs at least {2 * min_held_out} models (that many on each side: trained "
            f"on an example and held it out), got {n_models}: every estimate would be NaN. Train more models "
            f"(with ρ = 0.7, 32 models leave about 0.1% of the examples below 3) or lower --min-held-out"
        )
    return min_held_out


def main_ratio(ratios: Iterable[float], target: float) -> float:
    """The ratio of `ratios` nearest `target` (the larger on a tie): where memorization and influence are estimated."""
    return float(min(ratios, key=lambda r: (abs(float(r) - float(target)), -float(r))))


def check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    """Subset ratios as distinct ratios, in increasing order (ConfigError naming --subset-ratios for a repeat)."""
    out = tuple(sorted(float(r) for r in ratios))
    if len(set(out)) != len(out):
        raise ConfigError(f"--subset-ratios lists a ratio twice: {', '.join(f'{r:g}' for r in out)}")
    return out


def _is_corrupted(n: int, corrupted: Any) -> np.ndarray | None:
    """(n,) bool of the listed corrupted examples, None when none are listed."""
    if corrupted is None or not len(corrupted):
        return None
    flags = np.zeros(n, dtype=bool)
    flags[np.asarray(corrupted, dtype=np.int64)] = True
    return flags


@dataclass
class FarmEstimates:
    """What `evaluate_farm` computed.

    Attributes:
        arrays: name -> array, the tables of the farm (see the module docstring).
        metrics: the summary numbers (JSON values).
        memorization: the `MemorizationEstimate`; influence: the `InfluenceEstimate` (None: not asked).
        convergence: (grid of numbers of models, memorization estimated from the first m models (len(grid), N)).
        consistency_curves: panel -> group -> (mean, se, n) over `ratios` (empty without several ratios).
        ratios: the subset ratios of the C-scores (empty without several ratios).
        notes: what the estimators warned about, for the run's log.
        corrupted: the indices of corrupted labels given (None: none).
    """

    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    memorization: est.MemorizationEstimate
    influence: est.InfluenceEstimate | None
    convergence: tuple[np.ndarray, np.ndarray]
    consistency_curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    corrupted: Any = None


def evaluate_farm(masks: np.ndarray, correct_train: np.ndarray, correct_test: np.ndarray, *, corrupted: Any = None,
                  influence: str = "topk", top_k: int = 10, influence_out: np.ndarray | None = None,
                  bootstrap: int = 0, min_held_out: int = est.MIN_HELD_OUT,
                  by_ratio: Mapping[float, tuple[np.ndarray, np.ndarray]] | None = None,
                  independent_ratios: bool = True) -> FarmEstimates:
    """Memorization, held-out accuracy (the C-score at ρ), influence and, given `by_ratio`, C-scores
    of a farm: masks (R, N) bool, correct_train (R, N), correct_test (R, n_test).

    influence: "topk" (the `top_k` most influential training examples per test example), "full"
    (written into `influence_out` (n_test, N), e.g. a memory map) or "none". corrupted: the indices
    of corrupted labels (for `auc_corrupted`). by_ratio: {ratio: (masks, correct_train)}, the farms
    of several subset ratios (`consistency_report`; `independent_ratios` as in `est.consistency`).
    """
    if influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {', '.join(INFLUENCE_MODES)}, received {influence!r}")
    min_held_out = check_farm_size(min_held_out, masks.shape[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", est.UndefinedEstimateWarning)
        mem = est.memorization(masks, correct_train, bootstrap=bootstrap, min_held_out=min_held_out)
    notes = [f"warning: {w.message}" for w in caught]
    arrays = {"memorization": mem.estimate, "memorization_se": mem.standard_error, "reliable": mem.reliable}
    if mem.interval is not None:
        arrays["memorization_interval"] = mem.interval
    arrays["heldout_accuracy"] = est.heldout_mean(masks, correct_train).estimate
    finite = np.isfinite(mem.estimate).any()
    metrics: dict[str, Any] = {
        "n_models": int(masks.shape[0]),
        "n_train": int(masks.shape[1]),
        "mean_memorization": float(np.nanmean(mem.estimate)) if finite else None,
        "n_high_memorization": len(est.high_memorization(mem.estimate)),
        "high_memorization_threshold": est.HIGH_MEMORIZATION_THRESHOLD,
        "n_undefined": mem.n_undefined,
        "min_held_out": min_held_out,
        "n_unreliable_train": mem.n_unreliable,
        "mean_standard_error": float(np.nanmean(mem.standard_error)) if finite else None,
        "mean_test_accuracy_of_models": float(np.mean(correct_test)) if correct_test.size else None,
    }
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    ratios: list[float] = []
    if by_ratio:
        c_arrays, c_metrics, curves = consistency_report(by_ratio, corrupted, independent=independent_ratios)
        arrays.update(c_arrays)
        metrics.update(c_metrics)
        ratios = c_metrics["subset_ratios"]
    flags = _is_corrupted(masks.shape[1], corrupted)
    if flags is not None:
        if flags[mem.reliable].any() and not flags[mem.reliable].all():
            metrics["auc_corrupted"] = est.auc_corrupted(mem.estimate, corrupted)  # NaN (unreliable) left out
        else:
            notes.append("auc_corrupted: not computed, the reliable examples are not both corrupted and clean")
    infl = None
    if influence != "none" and correct_test.shape[1]:
        if influence == "full":
            infl = est.influence(masks, correct_test, out=influence_out, warn=False, min_held_out=min_held_out)
        else:
            infl = est.influence(masks, correct_test, top_k=top_k, warn=False, min_held_out=min_held_out)
            arrays.update(influence_top_indices=infl.top_indices, influence_top_values=infl.top_values)
        values = infl.scores if infl.scores is not None else infl.top_values
        metrics["n_high_influence_pairs"] = int(
            np.count_nonzero(np.nan_to_num(np.asarray(values, np.float32)) >= est.HIGH_INFLUENCE_THRESHOLD)
        )
        metrics["high_influence_threshold"] = est.HIGH_INFLUENCE_THRESHOLD
        metrics["n_unreliable_pairs"] = infl.n_unreliable * int(correct_test.shape[1])
    # from 2 x min_held_out models on: with fewer no example has min_held_out models on both sides
    first = 2 * min_held_out
    grid = np.unique(np.linspace(first, masks.shape[0], num=min(12, masks.shape[0] - first + 1)).astype(int))
    by_models = est.memorization_by_number_of_models(masks, correct_train, grid, min_held_out=min_held_out)
    return FarmEstimates(arrays, metrics, mem, infl, (grid, by_models), curves, ratios, notes, corrupted)


def consistency_report(by_ratio: Mapping[float, tuple[np.ndarray, np.ndarray]], corrupted: Any = None, *,
                       independent: bool = True, n_quantiles: int = 4):
    """C-scores over the subset ratios of `by_ratio` {ratio: (masks (R_k, N), correct (R_k, N))} and their
    curves (held-out accuracy against ratio) per group of examples: corrupted vs clean labels (when
    `corrupted` lists some) and the `n_quantiles` C-score quantiles.

    Returns (arrays, metrics, curves): arrays consistency, consistency_se (N,), heldout_accuracy_by_ratio
    (K, N), subset_ratios (K,); metrics subset_ratios, mean_consistency, n_undefined_consistency,
    heldout_accuracy_by_ratio, consistency_curves ("<panel>: <group>" -> the mean curve) and
    auc_corrupted_consistency (a low C-score as a detector of corrupted labels); curves panel -> group ->
    (mean, se, n) (`est.group_curves`). `independent`: see `est.consistency`."""
    cs = est.consistency(by_ratio, warn=False, independent=independent)
    ratios = sorted(cs.per_ratio)
    arrays = {"consistency": cs.score, "consistency_se": cs.standard_error,
              "heldout_accuracy_by_ratio": np.stack([cs.per_ratio[r].estimate for r in ratios]),
              "subset_ratios": np.asarray(ratios)}
    metrics: dict[str, Any] = {"subset_ratios": ratios, "mean_consistency": float(np.nanmean(cs.score)),
                               "n_undefined_consistency": int(np.count_nonzero(np.isnan(cs.score))),
                               "heldout_accuracy_by_ratio": [float(np.nanmean(cs.per_ratio[r].estimate))
                                                             for r in ratios]}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    flags = _is_corrupted(cs.score.shape[0], corrupted)
    if flags is not None:
        curves["corrupted vs clean labels"] = est.group_curves(cs.per_ratio, {"clean": ~flags, "corrupted": flags})
        defined = ~np.isnan(cs.score)
        if flags[defined].any() and not flags[defined].all():
            metrics["auc_corrupted_consistency"] = est.auc_corrupted(-cs.score, corrupted)  # low C flags corruption
    curves["C-score quantiles"] = est.group_curves(cs.per_ratio, est.quantile_groups(cs.score, n_quantiles))
    metrics["consistency_curves"] = {f"{panel}: {group}": [None if np.isnan(v) else float(v) for v in mean]
                                     for panel, groups in curves.items() for group, (mean, _, _) in groups.items()}
    return arrays, metrics, curves


__all__ = ["INFLUENCE_MODES", "FarmEstimates", "check_farm_size", "check_ratios", "consistency_report",
           "evaluate_farm", "main_ratio"]
