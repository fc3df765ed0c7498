"""`modelsense memorization`: held-out subsample estimates of memorization, influence, consistency.

Trains R models on random ρ-subsets as jobs of the ground-truth store (`modelsense.retraining.store`:
chunks of vmapped models, written atomically, resumable and extendable; shared with `lds` on the
same recipe), or reads existing runs (`--from-runs`, the released layout of Feldman & Zhang 2020),
then computes the Feldman & Zhang estimators with standard errors.

Run directory: config.json, store/ (the retrained models' tables, unless --store), memorization.npy,
memorization_se.npy, reliable.npy, heldout_accuracy.npy (C-score at ρ), influence_top_{indices,values}.npy
or influence.npy (memory-mapped, --influence full), metrics.json, figures/.

C-score curves (`--subset-ratios 0.1,0.2,...,0.9`, Jiang et al. 2021): one farm of `--n-models` per ratio,
all jobs of the one store (a run with more ratios, or `--subset-ratio ρ` / lds at a listed ratio with the
same recipe and --store, reuses them). Model r of every ratio has seed --seed + r and trains on the first
⌊ρN⌋ examples of one random permutation, so its subsets are nested across ratios; the C-score's standard
error is therefore the bound that holds for correlated ratios (`consistency(..., independent=False)`).
Memorization and influence are estimated at the listed ratio nearest --subset-ratio. Adds
consistency.npy / consistency_se.npy (N,), heldout_accuracy_by_ratio.npy (K, N), subset_ratios.npy (K,),
figures/consistency_curves.png (held-out accuracy against ratio for corrupted vs clean labels and for the
C-score quartiles), and in metrics.json subset_ratios, mean_consistency, heldout_accuracy_by_ratio,
consistency_curves and auc_corrupted_consistency (low C-score as a detector of corrupted labels).
`--from-runs` with several ratios writes the same (its ratios' runs are independent).

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
import torch

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError, DataError, ModelsenseError
from modelsense.experiments.command import Command, Prepared, execute
from modelsense.experiments.source import check_model
from modelsense.memorization import estimators as est
from modelsense.memorization.store import read_original_runs
from modelsense.models import ModelConfig
from modelsense.options import floats, joined, option
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


def estimate_and_save(
    run: RunDir,
    masks: np.ndarray,
    correct_train: np.ndarray,
    correct_test: np.ndarray,
    *,
    data: Dataset | None,
    influence: str = "topk",
    top_k: int = 10,
    influence_dtype: str = "float16",
    bootstrap: int = 0,
    extra_ratios: dict[float, tuple[np.ndarray, np.ndarray]] | None = None,
    independent_ratios: bool = True,
    min_held_out: int = est.MIN_HELD_OUT,
) -> dict[str, Any]:
    """Estimators from (R, N) masks and correctness tables; saves arrays and figures; returns metrics.

    Estimates of training examples with fewer than `min_held_out` models on a side are NaN, flagged
    False in reliable.npy, left out of top-k lists, figures and threshold counts, and counted in
    the metrics (`n_unreliable_train`, `n_unreliable_pairs`): see the module docstring.
    `extra_ratios` {ratio: (masks, correct)} adds the C-scores over those ratios (`save_consistency`).
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
    corrupted = None if data is None else data.metadata.get("corrupted_indices")
    if extra_ratios:
        metrics.update(save_consistency(run, extra_ratios, corrupted, independent=independent_ratios))
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
        metrics["n_high_influence_pairs"] = int(
            np.count_nonzero(np.nan_to_num(np.asarray(values, np.float32)) >= est.HIGH_INFLUENCE_THRESHOLD)
        )
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
            run.save_figure(
                plots.influence_pairs_figure(
                    data.x_train,
                    data.y_train,
                    data.x_test,
                    data.y_test,
                    infl,
                    n_influential=min(4, top_k),
                    class_names=names,
                ),
                "influence_pairs",
            )
    return metrics


def save_consistency(run: RunDir, by_ratio: dict[float, tuple[np.ndarray, np.ndarray]], corrupted: Any = None, *,
                     independent: bool = True, n_quantiles: int = 4) -> dict[str, Any]:
    """C-scores over the subset ratios of `by_ratio` {ratio: (masks (R_k, N), correct (R_k, N))} and
    their curves (held-out accuracy against ratio) per group of examples: corrupted vs clean labels
    (when `corrupted` lists some) and the `n_quantiles` C-score quantiles. Saves consistency.npy,
    consistency_se.npy, heldout_accuracy_by_ratio.npy (K, N), subset_ratios.npy (K,) and
    figures/consistency_curves.png; returns the metrics (see `est.consistency` for `independent`)."""
    from modelsense.memorization import plots

    cs = est.consistency(by_ratio, warn=False, independent=independent)
    ratios = sorted(cs.per_ratio)
    run.save_array("consistency", cs.score)
    run.save_array("consistency_se", cs.standard_error)
    run.save_array("heldout_accuracy_by_ratio", np.stack([cs.per_ratio[r].estimate for r in ratios]))
    run.save_array("subset_ratios", np.asarray(ratios))
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    metrics: dict[str, Any] = {"subset_ratios": ratios, "mean_consistency": float(np.nanmean(cs.score)),
                               "n_undefined_consistency": int(np.count_nonzero(np.isnan(cs.score)))}
    metrics["heldout_accuracy_by_ratio"] = [float(np.nanmean(cs.per_ratio[r].estimate)) for r in ratios]
    n = cs.score.shape[0]
    if corrupted is not None and len(corrupted):
        is_corrupted = np.zeros(n, dtype=bool)
        is_corrupted[np.asarray(corrupted, dtype=np.int64)] = True
        panels["corrupted vs clean labels"] = est.group_curves(cs.per_ratio, {"clean": ~is_corrupted,
                                                                              "corrupted": is_corrupted})
        defined = ~np.isnan(cs.score)
        if is_corrupted[defined].any() and not is_corrupted[defined].all():
            # a low C-score flags a corrupted label: the AUC of -C
            metrics["auc_corrupted_consistency"] = est.auc_corrupted(-cs.score, corrupted)
    panels["C-score quantiles"] = est.group_curves(cs.per_ratio, est.quantile_groups(cs.score, n_quantiles))
    metrics["consistency_curves"] = {f"{panel}: {group}": [None if np.isnan(v) else float(v) for v in mean]
                                     for panel, curves in panels.items() for group, (mean, _, _) in curves.items()}
    run.save_figure(plots.consistency_curves_figure(ratios, panels), "consistency_curves")
    return metrics


def main_ratio(ratios: Any, target: float) -> float:
    """The ratio of `ratios` nearest `target` (the larger on a tie): where memorization and influence are estimated."""
    return float(min(ratios, key=lambda r: (abs(float(r) - float(target)), -float(r))))


def check_ratios(ratios: Any) -> tuple[float, ...]:
    """--subset-ratios as distinct ratios in (0, 1), in increasing order."""
    out = tuple(sorted(float(r) for r in ratios))
    bad = [r for r in out if not 0.0 < r < 1.0]
    if bad:
        raise ConfigError(f"--subset-ratios must lie strictly between 0 and 1, got {', '.join(f'{r:g}' for r in bad)}")
    if len(set(out)) != len(out):
        raise ConfigError(f"--subset-ratios lists a ratio twice: {', '.join(f'{r:g}' for r in out)}")
    return out


@dataclass(frozen=True)
class MemorizationSpec:
    """`modelsense memorization`: a farm of `n_models` models, each trained on a random ρ-subset
    (`subset_ratio`) with the spec's recipe, or the existing runs of `from_runs`; and the estimators."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=80, lr=0.1, bs=32, delta=0.01))
    subset_ratio: float = option(0.7, "fraction ρ of the training set each model sees (with --subset-ratios: the "
                                      "ratio of the memorization and influence estimates, the nearest listed)")
    subset_ratios: tuple[float, ...] = option((), "comma-separated subset ratios, e.g. 0.1,0.2,...,0.9: a farm of "
                                                  "--n-models per ratio, C-scores (held-out accuracy averaged over "
                                                  "the ratios) and their curves", parse=floats, show=joined)
    n_models: int = option(64, "number of subset-trained models R (per ratio)")
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    from_runs: str | None = option(None, "estimate from existing runs <DIR>/<ratio>/<run>/aux_arrays.npz")
    influence: str = option("topk", "topk (per test example), full (memory-mapped matrix) or none")
    top_k: int = option(10, "influential training examples kept per test example")
    influence_dtype: str = option("float16", "float16 or float32 for --influence full")
    bootstrap: int = option(0, "bootstrap resamples for memorization intervals (0: none)")
    min_held_out: int = option(
        est.MIN_HELD_OUT,
        "fewest models that held an example out (and that trained on it) for "
        "its estimates to count; fewer: NaN, False in reliable.npy, left out of "
        "top-k and figures, counted as n_unreliable_train",
    )


def check_memorization(spec: MemorizationSpec) -> Prepared:
    if spec.influence not in INFLUENCE_MODES:
        raise ConfigError(f"--influence must be one of {INFLUENCE_MODES}, got {spec.influence!r}")
    data = load_dataset_from_config(spec.data)
    if spec.from_runs is not None and spec.subset_ratios:
        raise ConfigError("--subset-ratios trains farms, --from-runs reads existing runs (at the ratios they hold): "
                          "give one of them")
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
    ratios = check_ratios(spec.subset_ratios) if spec.subset_ratios else (float(spec.subset_ratio),)
    # model r of every ratio: seed seed + r and the first ⌊ρN⌋ of one permutation (nested subsets), so each
    # ratio's farm is the one `--subset-ratio ρ` (or lds at that ratio) trains: the store shares them
    jobs = {r: subset_jobs(data.n_train, r, range(spec.n_models), seed0=spec.train.seed) for r in ratios}
    config = {"dataset": data.summary()}
    if spec.subset_ratios:
        config.update(ratios=list(ratios), main_ratio=main_ratio(ratios, spec.subset_ratio))
    return Prepared(data, config, {"recipe": recipe, "jobs": jobs})


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
        metrics = estimate_and_save(
            run,
            main.masks,
            main.correct_train,
            main.correct_test,
            data=data,
            extra_ratios={r: (v.masks, v.correct_train) for r, v in by_ratio.items()},
            **options,
        )
        return {**metrics, "seconds": time.perf_counter() - start, "subset_ratio": ratio}
    jobs = prepared.extra["jobs"]
    tables = retrain(prepared.extra["recipe"], [j for r in jobs for j in jobs[r]], spec.retrain, run.path, data=data,
                     progress=progress, log=run.log)
    run.log(f"farm done: {len(jobs)} ratio(s) x {spec.n_models} models in {time.perf_counter() - start:.1f}s")
    by_ratio, at = {}, 0
    for r in jobs:  # the tables hold the jobs ratio after ratio
        sl = slice(at, at + len(jobs[r]))
        by_ratio[r] = (tables["masks"][sl], tables["train_correct"][sl], tables["test_correct"][sl])
        at += len(jobs[r])
    ratio = main_ratio(list(jobs), spec.subset_ratio)
    masks, train_correct, test_correct = by_ratio[ratio]
    extra = {r: (m, c) for r, (m, c, _) in by_ratio.items()} if spec.subset_ratios else None
    metrics = estimate_and_save(run, masks, train_correct, test_correct, data=data, extra_ratios=extra,
                                independent_ratios=False, **options)
    return {**metrics, "seconds": time.perf_counter() - start, "subset_ratio": ratio}


def memorization_summary(m: dict[str, Any]) -> str:
    shown = {k: m[k] for k in ("n_models", "subset_ratio", "mean_memorization", "n_high_memorization",
                               "n_unreliable_train", "auc_corrupted", "mean_consistency", "auc_corrupted_consistency")
             if k in m}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


MEMORIZATION = Command(
    "memorization", MemorizationSpec, check_memorization, run_memorization, summary=memorization_summary,
    keep=(STORE_DIR,), resume_keys=("data", "model", "train", "subset_ratio", "from_runs"),
    help="Memorization, influence and consistency scores from models trained on random subsets.")


# -- modelsense verify ---------------------------------------------------------------------------
CHECKPOINT_FORMATS = """Formats: --checkpoint is a model.pt of modelsense (`train`, `zoo`): a torch.save'd dict of
tensors and plain values {state_dict, model (the ModelConfig as a dict), input_shape, num_classes, dataset,
seed}, loaded with weights_only=True; its data recipe (the config.json beside it) is used. --weights is a plain
state_dict, torch.save(model.state_dict(), path), of the network --model (with its options, or a user's
file.py:factory) builds for --dataset; every key and shape must match. --aux is an aux_arrays.npz of the
released runs of Feldman & Zhang 2020: correctness_<split> (0/1 per example) with index_<split> (its example
indices); for --split train, correctness_train + correctness_removed at index_train + index_removed."""


class VerificationFailed(ModelsenseError):
    """A checkpoint did not reach the accuracy (or the recorded per-example correctness) it should."""


@dataclass(frozen=True)
class VerifySpec:
    """`modelsense verify`: restore a checkpoint, measure its accuracy on a split and check it against
    the expected accuracy (and, with `aux`, its per-example correctness against the recorded one), as
    the demo.py of Feldman & Zhang's released checkpoints does."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: str | None = option(None, "model.pt of `modelsense train` / `zoo` to verify (its data recipe is used)")
    weights: str | None = option(None, "a plain state_dict of --model, torch.save(model.state_dict(), path), to verify")
    split: str = option("test", "test or train: the examples the accuracy is measured on")
    expected_accuracy: float | None = option(None, "the accuracy the checkpoint must reach on --split (default: the "
                                                   "accuracy --aux recorded)")
    tolerance: float = option(0.005, "largest |accuracy - expected| that passes; with --aux also the largest fraction "
                                     "of examples whose correctness may differ from the recorded one")
    aux: str | None = option(None, "aux_arrays.npz of the released runs (Feldman & Zhang 2020): compare per-example "
                                   "correctness with correctness_<split> at index_<split>")
    batch_size: int = option(200, "evaluation batch size (the demo.py of Feldman & Zhang 2020: 200)", flag="--eval-bs")
    device: str = option("cpu", "where to evaluate (cpu, cuda, mps)")


def check_verify(spec: VerifySpec) -> Prepared:
    from modelsense.core.device import check_device
    from modelsense.experiments.source import check_checkpoint, load_weights_run
    from modelsense.memorization.store import SPLITS, read_recorded_correctness

    if (spec.checkpoint is None) == (spec.weights is None):
        raise ConfigError("verify needs one model: --checkpoint (a modelsense model.pt) or --weights (a state_dict of "
                          "--model), not " + ("both" if spec.checkpoint else "neither"))
    if spec.split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {spec.split!r}")
    if not (0.0 <= float(spec.tolerance) <= 1.0):
        raise ConfigError(f"--tolerance must lie in [0, 1] (a difference of accuracies), got {spec.tolerance}")
    if spec.expected_accuracy is not None and not 0.0 <= float(spec.expected_accuracy) <= 1.0:
        raise ConfigError(f"--expected-accuracy must lie in [0, 1], got {spec.expected_accuracy}")
    if spec.expected_accuracy is None and spec.aux is None:
        raise ConfigError("give --expected-accuracy A (the accuracy the checkpoint should reach on --split), or --aux "
                          "FILE (the correctness the run recorded)")
    if spec.batch_size < 1:
        raise ConfigError(f"--eval-bs must be >= 1, got {spec.batch_size}")
    check_device(spec.device)
    data = load_dataset_from_config(spec.data)
    trained = (check_checkpoint(spec.checkpoint, spec.data, data) if spec.checkpoint is not None
               else load_weights_run(spec.weights, spec.model, data))
    n = data.n_train if spec.split == "train" else data.n_test
    recorded = None
    if spec.aux is not None:
        recorded = read_recorded_correctness(spec.aux, spec.split)
        if recorded.size != n:
            raise DataError(f"--aux {spec.aux} records {recorded.size} {spec.split} examples, but --dataset "
                            f"{data.name} has {n}; pass the dataset (and --n-train / --data-dir) the run used")
    return Prepared(data, {"dataset": data.summary(), "source": trained.summary()},
                    {"trained": trained, "recorded": recorded})


def example_correctness(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 200,
                        device: str = "cpu") -> np.ndarray:
    """(n,) bool: argmax module(x_i) == y_i, in eval mode without gradients, `batch_size` examples at a time."""
    from modelsense.core.functional import chunks

    module = module.to(device).eval()
    out = []
    with torch.no_grad():
        for sl in chunks(len(x), batch_size):
            out.append((module(x[sl].to(device)).argmax(-1).cpu() == y[sl].cpu()).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def run_verify(spec: VerifySpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Accuracy (and per-example agreement with --aux) of the checkpoint; raises VerificationFailed,
    after writing metrics.json, when a check fails."""
    data, trained, recorded = prepared.data, prepared.extra["trained"], prepared.extra["recorded"]
    x, y = (data.x_train, data.y_train) if spec.split == "train" else (data.x_test, data.y_test)
    correct = example_correctness(trained.module, x, y, spec.batch_size, spec.device)
    run.save_array("correctness", correct)
    accuracy = float(correct.mean())
    expected = float(spec.expected_accuracy) if spec.expected_accuracy is not None else float(recorded.mean())
    metrics: dict[str, Any] = {"split": spec.split, "n_examples": int(correct.size), "accuracy": accuracy,
                               "expected_accuracy": expected, "difference": accuracy - expected,
                               "tolerance": float(spec.tolerance)}
    failures = []
    if abs(accuracy - expected) > spec.tolerance:
        failures.append(f"accuracy {accuracy:.4f} on {spec.split} differs from the expected {expected:.4f} by "
                        f"{abs(accuracy - expected):.4f} > --tolerance {spec.tolerance:g}")
    if recorded is not None:
        n_match = int(np.count_nonzero(correct == recorded))
        metrics.update(recorded_accuracy=float(recorded.mean()), n_match=n_match,
                       mismatch_fraction=1.0 - n_match / correct.size)
        run.log(f"{n_match} out of {correct.size} predictions match {spec.aux}")
        if metrics["mismatch_fraction"] > spec.tolerance:
            failures.append(f"{correct.size - n_match} of {correct.size} examples are classified otherwise than "
                            f"{spec.aux} records (a fraction {metrics['mismatch_fraction']:.4f} > --tolerance "
                            f"{spec.tolerance:g})")
    metrics["passed"] = not failures
    if failures:
        run.write_metrics(metrics)
        raise VerificationFailed(f"{trained.path} failed verification: {'; '.join(failures)}")
    return metrics


def verify_summary(m: dict[str, Any]) -> str:
    line = (f"passed: accuracy {m['accuracy']:.4f} on {m['split']} ({m['n_examples']} examples), expected "
            f"{m['expected_accuracy']:.4f} ± {m['tolerance']:g}")
    return line + (
        f"; {m['n_match']} of {m['n_examples']} predictions match the recorded ones" if "n_match" in m else ""
    )


VERIFY = Command("verify", VerifySpec, check_verify, run_verify, summary=verify_summary,
                 help="Restore a checkpoint and check its accuracy (and recorded per-example correctness) on a split. "
                      + CHECKPOINT_FORMATS.replace("\n", " "))


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


__all__ = ["CHECKPOINT_FORMATS", "MEMORIZATION", "VERIFY", "MemorizationSpec", "VerificationFailed", "VerifySpec",
           "check_min_held_out", "estimate_and_save", "example_correctness", "main_ratio", "memorization_section",
           "save_consistency"]
