"""`modelsense memorization`: held-out subsample estimates of memorization, influence, consistency.

Trains R models on random ρ-subsets as jobs of the ground-truth store (`modelsense.retraining.store`:
chunks of vmapped models, written atomically, resumable and extendable; shared with `lds` on the
same recipe), or reads existing runs (`--from-runs`, the released layout of Feldman & Zhang 2020),
then computes the Feldman & Zhang estimators with standard errors.

Run directory: config.json, store/ (the retrained models' tables, unless --store), memorization.npy,
memorization_se.npy, reliable.npy, heldout_accuracy.npy (C-score at ρ), influence_top_{indices,values}.npy
or influence.npy (memory-mapped, --influence full), metrics.json, figures/.

Minimum number of models (`min_held_out`, `--min-held-out`, default `MIN_HELD_OUT` = 3): a training
example held out by fewer models, or trained on by fewer, has no reported estimate. Its entry in
memorization.npy / memorization_se.npy (and its column of influence.npy) is NaN, `reliable.npy`
((N,) bool) is False there, it never appears in influence_top_indices.npy (a row with fewer than k
reliable examples ends with index -1 and value NaN), in the most-memorized and influence-pairs
figures or in the counts above the thresholds, and metrics.json counts it: `n_unreliable_train`
(training examples) and `n_unreliable_pairs` (test x train pairs left out of influence,
n_unreliable_train x n_test). `auc_corrupted` is computed over the reliable examples.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute
from modelsense.experiments.source import check_model
from modelsense.memorization import estimators as est
from modelsense.memorization.store import read_original_runs
from modelsense.models import ModelConfig
from modelsense.options import option
from modelsense.retraining.store import STORE_DIR, RetrainOptions, RetrainRecipe, retrain, subset_jobs
from modelsense.runs import RunDir, finished_metrics, run_status
from modelsense.training.config import TrainConfig

INFLUENCE_MODES = ("topk", "full", "none")


def check_min_held_out(min_held_out: int, n_models: int) -> int:
    """--min-held-out as an int >= 1 that `n_models` can satisfy on both sides (n_models >= 2 x it)."""
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


def estimate_and_save(run: RunDir, masks: np.ndarray, correct_train: np.ndarray, correct_test: np.ndarray,
                      *, data: Dataset | None, influence: str = "topk", top_k: int = 10, influence_dtype: str = "float16",
                      bootstrap: int = 0, extra_ratios: dict[float, tuple[np.ndarray, np.ndarray]] | None = None,
                      min_held_out: int = est.MIN_HELD_OUT) -> dict[str, Any]:
    """Estimators from (R, N) masks and correctness tables; saves arrays and figures; returns metrics.

    Estimates of training examples with fewer than `min_held_out` models on a side are NaN, flagged
    False in reliable.npy, left out of top-k lists, figures and threshold counts, and counted in
    the metrics (`n_unreliable_train`, `n_unreliable_pairs`): see the module docstring.
    """
    from modelsense.memorization import plots

    if influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {INFLUENCE_MODES}, got {influence!r}")
    min_held_out = check_min_held_out(min_held_out, masks.shape[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", est.UndefinedEstimateWarning)
        mem = est.memorization(masks, correct_train, bootstrap=bootstrap, min_held_out=min_held_out)
    for w in caught:
        run.log(f"warning: {w.message}")
    run.save_array("memorization", mem.estimate)
    run.save_array("memorization_se", mem.standard_error)
    run.save_array("reliable", mem.reliable)
    if mem.interval is not None:
        run.save_array("memorization_interval", mem.interval)
    held = est.heldout_mean(masks, correct_train)
    run.save_array("heldout_accuracy", held.estimate)
    finite = np.isfinite(mem.estimate)
    metrics: dict[str, Any] = {
        "n_models": int(masks.shape[0]),
        "n_train": int(masks.shape[1]),
        "mean_memorization": float(np.nanmean(mem.estimate)) if finite.any() else None,
        "n_high_memorization": len(est.high_memorization(mem.estimate)),
        "high_memorization_threshold": est.HIGH_MEMORIZATION_THRESHOLD,
        "n_undefined": mem.n_undefined,
        "min_held_out": min_held_out,
        "n_unreliable_train": mem.n_unreliable,
        "mean_standard_error": float(np.nanmean(mem.standard_error)) if finite.any() else None,
        "mean_test_accuracy_of_models": float(np.mean(correct_test)) if correct_test.size else None,
    }
    if extra_ratios:
        cs = est.consistency(extra_ratios, warn=False)
        run.save_array("consistency", cs.score)
        run.save_array("consistency_se", cs.standard_error)
        metrics["subset_ratios"] = sorted(float(r) for r in extra_ratios)
        metrics["mean_consistency"] = float(np.nanmean(cs.score))
    corrupted = None if data is None else data.metadata.get("corrupted_indices")
    if corrupted is not None and len(corrupted):
        is_corrupted = np.zeros(masks.shape[1], dtype=bool)
        is_corrupted[np.asarray(corrupted, dtype=np.int64)] = True
        reliable = mem.reliable
        if is_corrupted[reliable].any() and not is_corrupted[reliable].all():
            metrics["auc_corrupted"] = est.auc_corrupted(mem.estimate, corrupted)  # NaN (unreliable) left out
        else:
            run.log("auc_corrupted: not computed, the reliable examples are not both corrupted and clean")
    infl = None
    if influence != "none" and correct_test.shape[1]:
        if influence == "full":
            with run.memmap("influence", (correct_test.shape[1], masks.shape[1]), np.dtype(influence_dtype)) as out:
                infl = est.influence(masks, correct_test, out=out, warn=False, min_held_out=min_held_out)
        else:
            infl = est.influence(masks, correct_test, top_k=top_k, warn=False, min_held_out=min_held_out)
            run.save_array("influence_top_indices", infl.top_indices)
            run.save_array("influence_top_values", infl.top_values)
        values = infl.scores if infl.scores is not None else infl.top_values
        metrics["n_high_influence_pairs"] = int(np.count_nonzero(np.nan_to_num(np.asarray(values, np.float32)) >= est.HIGH_INFLUENCE_THRESHOLD))
        metrics["high_influence_threshold"] = est.HIGH_INFLUENCE_THRESHOLD
        metrics["n_unreliable_pairs"] = infl.n_unreliable * int(correct_test.shape[1])
    # figures
    run.save_figure(plots.memorization_histogram(mem.estimate, corrupted=corrupted), "memorization_histogram")
    # from 2 x min_held_out models on: with fewer no example has min_held_out models on both sides
    first = 2 * min_held_out
    grid = np.unique(np.linspace(first, masks.shape[0], num=min(12, masks.shape[0] - first + 1)).astype(int))
    by_models = est.memorization_by_number_of_models(masks, correct_train, grid, min_held_out=min_held_out)
    run.save_figure(plots.memorization_convergence_figure(grid, by_models), "memorization_convergence")
    if data is not None:
        names = data.metadata.get("class_names")
        run.save_figure(plots.most_memorized_figure(data.x_train, data.y_train, mem.estimate, class_names=names),
                        "most_memorized")
        if infl is not None:
            run.save_figure(plots.influence_pairs_figure(data.x_train, data.y_train, data.x_test, data.y_test, infl,
                                                         n_influential=min(4, top_k), class_names=names), "influence_pairs")
    return metrics


@dataclass(frozen=True)
class MemorizationSpec:
    """`modelsense memorization`: a farm of `n_models` models, each trained on a random ρ-subset
    (`subset_ratio`) with the spec's recipe, or the existing runs of `from_runs`; and the estimators."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=80, lr=0.1, bs=32, delta=0.01))
    subset_ratio: float = option(0.7, "fraction ρ of the training set each model sees")
    n_models: int = option(64, "number of subset-trained models R")
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    from_runs: str | None = option(None, "estimate from existing runs <DIR>/<ratio>/<run>/aux_arrays.npz")
    influence: str = option("topk", "topk (per test example), full (memory-mapped matrix) or none")
    top_k: int = option(10, "influential training examples kept per test example")
    influence_dtype: str = option("float16", "float16 or float32 for --influence full")
    bootstrap: int = option(0, "bootstrap resamples for memorization intervals (0: none)")
    min_held_out: int = option(est.MIN_HELD_OUT, "fewest models that held an example out (and that trained on it) for "
                                                 "its estimates to count; fewer: NaN, False in reliable.npy, left out of "
                                                 "top-k and figures, counted as n_unreliable_train")


def check_memorization(spec: MemorizationSpec) -> Prepared:
    if spec.influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {INFLUENCE_MODES}, got {spec.influence!r}")
    data = load_dataset_from_config(spec.data)
    if spec.from_runs is not None:
        by_ratio = read_original_runs(spec.from_runs)
        ratio = min(by_ratio, key=lambda r: abs(r - 0.7))
        check_min_held_out(spec.min_held_out, by_ratio[ratio].masks.shape[0])
        return Prepared(data, {"dataset": data.summary(), "ratios": sorted(by_ratio), "main_ratio": ratio,
                               "n_runs": {str(r): len(v.run_ids) for r, v in by_ratio.items()}},
                        {"by_ratio": by_ratio, "ratio": ratio})
    if not 0.0 < float(spec.subset_ratio) < 1.0:
        raise ConfigError(f"--subset-ratio must lie strictly between 0 and 1 (Feldman & Zhang 2020 use 0.7), got "
                          f"{spec.subset_ratio}")
    if spec.n_models < 2:
        raise ConfigError(f"--n-models must be >= 2, got {spec.n_models}")
    check_min_held_out(spec.min_held_out, spec.n_models)
    check_model(data, spec.model)
    recipe = RetrainRecipe(spec.data, spec.model, spec.train)
    jobs = subset_jobs(data.n_train, spec.subset_ratio, range(spec.n_models), seed0=spec.train.seed)
    return Prepared(data, {"dataset": data.summary()}, {"recipe": recipe, "jobs": jobs})


def run_memorization(spec: MemorizationSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train (or continue) the farm in the run and write the estimates; or estimate from `from_runs`.

    From existing runs `<from_runs>/<ratio>/<run_id>/aux_arrays.npz`: memorization and influence use
    the ratio closest to 0.7 (the ratio of Feldman & Zhang 2020), consistency scores every ratio
    found; the dataset gives example images and the corrupted-label AUC only when its sizes match the runs.
    """
    data = prepared.data
    options = {"influence": spec.influence, "top_k": spec.top_k, "influence_dtype": spec.influence_dtype,
               "bootstrap": spec.bootstrap, "min_held_out": spec.min_held_out}
    start = time.perf_counter()
    if spec.from_runs is not None:
        by_ratio, ratio = prepared.extra["by_ratio"], prepared.extra["ratio"]
        main = by_ratio[ratio]
        if (data.n_train, data.n_test) != (main.masks.shape[1], main.correct_test.shape[1]):
            run.log(f"dataset {data.name} has {data.n_train}/{data.n_test} examples, the runs {main.masks.shape[1]}/"
                    f"{main.correct_test.shape[1]}: no example images (give the runs' --dataset and --data-dir)")
            data = None
        metrics = estimate_and_save(run, main.masks, main.correct_train, main.correct_test, data=data,
                                    extra_ratios={r: (v.masks, v.correct_train) for r, v in by_ratio.items()}, **options)
        return {**metrics, "seconds": time.perf_counter() - start, "subset_ratio": ratio}
    tables = retrain(prepared.extra["recipe"], prepared.extra["jobs"], spec.retrain, run.path, data=data,
                     progress=progress, log=run.log)
    run.log(f"farm done: {spec.n_models} models in {time.perf_counter() - start:.1f}s")
    metrics = estimate_and_save(run, tables["masks"], tables["train_correct"], tables["test_correct"], data=data,
                                **options)
    return {**metrics, "seconds": time.perf_counter() - start, "subset_ratio": spec.subset_ratio}


def memorization_summary(m: dict[str, Any]) -> str:
    shown = {k: m[k] for k in ("n_models", "mean_memorization", "n_high_memorization", "n_unreliable_train",
                               "auc_corrupted") if k in m}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


MEMORIZATION = Command(
    "memorization", MemorizationSpec, check_memorization, run_memorization, summary=memorization_summary,
    keep=(STORE_DIR,), resume_keys=("data", "model", "train", "subset_ratio", "from_runs"),
    help="Memorization, influence and consistency scores from models trained on random subsets.")


def memorization_section(out: Path, progress: bool, resume: bool = False) -> Section:  # noqa: F821
    """Demo: memorization on digits with 10% label noise, a small farm (an unfinished one continues)."""
    from modelsense.experiments.report import Section

    run = out / "memorization"
    spec = MemorizationSpec(DataConfig("digits", corruption_ratio=0.1), ModelConfig("mlp"),
                            TrainConfig(epochs=60, bs=32, lr=0.1, delta=0.01), n_models=32)
    go_on = resume and run_status(run) is not None
    metrics = (resume and finished_metrics(run)) or execute(MEMORIZATION, spec, run, resume=go_on, overwrite=not go_on,
                                                            progress=progress)
    return Section(
        "Memorization: 32 models on random 70% subsets of digits with 10% label noise",
        "mem(i) = P[correct on i | i in training subset] − P[correct on i | i held out], estimated from "
        "the farm (Feldman & Zhang 2020). Corrupted labels should be the most memorized.",
        {k: metrics[k] for k in ("n_models", "mean_memorization", "n_high_memorization", "n_unreliable_train",
                                 "auc_corrupted", "seconds") if k in metrics},
        [run / "figures" / "memorization_histogram.png", run / "figures" / "most_memorized.png"],
        str(run),
    )


__all__ = ["MEMORIZATION", "MemorizationSpec", "check_min_held_out", "estimate_and_save", "memorization_section"]
