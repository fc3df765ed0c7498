"""`modelsense memorization`: held-out subsample estimates of memorization, influence, consistency.

Trains R models on random ρ-subsets with the retraining farm (chunks of vmapped models, streamed to
the run directory, resumable, extendable), or reads existing runs (`--from-runs`, the original's
released layout), then computes the Feldman & Zhang estimators with standard errors.

Run directory: config.json, store.json + chunks/ (the farm's tables), memorization.npy,
memorization_se.npy, heldout_accuracy.npy (C-score at ρ), influence_top_{indices,values}.npy or
influence.npy (memory-mapped, --influence full), metrics.json, figures/.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.memorization import estimators as est
from modelsense.memorization import plots
from modelsense.memorization.store import CHUNK_DIR, STORE_FILE, read_original_runs
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.retraining import BACKENDS, FarmSpec, run_farm
from modelsense.runs import RunDir, finished_metrics, run_status
from modelsense.training.config import TrainConfig

INFLUENCE_MODES = ("topk", "full", "none")


def estimate_and_save(run: RunDir, masks: np.ndarray, correct_train: np.ndarray, correct_test: np.ndarray,
                      *, data: Dataset | None, influence: str = "topk", top_k: int = 10, influence_dtype: str = "float16",
                      bootstrap: int = 0, extra_ratios: dict[float, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Estimators from (R, N) masks and correctness tables; saves arrays and figures; returns metrics."""
    if influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {INFLUENCE_MODES}, got {influence!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", est.UndefinedEstimateWarning)
        mem = est.memorization(masks, correct_train, bootstrap=bootstrap)
    for w in caught:
        run.log(f"warning: {w.message}")
    run.save_array("memorization", mem.estimate)
    run.save_array("memorization_se", mem.standard_error)
    if mem.interval is not None:
        run.save_array("memorization_interval", mem.interval)
    held = est.heldout_mean(masks, correct_train)
    run.save_array("heldout_accuracy", held.estimate)
    finite = np.isfinite(mem.estimate)
    metrics: dict[str, Any] = {
        "n_models": int(masks.shape[0]),
        "n_train": int(masks.shape[1]),
        "mean_memorization": float(np.nanmean(mem.estimate)) if finite.any() else None,
        "n_high_memorization": int(len(est.high_memorization(mem.estimate))),
        "high_memorization_threshold": est.HIGH_MEMORIZATION_THRESHOLD,
        "n_undefined": mem.n_undefined,
        "mean_standard_error": float(np.nanmean(mem.standard_error)) if finite.any() else None,
        "mean_test_accuracy_of_models": float(np.mean(correct_test)) if correct_test.size else None,
    }
    if extra_ratios:
        cs = est.consistency(extra_ratios, warn=False)
        run.save_array("consistency", cs.score)
        run.save_array("consistency_se", cs.standard_error)
        metrics["subset_ratios"] = sorted(float(r) for r in extra_ratios)
        metrics["mean_consistency"] = float(np.nanmean(cs.score))
    if data is not None and data.metadata.get("corrupted_indices") is not None and len(data.metadata["corrupted_indices"]):
        metrics["auc_corrupted"] = est.auc_corrupted(np.nan_to_num(mem.estimate, nan=0.0), data.metadata["corrupted_indices"])
    infl = None
    if influence != "none" and correct_test.shape[1]:
        if influence == "full":
            with run.memmap("influence", (correct_test.shape[1], masks.shape[1]), np.dtype(influence_dtype)) as out:
                infl = est.influence(masks, correct_test, out=out, warn=False)
        else:
            infl = est.influence(masks, correct_test, top_k=top_k, warn=False)
            run.save_array("influence_top_indices", infl.top_indices)
            run.save_array("influence_top_values", infl.top_values)
        values = infl.scores if infl.scores is not None else infl.top_values
        metrics["n_high_influence_pairs"] = int(np.count_nonzero(np.nan_to_num(np.asarray(values, np.float32)) >= est.HIGH_INFLUENCE_THRESHOLD))
        metrics["high_influence_threshold"] = est.HIGH_INFLUENCE_THRESHOLD
    # figures
    corrupted = None if data is None else data.metadata.get("corrupted_indices")
    run.save_figure(plots.memorization_histogram(mem.estimate, corrupted=corrupted), "memorization_histogram")
    grid = np.unique(np.linspace(2, masks.shape[0], num=min(12, masks.shape[0] - 1)).astype(int))
    run.save_figure(plots.memorization_convergence_figure(grid, est.memorization_by_number_of_models(masks, correct_train, grid)),
                    "memorization_convergence")
    if data is not None:
        names = data.metadata.get("class_names")
        run.save_figure(plots.most_memorized_figure(data.x_train, data.y_train, mem.estimate, class_names=names),
                        "most_memorized")
        if infl is not None:
            run.save_figure(plots.influence_pairs_figure(data.x_train, data.y_train, data.x_test, data.y_test, infl,
                                                         class_names=names), "influence_pairs")
    return metrics


def run_memorization(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *,
                     subset_ratio: float = 0.7, n_models: int = 64, chunk_size: int = 32, backend: str = "local",
                     address: str | None = None, resume: bool = False, influence: str = "topk", top_k: int = 10,
                     influence_dtype: str = "float16", bootstrap: int = 0, progress: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
    """Train (or continue) the subset farm in `out` and write the estimates (see module docstring)."""
    spec = FarmSpec(data_cfg, model_cfg, train_cfg, subset_ratio, seed0=train_cfg.seed)
    if influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {INFLUENCE_MODES}, got {influence!r}")
    if n_models < 2:
        raise ConfigError(f"--n-models must be >= 2, got {n_models}")
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {chunk_size}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}; choose {' or '.join(BACKENDS)}")
    data = load_dataset_from_config(data_cfg)
    build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=0)  # validates the model options
    config = {**spec.to_dict(), "seed": train_cfg.seed, "dataset": data.summary(), "n_models": n_models,
              "chunk_size": chunk_size, "backend": backend}
    with RunDir.open(out, "memorization", config, resume=resume, overwrite=overwrite, keep=(CHUNK_DIR, STORE_FILE),
                     resume_keys=["data", "model", "train", "subset_ratio", "seed0"]) as run:
        start = time.perf_counter()
        store = run_farm(spec, out, n_models, chunk_size, backend=backend, address=address, data=data, progress=progress)
        runs = store.load_all()
        keep = runs.model_ids < n_models
        run.log(f"farm done: {int(keep.sum())} models in {time.perf_counter() - start:.1f}s")
        metrics = estimate_and_save(run, runs.masks[keep], runs.correct_train[keep], runs.correct_test[keep], data=data,
                                    influence=influence, top_k=top_k, influence_dtype=influence_dtype, bootstrap=bootstrap)
        metrics["seconds"] = time.perf_counter() - start
        metrics["subset_ratio"] = subset_ratio
        run.write_metrics(metrics)
        return metrics


def run_from_runs(root: str | Path, out: str | Path, *, data: Dataset | None = None, influence: str = "topk",
                  top_k: int = 10, influence_dtype: str = "float16", bootstrap: int = 0,
                  overwrite: bool = False) -> dict[str, Any]:
    """Estimators from existing subset-trained runs `<root>/<ratio>/<run_id>/aux_arrays.npz`.

    Memorization and influence use the ratio closest to 0.7 (the papers'); consistency scores use
    every ratio found. `data` (the runs' dataset) is used for example images and corrupted-label
    AUC only when its sizes match the runs.
    """
    by_ratio = read_original_runs(root)
    if influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {INFLUENCE_MODES}, got {influence!r}")
    ratio = min(by_ratio, key=lambda r: abs(r - 0.7))
    main = by_ratio[ratio]
    config = {"from_runs": str(root), "ratios": sorted(by_ratio), "main_ratio": ratio,
              "n_runs": {str(r): len(v.run_ids) for r, v in by_ratio.items()},
              "dataset": None if data is None else data.summary()}
    with RunDir.open(out, "memorization", config, overwrite=overwrite) as run:
        if data is not None and (data.n_train, data.n_test) != (main.masks.shape[1], main.correct_test.shape[1]):
            run.log(f"dataset {data.name} has {data.n_train}/{data.n_test} examples, the runs {main.masks.shape[1]}/"
                    f"{main.correct_test.shape[1]}: no example images (give the runs' --dataset and --data-dir)")
            data = None
        metrics = estimate_and_save(run, main.masks, main.correct_train, main.correct_test, data=data, influence=influence,
                                    top_k=top_k, influence_dtype=influence_dtype, bootstrap=bootstrap,
                                    extra_ratios={r: (v.masks, v.correct_train) for r, v in by_ratio.items()})
        metrics["subset_ratio"] = ratio
        run.write_metrics(metrics)
        return metrics


def memorization_section(out: Path, progress: bool, resume: bool = False) -> "Section":  # noqa: F821
    """Demo: memorization on digits with 10% label noise, a small farm (an unfinished one continues)."""
    from modelsense.experiments.report import Section

    run = out / "memorization"
    metrics = (resume and finished_metrics(run)) or run_memorization(
        DataConfig("digits", corruption_ratio=0.1), ModelConfig("mlp"), TrainConfig(epochs=60, bs=32, lr=0.1, delta=0.01),
        run, n_models=32, chunk_size=32, resume=resume and run_status(run) is not None, progress=progress)
    return Section(
        "Memorization: 32 models on random 70% subsets of digits with 10% label noise",
        "mem(i) = P[correct on i | i in training subset] − P[correct on i | i held out], estimated from "
        "the farm (Feldman & Zhang 2020). Corrupted labels should be the most memorized.",
        {k: metrics[k] for k in ("n_models", "mean_memorization", "n_high_memorization", "auc_corrupted", "seconds") if k in metrics},
        [run / "figures" / "memorization_histogram.png", run / "figures" / "most_memorized.png"],
        str(run),
    )


__all__ = ["run_memorization", "run_from_runs", "estimate_and_save", "memorization_section"]
