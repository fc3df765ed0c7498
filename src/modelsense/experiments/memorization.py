"""`modelsense memorization`: held-out subsample estimates of memorization, influence, consistency;
`modelsense verify`: restore a checkpoint and check its accuracy.

Trains R models on random ρ-subsets as jobs of the ground-truth store (`modelsense.retraining.store`:
resumable, extendable, shared with `lds` on the same recipe), or reads existing runs (`--from-runs`, the
released layout of Feldman & Zhang 2020), then computes the Feldman & Zhang estimators with standard
errors (`modelsense.memorization.evaluation`, which says how examples held out by fewer than
--min-held-out models are left out). Run directory: config.json, store/ (unless --store), the arrays of
`FarmEstimates` as .npy (memorization, memorization_se, reliable, heldout_accuracy (the C-score at ρ),
influence_top_{indices,values} or influence (memory-mapped, --influence full), ...), metrics.json, figures/.

C-score curves (`--subset-ratios 0.1,0.2,...,0.9`, Jiang et al. 2021): one farm of `--n-models` per ratio in
the one store. Model r of every ratio has seed --seed + r and trains on the first ⌊ρN⌋ examples of one random
permutation, so its subsets are nested across ratios and the C-score's standard error is the bound that holds
for correlated ratios (`consistency(..., independent=False)`; `--from-runs` ratios are independent).
Memorization and influence are estimated at the listed ratio nearest --subset-ratio. Adds consistency.npy,
consistency_se.npy, heldout_accuracy_by_ratio.npy, subset_ratios.npy, figures/consistency_curves.png and the
metrics of `evaluation.consistency_report`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError, DataError
from modelsense.experiments.command import Command, Prepared, execute_or_reuse
from modelsense.experiments.source import check_model
from modelsense.memorization.estimators import MIN_HELD_OUT
from modelsense.memorization.evaluation import INFLUENCE_MODES, check_farm_size, check_ratios, evaluate_farm, main_ratio
from modelsense.memorization.store import SPLITS, read_original_runs
from modelsense.memorization.verify import VerificationFailed
from modelsense.models import ModelConfig
from modelsense.options import check_fields, floats, joined, option
from modelsense.retraining.store import STORE_DIR, RetrainOptions, RetrainRecipe, retrain, subset_jobs
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig


def estimate_and_save(run: RunDir, masks: np.ndarray, correct_train: np.ndarray, correct_test: np.ndarray, *,
                      data: Dataset | None, influence: str = "topk", top_k: int = 10, influence_dtype: str = "float16",
                      **options: Any) -> dict[str, Any]:
    """`evaluate_farm` of (R, N) masks and correctness tables (`options`: bootstrap, min_held_out, by_ratio,
    independent_ratios), its arrays and figures written into `run`; returns the metrics."""
    from modelsense.memorization import plots

    corrupted = None if data is None else data.metadata.get("corrupted_indices")
    full = influence == "full" and correct_test.shape[1]
    shape = (correct_test.shape[1], masks.shape[1])
    with run.memmap("influence", shape, np.dtype(influence_dtype)) if full else contextlib.nullcontext() as out:
        farm = evaluate_farm(masks, correct_train, correct_test, corrupted=corrupted, influence=influence,
                             top_k=top_k, influence_out=out, **options)
    for note in farm.notes:
        run.log(note)
    for name, array in farm.arrays.items():
        run.save_array(name, array)
    for name, figure in plots.farm_figures(farm, data, top_k=top_k).items():
        run.save_figure(figure, name)
    return farm.metrics


@dataclass(frozen=True)
class MemorizationSpec:
    """`modelsense memorization`: a farm of `n_models` models, each trained on a random ρ-subset
    (`subset_ratio`) with the spec's recipe, or the existing runs of `from_runs`; and the estimators."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=80, lr=0.1, bs=32, delta=0.01))
    subset_ratio: float = option(0.7, "fraction ρ of the training set each model sees (with --subset-ratios: the "
                                      "ratio of the memorization and influence estimates, the nearest listed)",
                                 above=0.0, below=1.0)
    subset_ratios: tuple[float, ...] = option((), "comma-separated subset ratios, e.g. 0.1,0.2,...,0.9: a farm of "
                                                  "--n-models per ratio, C-scores (held-out accuracy averaged over "
                                                  "the ratios) and their curves", parse=floats, show=joined,
                                              above=0.0, below=1.0)
    n_models: int = option(64, "number of subset-trained models R (per ratio)", low=2)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    from_runs: str | None = option(None, "estimate from existing runs <DIR>/<ratio>/<run>/aux_arrays.npz")
    influence: str = option("topk", "topk (per test example), full (memory-mapped matrix) or none",
                            choices=INFLUENCE_MODES)
    top_k: int = option(10, "influential training examples kept per test example", low=1)
    influence_dtype: str = option("float16", "float16 or float32 for --influence full", choices=("float16", "float32"))
    bootstrap: int = option(0, "bootstrap resamples for memorization intervals (0: none)", low=0)
    min_held_out: int = option(
        MIN_HELD_OUT,
        "fewest models that held an example out (and that trained on it) for "
        "its estimates to count; fewer: NaN, False in reliable.npy, left out of "
        "top-k and figures, counted as n_unreliable_train",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.from_runs is not None and self.subset_ratios:
            raise ConfigError("--subset-ratios trains farms, --from-runs reads existing runs (at the ratios they "
                              "hold): give one of them")


def check_memorization(spec: MemorizationSpec) -> Prepared:
    data = load_dataset_from_config(spec.data)
    if spec.from_runs is not None:
        by_ratio = read_original_runs(spec.from_runs)
        ratio = min(by_ratio, key=lambda r: abs(r - 0.7))
        check_farm_size(spec.min_held_out, by_ratio[ratio].masks.shape[0])
        return Prepared(data, {"dataset": data.summary(), "ratios": sorted(by_ratio), "main_ratio": ratio,
                               "n_runs": {str(r): len(v.run_ids) for r, v in by_ratio.items()}},
                        {"by_ratio": by_ratio, "ratio": ratio})
    check_farm_size(spec.min_held_out, spec.n_models)
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
    data, start = prepared.data, time.perf_counter()
    if spec.from_runs is not None:
        runs, ratio = prepared.extra["by_ratio"], prepared.extra["ratio"]
        by_ratio, correct_test = {r: (v.masks, v.correct_train) for r, v in runs.items()}, runs[ratio].correct_test
        if (data.n_train, data.n_test) != (runs[ratio].masks.shape[1], correct_test.shape[1]):
            run.log(f"dataset {data.name} has {data.n_train}/{data.n_test} examples, the runs "
                    f"{runs[ratio].masks.shape[1]}/{correct_test.shape[1]}: no example images (give the runs' "
                    "--dataset and --data-dir)")
            data = None
    else:
        jobs = prepared.extra["jobs"]
        tables = retrain(prepared.extra["recipe"], [j for r in jobs for j in jobs[r]], spec.retrain, run.path,
                         data=data, progress=progress, log=run.log)
        run.log(f"farm done: {len(jobs)} ratio(s) x {spec.n_models} models in {time.perf_counter() - start:.1f}s")
        # the tables hold the jobs ratio after ratio, n_models each
        rows = {r: slice(k * spec.n_models, (k + 1) * spec.n_models) for k, r in enumerate(jobs)}
        by_ratio = {r: (tables["masks"][sl], tables["train_correct"][sl]) for r, sl in rows.items()}
        ratio = main_ratio(jobs, spec.subset_ratio)
        correct_test = tables["test_correct"][rows[ratio]]
    metrics = estimate_and_save(run, *by_ratio[ratio], correct_test, data=data, influence=spec.influence,
                                top_k=spec.top_k, influence_dtype=spec.influence_dtype, bootstrap=spec.bootstrap,
                                min_held_out=spec.min_held_out,
                                by_ratio=by_ratio if spec.from_runs or spec.subset_ratios else None,
                                independent_ratios=spec.from_runs is not None)
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


@dataclass(frozen=True)
class VerifySpec:
    """`modelsense verify`: restore a checkpoint, measure its accuracy on a split and check it against
    the expected accuracy (and, with `aux`, its per-example correctness against the recorded one), as
    the demo.py of Feldman & Zhang's released checkpoints does."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: str | None = option(None, "model.pt of `modelsense train` / `zoo` to verify (its data recipe is used)")
    weights: str | None = option(None, "a plain state_dict of --model, torch.save(model.state_dict(), path), to verify")
    split: str = option("test", "test or train: the examples the accuracy is measured on", choices=SPLITS)
    expected_accuracy: float | None = option(None, "the accuracy the checkpoint must reach on --split (default: the "
                                                   "accuracy --aux recorded)", low=0.0, high=1.0)
    tolerance: float = option(0.005, "largest |accuracy - expected| that passes; with --aux also the largest fraction "
                                     "of examples whose correctness may differ from the recorded one",
                              low=0.0, high=1.0)
    aux: str | None = option(None, "aux_arrays.npz of the released runs (Feldman & Zhang 2020): compare per-example "
                                   "correctness with correctness_<split> at index_<split>")
    batch_size: int = option(200, "evaluation batch size (the demo.py of Feldman & Zhang 2020: 200)", flag="--eval-bs",
                             low=1)
    device: str = option("cpu", "where to evaluate (cpu, cuda, mps)")

    def __post_init__(self) -> None:
        check_fields(self)


def check_verify(spec: VerifySpec) -> Prepared:
    from modelsense.core.device import check_device
    from modelsense.experiments.source import model_source
    from modelsense.memorization.store import read_recorded_correctness

    check_device(spec.device)
    data = load_dataset_from_config(spec.data)
    trained = model_source(spec.checkpoint, spec.weights, spec.data, spec.model, data, required=True)
    if spec.expected_accuracy is None and spec.aux is None:
        raise ConfigError("give --expected-accuracy A (the accuracy the checkpoint should reach on --split), or --aux "
                          "FILE (the correctness the run recorded)")
    n = data.n_train if spec.split == "train" else data.n_test
    recorded = None if spec.aux is None else read_recorded_correctness(spec.aux, spec.split)
    if recorded is not None and recorded.size != n:
        raise DataError(f"--aux {spec.aux} records {recorded.size} {spec.split} examples, but --dataset "
                        f"{data.name} has {n}; pass the dataset (and --n-train / --data-dir) the run used")
    return Prepared(data, {"dataset": data.summary(), "source": trained.summary()},
                    {"trained": trained, "recorded": recorded})


def run_verify(spec: VerifySpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Accuracy (and per-example agreement with --aux) of the checkpoint; raises VerificationFailed,
    after writing metrics.json, when a check fails."""
    from modelsense.memorization.verify import example_correctness, verification

    data, trained, recorded = prepared.data, prepared.extra["trained"], prepared.extra["recorded"]
    x, y = (data.x_train, data.y_train) if spec.split == "train" else (data.x_test, data.y_test)
    correct = example_correctness(trained.module, x, y, spec.batch_size, spec.device)
    run.save_array("correctness", correct)
    metrics, failures = verification(correct, spec.expected_accuracy, spec.tolerance, recorded, spec.split, spec.aux)
    if recorded is not None:
        run.log(f"{metrics['n_match']} out of {correct.size} predictions match {spec.aux}")
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
    from modelsense.report import Section

    run = out / "memorization"
    spec = MemorizationSpec(DataConfig("digits", corruption_ratio=0.1), ModelConfig("mlp"),
                            TrainConfig(epochs=60, bs=32, lr=0.1, delta=0.01), n_models=32)
    metrics = execute_or_reuse(MEMORIZATION, spec, run, resume=resume, progress=progress)
    return Section(
        "Memorization: 32 models on random 70% subsets of digits with 10% label noise",
        "mem(i) = P[correct on i | i in training subset] − P[correct on i | i held out], estimated from "
        "the farm (Feldman & Zhang 2020). Corrupted labels should be the most memorized.",
        {k: metrics[k] for k in ("n_models", "mean_memorization", "n_high_memorization", "n_unreliable_train",
                                 "auc_corrupted", "seconds") if k in metrics},
        [run / "figures" / "memorization_histogram.png", run / "figures" / "most_memorized.png"],
        str(run),
    )


__all__ = ["CHECKPOINT_FORMATS", "MEMORIZATION", "VERIFY", "MemorizationSpec", "VerifySpec", "estimate_and_save",
           "memorization_section"]
