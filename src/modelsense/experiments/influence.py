"""Influence experiments: `noisy-labels`, `prune`, `lds`, `influence` (and the demo's section).

Every command trains the model once (`modelsense.training.fit`, with epoch checkpoints in the second
half of training when a TracIn method is asked for) or loads it (`checkpoint=`: the model.pt of
`modelsense train`, its run's training options as the recipe of ensembles and retraining, its
checkpoint_epoch_*.pt files for TracIn; see `attribution_model`), fits each attribution method on it
(`modelsense.attribution.make_attributor`) and writes a run directory:

    noisy-labels  self-influence of every training example ranks the corrupted labels (or, with
                  `--score negated-test`, minus its influence on the mean loss of clean validation
                  examples: the first `--validation-size` test examples, the whole test set by
                  default as the GEX code): metrics `auc`, `ap`, `seconds` (objects keyed by method);
                  self_influence.npz (the ranking scores); figures/self_influence_histograms.png,
                  figures/detection_curves.png
    prune         remove the k lowest (or highest) self-influence examples (`--class-balance-ratio` r:
                  ⌊r k / C⌋ of them from each class, as the GEX code; `--iterative`: the examples
                  removed between consecutive k are ranked by the model retrained without the earlier
                  ones), retrain from scratch with the retraining engine (all k and methods at once),
                  test accuracy vs random removal: metrics `accuracy` {method: [per k]},
                  `random_accuracy` (mean over repeats)
    lds           the linear datamodeling score: M models on random α-subsets S_m (retraining engine);
                  for test example j, Spearman over m between its actual loss l_j(S_m) and the
                  prediction −Σ_{i∈S_m} score(i, j) (score = loss increase on removal, so including
                  i lowers the loss by score(i, j)); `lds` = mean over test examples, per method
    influence     one method's (N, M) scores (memory-mapped scores.npy) or self-influence, and the
                  top-k most helpful / harmful training images per test example (image data);
                  --by-module: the exact split over modules (scores_by_module.npz or
                  self_influence_by_module.npz) and figures/module_shares.png

Method settings shared across methods (CLI options) go in one dict; each method takes what it
understands (`make_attributor(..., strict=False)`); the methods score the model's training loss
(`--loss`, from a checkpoint's recipe) unless `--score-loss` says otherwise. Context the methods need from training
(TracIn checkpoints and learning rates; the TRAK / EL2N ensembles' training config and model
builder; δ as the prior precision of the Laplace-based methods) is filled in here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.attribution import (
    by_module_names,
    checkpoints_from_fit,
    make_attributor,
    method_class,
    method_names,
    parse_methods,
    tracin_checkpoint_epochs,
)
from modelsense.attribution.evaluation import (
    auc_ap,
    auc_ap_with_errors,
    lds_standard_error,
    linear_datamodeling_score,
    negated_test_influence,
)
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared
from modelsense.experiments.source import (
    CHECKPOINT_HELP,
    WEIGHTS_HELP,
    Obtained,
    Recipe,
    TrainedRun,
    check_recipe,
    load_trained_run,
    load_weights_run,
    obtain_model,
)
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.options import ints, joined, names, option
from modelsense.retraining.store import (
    STORE_DIR,
    RetrainOptions,
    RetrainRecipe,
    jobs_from,
    retrain,
    subset_jobs,
    subset_size,
    train_jobs,
)
from modelsense.runs import RunDir, finished_metrics
from modelsense.training.config import TrainConfig
from modelsense.training.objective import LOSSES

#: training that memorises 10% label noise on digits with the MLP (train accuracy 0.999, ~10 s)
NOISY_TRAIN = {"lr": 0.1, "epochs": 200, "bs": 64, "delta": 1.0}
#: 100% train accuracy on clean digits (MLP)
CLEAN_TRAIN = {"lr": 0.1, "epochs": 50, "bs": 64, "delta": 1.0}
DEFAULT_NOISY_METHODS = ("gex", "loss", "grad-dot", "el2n", "randproj", "tracin-rp", "if-ekfac", "mpe")
DEFAULT_LDS_METHODS = ("grad-dot", "randproj", "tracin", "if-ekfac", "if-kfac", "arnoldi", "trak", "gex")


@dataclass(frozen=True)
class MethodSettings:
    """Settings of the attribution methods, shared by the influence commands; None: the method's
    default. Each method takes those it understands (`modelsense.attribution.method_settings`)."""

    num_ens: int | None = option(None, "ensemble members: gex fine-tuning runs, la-kfac samples")
    ft_lr: float | None = option(None, "gex: peak learning rate of each fine-tuning run")
    ft_step: int | None = option(None, "gex: SGD steps per fine-tuning run")
    ft_lr_sched: str | None = option(None, "gex: cosine (restarted, to 0) or constant (with clipping)")
    gex_eps: float | None = option(None, "gex/la-kfac: floor τ of the reference loss max(l(θ*), τ); 0 = none (the GEX "
                                         "code of Kim et al. 2023: 0.05)")
    proj_dim: int | None = option(None, "projection dimension of randproj, tracin-rp, trak")
    damping: float | None = option(None, "if-*/trak/arnoldi damping (if-*/trak: relative to the mean eigenvalue)")
    damping_mode: str | None = option(None, "relative (× mean eigenvalue) or absolute")
    matrix: str | None = option(None, "curvature of if-*/arnoldi: ggn, hessian or ef")
    arnoldi_rank: int | None = option(None, "arnoldi: number of eigendirections")
    ensemble_models: int | None = option(None, "trak and if-*: models trained from scratch whose scores are averaged "
                                                "(trak default 10, if-* 1 = the trained model only)")
    el2n_repeat: int | None = option(None, "el2n: early-trained models")
    el2n_epochs: int | None = option(None, "el2n: epochs of each early-trained model (default 10% of --epochs)")
    el2n_score: str | None = option(None, "el2n: brier (summed squared error, the GEX code's; default) or l2 (the norm "
                                          "of the error, Paul et al. 2021)")
    cl_folds: int | None = option(None, "cl: folds of the out-of-fold predictions (default 2, as the GEX code)")
    cl_score: str | None = option(None, "cl: self_confidence (1 − p of the given label, the GEX code's; default) or "
                                        "margin (with the per-class thresholds of Northcutt et al. 2021)")
    knn_k: int | None = option(None, "knn: neighbours (default N / classes, as the GEX code)")
    knn_space: str | None = option(None, "knn: features (penultimate layer; default) or logits (the GEX code's)")
    loss: str | None = option(None, "loss the methods score with: cross_entropy or sigmoid_bce (gradient/ensemble "
                                    "methods only); default: the model's training loss (--loss)", flag="--score-loss")
    bs_jacs: int | None = option(None, "examples per vmapped per-example gradient pass (default: as many as fit in "
                                       "memory-gb / 8)")
    memory_gb: float = option(2.0, "memory budget in GiB: score matrices larger than this go to a memory-mapped file")
    precision: str | None = option(None, "dtype of the per-example gradient passes: full (default), bfloat16 or "
                                         "float16 (accumulated in the model's dtype)")

    def __post_init__(self) -> None:
        import math

        if not (math.isfinite(self.memory_gb) and self.memory_gb > 0):
            raise ConfigError(f"--memory-gb must be > 0 (a budget in GiB), received {self.memory_gb:g}")

    def as_dict(self) -> dict[str, Any]:
        """The settings under the names of `modelsense.attribution` (None: left to the method)."""
        out = {"num_ens": self.num_ens, "ft_lr": self.ft_lr, "ft_step": self.ft_step, "ft_lr_sched": self.ft_lr_sched,
               "gex_eps": self.gex_eps, "proj_dim": self.proj_dim, "damping": self.damping,
               "damping_mode": self.damping_mode, "matrix": self.matrix, "rank": self.arnoldi_rank,
               "n_models": self.ensemble_models, "el2n_repeat": self.el2n_repeat, "el2n_epochs": self.el2n_epochs,
               "el2n_score": self.el2n_score, "cl_folds": self.cl_folds, "cl_score": self.cl_score, "knn_k": self.knn_k,
               "knn_space": self.knn_space, "loss": self.loss, "precision": self.precision,
               "chunk_size": self.bs_jacs, "memory_budget": max(1, int(self.memory_gb * 2**30))}
        return {k: v for k, v in out.items() if v is not None}


def _methods_help(what: str) -> str:
    return f"comma-separated attribution methods{what}: {', '.join(method_names())}"


@dataclass(frozen=True)
class NoisyLabelsSpec:
    """`modelsense noisy-labels`: rank training examples by each method's self-influence."""

    data: DataConfig = field(default_factory=lambda: DataConfig(corruption_ratio=0.1))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**NOISY_TRAIN))
    methods: tuple[str, ...] = option(DEFAULT_NOISY_METHODS, _methods_help(""), parse=names, show=joined)
    score: str = option("self", "what ranks the labels: self (self-influence) or negated-test (minus the influence on "
                                "the mean loss of clean validation examples, the GEX code's --self_influence=False; "
                                "pairwise methods)")
    validation_size: int | None = option(None, "negated-test: the first n test examples are the validation set "
                                               "(default: the whole test set, as the GEX code)")
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    weights: str | None = option(None, WEIGHTS_HELP)


NOISY_SCORES = ("self", "negated-test")


@dataclass(frozen=True)
class PruneSpec:
    """`modelsense prune`: remove the lowest (or highest) self-influence examples, retrain."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**NOISY_TRAIN))
    methods: tuple[str, ...] = option(("gex", "loss", "el2n"), _methods_help(""), parse=names, show=joined)
    ks: tuple[int, ...] = option((), "comma-separated numbers of examples to remove (default 10-40% of N)", parse=ints,
                                 show=joined)
    remove: str = option("lowest", "lowest (as Kim et al. 2023, GEX) or highest self-influence first")
    class_balance_ratio: float = option(0.0, "fraction r of each k removed class-wise (⌊r k / classes⌋ lowest of each "
                                             "class), the rest globally (the GEX code's --class_balance_ratio)")
    iterative: bool = option(False, "rescore after each k: the next examples are removed by the self-influence of the "
                                    "model retrained without the previous ones (the GEX code's --iterative_pruning)",
                             flag="--iterative")
    n_random: int = option(3, "random-removal repeats per k")
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    weights: str | None = option(None, WEIGHTS_HELP)


@dataclass(frozen=True)
class LdsSpec:
    """`modelsense lds`: the linear datamodeling score of each method."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**CLEAN_TRAIN))
    methods: tuple[str, ...] = option(DEFAULT_LDS_METHODS, _methods_help(" (pairwise)"), parse=names, show=joined)
    n_models: int = option(50, "models trained on random subsets (ground truth)")
    alpha: float = option(0.5, "fraction of the training set in each subset")
    n_test: int | None = option(None, "first n test examples (default all)")
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    weights: str | None = option(None, WEIGHTS_HELP)


@dataclass(frozen=True)
class InfluenceSpec:
    """`modelsense influence`: one method's (N, n_test) scores or self-influence."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**CLEAN_TRAIN))
    method: str = option("if-ekfac", "one attribution method: " + ", ".join(method_names()))
    self_only: bool = option(False, "self-influence only (N,) instead of the (N, n_test) matrix", flag="--self")
    n_test: int | None = option(None, "first n test examples (default all)")
    top_k: int = option(5, "most helpful / harmful training examples shown per test example")
    n_show: int = 6
    save_state: bool = option(False, "also save the fitted method (curvature factors, projections, ensembles, ...) "
                                     "in OUT/state, to score new test data later with --state", flag="--save-state")
    state: str | None = option(None, "a folder written by --save-state: score with that fitted method instead of "
                                     "fitting it (its method, settings, model and training data must match)")
    by_module: bool = option(False, "also split the scores (or, with --self, the self-influence) over the model's "
                                    "modules, exactly: scores_by_module.npz and the share of each module in the top "
                                    "1% helpful / harmful pairs (methods: " + ", ".join(by_module_names()) + ")",
                             flag="--by-module")
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    weights: str | None = option(None, WEIGHTS_HELP)


# -- shared steps -------------------------------------------------------------------------------
def attribution_model(checkpoint: str | Path | None, data_cfg: DataConfig, data: Dataset, model_cfg: ModelConfig,
                      train_cfg: TrainConfig, methods: list[str],
                      weights: str | Path | None = None) -> tuple[TrainedRun | None, ModelConfig, TrainConfig]:
    """(run of `checkpoint`, model config, training config) of the model the methods score.

    No checkpoint: (None, model_cfg, train_cfg), the model is trained here. Otherwise the model.pt of
    `modelsense train` (checked against `data`), its architecture, and the recipe that ensembles and
    retraining use: its run's training options (device of `train_cfg`), else `train_cfg`. Fails
    before anything is written when `data_cfg` is not the data recipe the checkpoint was trained with,
    or when a method needs what a model.pt lacks: TracIn the parameters at epochs of training with
    their learning rates, mpe after IVON/Adam the optimizer state.
    """
    if checkpoint is None and weights is None:
        return None, model_cfg, train_cfg
    if checkpoint is not None and weights is not None:
        raise ConfigError("give --checkpoint (a modelsense run's model.pt) or --weights (a state_dict of --model), "
                          "not both")
    trained = load_trained_run(checkpoint, data) if weights is None else load_weights_run(weights, model_cfg, data)
    check_recipe(checkpoint, Recipe(trained.data_cfg, trained.model_cfg, trained.train_cfg), data_cfg)
    recipe = trained.recipe(train_cfg)
    tracin = [m for m in methods if "checkpoints" in method_class(m).needs]
    epochs = [k for k in trained.snapshots if k.startswith("epoch_") and int(k.split("_")[1]) >= 1]
    if tracin and (not epochs or trained.train_cfg is None):
        lacks = (f"no checkpoint_epoch_<E>.pt files next to {trained.path}" if not epochs else
                 f"no config.json next to {trained.path} with the training options of that model (the learning rates)")
        raise ConfigError(f"{', '.join(tracin)} needs the parameters at epochs of training and their learning rates, "
                          f"but there are {lacks}; train it with `modelsense train --checkpoint-epochs E1,E2,...` "
                          "or pick another method")
    state = [m for m in methods if "optimizer_state" in method_class(m).needs]
    if state and recipe.optimizer in ("ivon", "adam"):
        raise ConfigError(f"{', '.join(state)} reads the posterior of a model trained with {recipe.optimizer} from the "
                          f"optimizer state, which {trained.path} does not hold; pick another method, or train "
                          "the model in this command")
    return trained, trained.model_cfg, recipe


def method_context(
    method: str, result, train_cfg: TrainConfig, model_cfg: ModelConfig, data: Dataset
) -> dict[str, Any]:
    """Settings a method takes from the training run, by what its class declares it needs
    (`method_class(method).needs`, see `modelsense.attribution.NEEDS`)."""
    needs = method_class(method).needs
    ctx: dict[str, Any] = {}
    if "checkpoints" in needs:
        ckpts, lrs = checkpoints_from_fit(result)
        ctx.update(checkpoints=ckpts, learning_rates=lrs)
    if "recipe" in needs:
        base = replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=())
        ctx.update(
            train_config=base,
            model_fn=lambda s: build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=int(s)),
        )
    if "prior_precision" in needs:
        ctx["prior_precision"] = max(train_cfg.delta, 1e-8)
    if "delta" in needs:
        ctx["delta"] = train_cfg.delta
    if "optimizer_state" in needs and train_cfg.optimizer in ("ivon", "adam"):
        ctx.update(source=train_cfg.optimizer, optimizer=result.optimizer)
    return ctx


def make_method(method: str, settings: dict[str, Any], context: dict[str, Any], progress: bool, seed: int,
                methods: list[str] | None = None):
    """Method `method` with the shared `settings` (those it takes; a setting none of `methods` takes is
    refused) and its `context` from training."""
    given = {k: v for k, v in settings.items() if v is not None}
    return make_attributor(method, {"seed": seed, **given, **context, "progress": progress}, strict=False,
                           shared_with=methods or [method])


#: attribution setting -> the option that sets it, where the names differ (`MethodSettings.as_dict`)
_SETTING_FLAGS = {"rank": "--arnoldi-rank", "n_models": "--ensemble-models", "chunk_size": "--bs-jacs",
                  "memory_budget": "--memory-gb", "loss": "--score-loss"}


def check_settings(methods: list[str], settings: dict[str, Any]) -> None:
    """Build each method with `settings` (no context), so a bad setting, or one that no method asked
    for takes, fails before anything is written; the message names the options."""
    try:
        for m in methods:
            make_method(m, settings, {}, progress=False, seed=0, methods=methods)
    except ConfigError as exc:
        import re

        message = str(exc)
        for name in sorted(settings, key=len, reverse=True):
            flag = _SETTING_FLAGS.get(name, "--" + name.replace("_", "-"))
            message = re.sub(rf"'{name}'|(?<![\w-]){name}(?![\w-])", flag, message)
        raise ConfigError(message) from None


def _check_data_for_methods(data: Dataset, methods: list[str]) -> None:
    if not data.is_classification:
        raise ConfigError(f"influence experiments need a classification dataset; {data.name} has no classes")


def _check_self_influence(methods: list[str]) -> None:
    """Rankings by self-influence need methods whose self-score varies (not grad-cos: cos(g_i, g_i) = 1)."""
    flat = [m for m in methods if not method_class(m).informative_self]
    if flat:
        raise ConfigError(f"{', '.join(flat)} gives the same self-influence to every example (cos(g_i, g_i) = 1), "
                          "so it cannot rank training examples; use grad-dot or another method")


def _prepare(spec: Any, methods: list[str], config: dict[str, Any] | None = None) -> Prepared:
    """The shared checks of the influence commands (nothing written): data, methods, settings, and
    the checkpoint (its recipe and what the methods need from it)."""
    data = load_dataset_from_config(spec.data)
    _check_data_for_methods(data, methods)
    trained, model_cfg, train_cfg = attribution_model(spec.checkpoint, spec.data, data, spec.model, spec.train, methods,
                                                      spec.weights)
    settings = {"loss": train_cfg.loss, **spec.settings.as_dict()}  # the methods score the loss the model trained with
    try:
        check_settings(methods, settings)
    except ConfigError as exc:
        if spec.settings.loss is None and train_cfg.loss != "cross_entropy" and "--score-loss" in str(exc):
            raise ConfigError(
                f"{exc} (the model trains with --loss {train_cfg.loss}, which the methods score by default)"
            ) from None
        raise
    return Prepared(data, {"dataset": data.summary(), "source": None if trained is None else trained.summary(),
                           **(config or {})},
                    {"trained": trained, "model": model_cfg, "train": train_cfg, "methods": methods,
                     "settings": settings})


def _obtain(prepared: Prepared, run: RunDir, progress: bool) -> Obtained:
    """The model the methods score (trained here, with TracIn snapshots when a TracIn method needs
    them, and saved in the run; or the checkpoint's)."""
    x = prepared.extra
    train = x["train"]
    tracin = any("checkpoints" in method_class(m).needs for m in x["methods"]) and not train.checkpoint_epochs
    return obtain_model(prepared.data, x["model"], train, trained=x["trained"], run=run, progress=progress,
                        checkpoint_epochs=tracin_checkpoint_epochs(train.epochs) if tracin else ())


def _method(method: str, got: Obtained, prepared: Prepared, progress: bool):
    """The unfitted attributor of `method`, with the shared settings and its context from training."""
    ctx = method_context(method, got.fit, got.train, got.model, prepared.data)
    return make_method(method, prepared.extra["settings"], ctx, progress, got.train.seed, prepared.extra["methods"])


def _fit_method(method: str, got: Obtained, prepared: Prepared, progress: bool):
    """(fitted attributor, seconds)."""
    data = prepared.data
    start = time.perf_counter()
    att = _method(method, got, prepared, progress).fit(got.module, data.x_train, data.y_train)
    return att, time.perf_counter() - start


def _by_method(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.replace("-", "_"): v for k, v in values.items()}


# -- noisy labels -------------------------------------------------------------------------------
def check_noisy_labels(spec: NoisyLabelsSpec) -> Prepared:
    """Validate the noisy-labels options (score kind against the methods) and load the data."""
    methods = parse_methods(list(spec.methods))
    if spec.score not in NOISY_SCORES:
        raise ConfigError(f"--score must be {' or '.join(NOISY_SCORES)}, received {spec.score!r}")
    if spec.score == "self":
        _check_self_influence(methods)
        if spec.validation_size is not None:
            raise ConfigError("--validation-size is the validation set of --score negated-test; drop it or pass "
                              "--score negated-test")
    else:
        single = [m for m in methods if not method_class(m).pairwise]
        if single:
            raise ConfigError(f"--score negated-test needs train-test influence; {', '.join(single)} "
                              f"{'gives' if len(single) == 1 else 'give'} a self-influence only: drop "
                              f"{'it' if len(single) == 1 else 'them'} or use --score self")
        if spec.validation_size is not None and spec.validation_size < 1:
            raise ConfigError(f"--validation-size must be >= 1, received {spec.validation_size}")
    if spec.data.corruption_ratio <= 0 and spec.checkpoint is not None:
        raise ConfigError(f"noisy-labels needs a model trained on corrupted labels, but checkpoint {spec.checkpoint} "
                          "was trained on clean labels (its data recipe has corruption ratio 0); train one with "
                          "`modelsense train --corruption-ratio 0.1 --checkpoint-epochs ...` and score that")
    if spec.data.corruption_ratio <= 0:
        raise ConfigError("noisy-labels needs corrupted labels: pass --corruption-ratio > 0 (e.g. 0.1)")
    prepared = _prepare(spec, methods)
    data = prepared.data
    if len(data.metadata["corrupted_indices"]) == 0:
        raise ConfigError(f"--corruption-ratio {spec.data.corruption_ratio} changed no label of "
                          f"{data.n_train} examples; raise it")
    if spec.score == "negated-test":
        if spec.validation_size is not None and spec.validation_size > data.n_test:
            raise ConfigError(f"--validation-size {spec.validation_size} exceeds the {data.n_test} test examples")
        prepared.config["validation_size"] = data.n_test if spec.validation_size is None else spec.validation_size
    return prepared


def run_noisy_labels(spec: NoisyLabelsSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Rank corrupted training labels by each method's self-influence (see the module docstring)."""
    from modelsense.attribution import plots

    data = prepared.data
    corrupted = data.metadata["corrupted_indices"].numpy()
    start = time.perf_counter()
    got = _obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"train_accuracy": got.fit.final.get("train_accuracy"),
                               "test_accuracy": got.fit.final.get("test_accuracy"), "n_train": data.n_train,
                               "n_corrupted": int(len(corrupted)), "train_seconds": time.perf_counter() - start,
                               "auc": {}, "auc_se": {}, "ap": {}, "ap_se": {}, "seconds": {}}
    run.log(f"model: train accuracy {metrics['train_accuracy']:.4f}")
    self_scores: dict[str, np.ndarray] = {}
    if spec.score == "negated-test":
        v = prepared.config["validation_size"]
        metrics["validation_size"] = v
    for m in prepared.extra["methods"]:
        att, seconds = _fit_method(m, got, prepared, progress)
        if spec.score == "negated-test":
            start = time.perf_counter()
            s = self_scores[m] = negated_test_influence(att, data.x_test[:v], data.y_test[:v])
            seconds += time.perf_counter() - start
        else:
            s = self_scores[m] = att.self_scores().double().numpy()
        (auc, auc_se), (ap, ap_se) = auc_ap_with_errors(s, corrupted, seed=got.train.seed)
        for key, value in (("auc", auc), ("auc_se", auc_se), ("ap", ap), ("ap_se", ap_se), ("seconds", seconds)):
            metrics[key][m] = value
        run.log(f"{m}: AUC {auc:.4f} ± {auc_se:.3f}, AP {ap:.4f} ± {ap_se:.3f} ({seconds:.1f}s)")
        run.save_arrays("self_influence", corrupted=corrupted, **_by_method(self_scores))
        run.write_metrics(metrics)
    what = "self-influence" if spec.score == "self" else "negated train-test influence"
    run.save_figure(plots.self_influence_histograms(self_scores, corrupted, what), "self_influence_histograms")
    run.save_figure(plots.detection_curves(self_scores, corrupted), "detection_curves")
    return metrics


# -- pruning ------------------------------------------------------------------------------------
def check_prune(spec: PruneSpec) -> Prepared:
    """Validate the pruning options and the budgets `--ks` (default 10-40% of N) and load the data."""
    methods = parse_methods(list(spec.methods))
    _check_self_influence(methods)
    if spec.remove not in ("lowest", "highest"):
        raise ConfigError(f"--remove must be lowest or highest, received {spec.remove!r}")
    if spec.n_random < 1:
        raise ConfigError(f"--n-random must be >= 1, received {spec.n_random}")
    if not 0.0 <= spec.class_balance_ratio <= 1.0:
        raise ConfigError(f"--class-balance-ratio must lie in [0, 1], received {spec.class_balance_ratio}")
    prepared = _prepare(spec, methods)
    n = prepared.data.n_train
    ks = tuple(spec.ks) or tuple(int(round(f * n)) for f in (0.1, 0.2, 0.3, 0.4))
    bad = [k for k in ks if not 0 < k < n]
    if bad:
        raise ConfigError(f"--ks must lie in (0, N={n}), received {bad}")
    if spec.iterative and (len(ks) < 2 or list(ks) != sorted(set(ks))):
        raise ConfigError(f"--iterative removes more examples at each k and rescores in between: give at least two "
                          f"increasing --ks, received {list(ks)}")
    prepared.config["ks"] = list(ks)
    RetrainRecipe(spec.data, spec.model, spec.train)  # retraining is the engine's (sgd or adam)
    return prepared


def run_prune(spec: PruneSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Remove the k lowest (or highest) self-influence examples, retrain (jobs of the ground-truth
    store: `--resume` continues an interrupted retraining), compare with random removal."""
    from modelsense.attribution import plots
    from modelsense.attribution.selection import pruning_set

    data, ks = prepared.data, prepared.config["ks"]
    n = data.n_train
    got = _obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"full_test_accuracy": got.fit.final.get("test_accuracy"), "ks": list(ks),
                               "remove": spec.remove, "class_balance_ratio": spec.class_balance_ratio,
                               "iterative": spec.iterative, "seconds": {}, "accuracy": {}}
    masks, labels, self_scores = [], [], {}
    y = data.y_train.numpy()
    removed_first = -np.inf if spec.remove == "lowest" else np.inf
    for m in prepared.extra["methods"]:
        att, metrics["seconds"][m] = _fit_method(m, got, prepared, progress)
        s = self_scores[m] = att.self_scores().double().numpy()
        for step, k in enumerate(ks):
            keep = np.ones(n, dtype=bool)
            keep[pruning_set(s, k, y, data.num_classes, spec.class_balance_ratio, spec.remove)] = False
            masks.append(keep)
            labels.append((m, k))
            if spec.iterative and step + 1 < len(ks):  # rescore on the model retrained without them
                start = time.perf_counter()
                s = np.full(n, removed_first)
                s[keep] = _self_scores_without(m, keep, got, prepared, progress)
                metrics["seconds"][m] += time.perf_counter() - start
                run.log(f"{m}: rescored after removing {k} examples")
    rng = np.random.default_rng(got.train.seed + 99)
    for _ in range(spec.n_random):
        for k in ks:
            keep = np.ones(n, dtype=bool)
            keep[rng.choice(n, size=k, replace=False)] = False
            masks.append(keep)
            labels.append(("random", k))
    recipe = RetrainRecipe(spec.data, got.model, replace(got.train, checkpoint_epochs=(), checkpoint_iterations=()))
    tables = retrain(recipe, jobs_from(np.stack(masks), [got.train.seed] * len(masks)), spec.retrain, run.path,
                     data=data, progress=progress, log=run.log)
    acc = tables["test_correct"].astype(np.float64).mean(1)
    for m in prepared.extra["methods"]:
        metrics["accuracy"][m] = [float(a) for (mm, _), a in zip(labels, acc) if mm == m]
    rand = np.array([a for (mm, _), a in zip(labels, acc) if mm == "random"]).reshape(spec.n_random, len(ks))
    metrics["random_accuracy"] = rand.mean(0).tolist()
    metrics["random_accuracy_std"] = rand.std(0).tolist()
    run.save_arrays("self_influence", **_by_method(self_scores))
    run.save_arrays("prune_masks", masks=np.stack(masks), test_accuracy=acc)
    run.save_figure(plots.pruning_figure(ks, metrics, spec.remove + (", iterative" if spec.iterative else "")),
                    "pruning")
    return metrics


def _self_scores_without(
    method: str, keep: np.ndarray, got: Obtained, prepared: Prepared, progress: bool
) -> np.ndarray:
    """Self-influence of the kept examples under the model trained on them alone (the recipe and seed
    of `got`, so the model of the retraining job with mask `keep`), by `method` fitted on them."""
    data = prepared.data
    rows = torch.from_numpy(np.flatnonzero(keep))
    kept = Dataset(data.name, data.x_train[rows], data.y_train[rows], data.x_test, data.y_test, data.num_classes,
                   data.source, {})
    tracin = "checkpoints" in method_class(method).needs
    sub = obtain_model(kept, got.model, got.train, progress=progress,
                       checkpoint_epochs=tracin_checkpoint_epochs(got.train.epochs) if tracin else ())
    ctx = method_context(method, sub.fit, sub.train, sub.model, kept)
    att = make_method(method, prepared.extra["settings"], ctx, progress, got.train.seed, prepared.extra["methods"])
    return att.fit(sub.module, kept.x_train, kept.y_train).self_scores().double().numpy()


# -- linear datamodeling score ----------------------------------------------------------------
def lds_ground_truth(
    data_cfg: DataConfig,
    data: Dataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    n_test: int,
    *,
    n_models: int,
    alpha: float,
    root: str | Path,
    retrain_options: RetrainOptions | None = None,
    progress: bool = True,
    log=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(masks (M, N) bool, test losses (M, n_test)) of M models trained from scratch on random α-subsets:
    the jobs `subset_jobs(N, α, range(M), seed0=train_cfg.seed)` of the ground-truth store under `root`
    (shared with memorization at ρ = α on the same recipe)."""
    options = retrain_options or RetrainOptions()
    recipe = RetrainRecipe(data_cfg, model_cfg, replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=()))
    jobs = subset_jobs(data.n_train, alpha, range(n_models), seed0=train_cfg.seed)
    tables = train_jobs(recipe, jobs, root, data=data, backend=options.backend, address=options.address,
                        chunk_models=options.chunk_size, progress=progress, log=log)
    return tables["masks"], tables["test_loss"][:, :n_test].astype(np.float64)


def check_lds(spec: LdsSpec) -> Prepared:
    """Validate the LDS options (pairwise methods, >= 3 models, subset size in (0, N)) and load the data."""
    methods = parse_methods(list(spec.methods))
    for m in methods:
        if not method_class(m).pairwise:
            raise ConfigError(f"method {m!r} has a self-influence only; the LDS needs pairwise scores")
    if spec.n_models < 3:
        raise ConfigError(f"--n-models must be >= 3 for a rank correlation, received {spec.n_models}")
    prepared = _prepare(spec, methods)
    data = prepared.data
    if not 0 < subset_size(data.n_train, spec.alpha) < data.n_train:
        raise ConfigError(f"--alpha {spec.alpha} gives subsets of {subset_size(data.n_train, spec.alpha)} of "
                          f"{data.n_train} examples; choose alpha in (0, 1)")
    RetrainRecipe(spec.data, spec.model, spec.train)  # the ground truth trains with the engine (sgd or adam)
    prepared.config["n_test"] = data.n_test if spec.n_test is None else min(int(spec.n_test), data.n_test)
    return prepared


def run_lds(spec: LdsSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """LDS of each method (see the module docstring); the ground truth's models are jobs of the one
    ground-truth store (`lds_ground_truth`; OUT/store unless --store), so `--resume` (or another run
    given the same --store) reuses them."""
    from modelsense.attribution import plots

    data, n_test = prepared.data, prepared.config["n_test"]
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    got = _obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"test_accuracy": got.fit.final.get("test_accuracy"), "n_models": spec.n_models,
                               "alpha": spec.alpha, "n_test": n_test, "lds": {}, "lds_se": {}, "seconds": {}}
    all_scores = {}
    for m in prepared.extra["methods"]:
        start = time.perf_counter()
        att, _ = _fit_method(m, got, prepared, progress)
        all_scores[m] = att.scores(x_test, y_test).double().numpy()
        metrics["seconds"][m] = time.perf_counter() - start
        run.log(f"{m}: scores in {metrics['seconds'][m]:.1f}s")
    start = time.perf_counter()
    masks, losses = lds_ground_truth(spec.data, data, got.model, got.train, n_test, n_models=spec.n_models,
                                     alpha=spec.alpha, root=spec.retrain.root(run.path), retrain_options=spec.retrain,
                                     progress=progress, log=run.log)
    metrics["ground_truth_seconds"] = time.perf_counter() - start
    per_test = {}
    for m, s in all_scores.items():
        metrics["lds"][m], per_test[m] = linear_datamodeling_score(s, masks, losses)
        metrics["lds_se"][m] = lds_standard_error(per_test[m])
        run.log(f"{m}: LDS {metrics['lds'][m]:.4f} ± {metrics['lds_se'][m]:.4f}")
    run.save_arrays("lds_per_test", **_by_method(per_test))
    run.save_figure(plots.lds_figure(metrics), "lds")
    return metrics


# -- one method's scores ----------------------------------------------------------------------
def check_influence(spec: InfluenceSpec) -> Prepared:
    """Validate the influence options (pairwise or --self, --top-k, --by-module, a saved state) and load the data."""
    (method,) = parse_methods([spec.method])
    if not spec.self_only and not method_class(method).pairwise:
        raise ConfigError(f"method {method!r} has a self-influence only; pass --self")
    if spec.self_only:
        _check_self_influence([method])
    if spec.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, received {spec.top_k}")
    if spec.by_module and not method_class(method).splits_by_module:
        raise ConfigError(f"--by-module: method {method!r} does not split exactly over modules (its preconditioner, "
                          "projection or ensemble mixes the parameters of different modules); choose one of "
                          f"{', '.join(by_module_names())}")
    if spec.state is not None:
        from modelsense.attribution.state import read_saved

        saved = read_saved(spec.state)
        if saved.get("method") != method:
            raise ConfigError(f"--state {spec.state} holds a fitted {saved.get('method')!r}, not {method!r}; pass "
                              f"--method {saved.get('method')} or drop --state")
        if spec.checkpoint is None and spec.weights is None:
            raise ConfigError("--state scores the model it was fitted on: pass that model as --checkpoint RUN/model.pt "
                              "or --weights")
    prepared = _prepare(spec, [method])
    data = prepared.data
    prepared.config["n_test"] = data.n_test if spec.n_test is None else min(int(spec.n_test), data.n_test)
    return prepared


def run_influence(spec: InfluenceSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """One method's scores (scores.npy, memory-mapped (N, n_test)) or self-influence (self_influence.npy);
    top-k most helpful / harmful training examples per shown test example (figure for image data)."""
    from modelsense.attribution import plots

    data, n_test, top_k = prepared.data, prepared.config["n_test"], spec.top_k
    (method,) = prepared.extra["methods"]
    got = _obtain(prepared, run, progress)
    start = time.perf_counter()
    if spec.state is not None:
        att = _method(method, got, prepared, progress).load(spec.state, got.module, data.x_train, data.y_train)
        fit_seconds = time.perf_counter() - start
        run.log(f"{method}: state loaded from {spec.state}")
    else:
        att, fit_seconds = _fit_method(method, got, prepared, progress)
    if spec.save_state:
        att.save(run.path / "state")
    metrics: dict[str, Any] = {"method": method, "test_accuracy": got.fit.final.get("test_accuracy"),
                               "fit_seconds": fit_seconds, "state": "loaded" if spec.state else "fitted"}
    image = plots.is_image(tuple(data.input_shape))
    if spec.self_only:
        if spec.by_module:
            parts = {k: v.numpy() for k, v in att.self_scores(by_module=True).items()}
            run.save_arrays("self_influence_by_module", **parts)
            _module_results(parts, att, method, "self-influence", run, metrics)
            s = sum(parts.values())
        else:
            s = att.self_scores().numpy()
        run.save_array("self_influence", s)
        order = np.argsort(-s)
        metrics.update(shape=[len(s)], top_self_influence=order[:top_k].tolist())
        if len(data.metadata.get("corrupted_indices", [])):
            metrics["auc"], metrics["ap"] = auc_ap(s, data.metadata["corrupted_indices"].numpy())
        if image:
            run.save_figure(plots.image_grid(data.x_train[order[: 4 * top_k]], data.y_train[order[: 4 * top_k]],
                                             f"highest self-influence ({method})"), "top_self_influence")
    else:
        dtype = np.float64 if next(iter(att.params_.values())).dtype == torch.float64 else np.float32
        shown = min(spec.n_show, n_test)
        if spec.by_module:
            parts = {k: v.numpy() for k, v in att.scores(data.x_test[:n_test], data.y_test[:n_test],
                                                          by_module=True).items()}
            run.save_arrays("scores_by_module", **parts)
            _module_results(parts, att, method, "influence", run, metrics)
        with run.memmap("scores", (data.n_train, n_test), dtype) as mm:  # named scores.npy once filled
            if spec.by_module:
                mm[:] = sum(parts.values())
                S = torch.from_numpy(np.asarray(mm))
            else:
                S = att.scores(data.x_test[:n_test], data.y_test[:n_test], out=mm)
            block = S[:, :shown].numpy().copy()
        helpful = np.argsort(-block, axis=0)[:top_k].T
        harmful = np.argsort(block, axis=0)[:top_k].T
        metrics.update(shape=[data.n_train, n_test], top_helpful=helpful.tolist(), top_harmful=harmful.tolist())
        if image:
            run.save_figure(plots.top_k_figure(data.x_train, data.y_train, data.x_test, data.y_test, helpful, harmful,
                                               block), "top_influential")
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def _module_results(parts: dict[str, np.ndarray], att, method: str, what: str, run: RunDir,
                    metrics: dict[str, Any]) -> None:
    """Metrics and figure of a per-module breakdown: each module's share of the parameters and of the
    top 1% most helpful / harmful pairs (scores) or of the top 1% self-influences."""
    from modelsense.attribution import plots
    from modelsense.attribution.evaluation import module_shares

    modules = att.model_.spec.modules
    n_params = sum(len(v) for v in modules.values())
    metrics["module_params"] = {m: len(v) for m, v in modules.items()}
    shares = module_shares(parts, 0.01)
    # self-influence: the highest 1% only (the lowest are the least remarkable examples, not harmful ones)
    metrics["module_share"] = shares if what == "influence" else {"highest self-influence": shares["helpful"]}
    param_shares = {m: len(v) / n_params for m, v in modules.items()}
    run.save_figure(plots.module_share_figure(metrics["module_share"], param_shares,
                                              f"{method}: module shares of the top 1% {what}"), "module_shares")


# -- the commands ---------------------------------------------------------------------------------
def _table(metrics: dict[str, Any], keys: tuple[str, ...]) -> Any:
    from rich.table import Table

    table = Table("method", *keys)
    for m in metrics[keys[0]]:
        table.add_row(m, *(f"{metrics[k][m]:.4g}" if isinstance(metrics[k].get(m), float) else str(metrics[k].get(m))
                           for k in keys))
    return table


def _noisy_summary(m: dict[str, Any]) -> Any:
    from rich.console import Group

    return Group(f"train accuracy {m['train_accuracy']:.4f}, {m['n_corrupted']} corrupted labels",
                 _table(m, ("auc", "auc_se", "ap", "ap_se", "seconds")))


def _prune_summary(m: dict[str, Any]) -> str:
    rows = [f"k = {m['ks']}; all data: {m['full_test_accuracy']:.4f}"]
    rows += [f"{name:>12s}: " + " ".join(f"{a:.4f}" for a in acc)
             for name, acc in {**m["accuracy"], "random": m["random_accuracy"]}.items()]
    return "\n".join(rows)


NOISY_LABELS = Command("noisy-labels", NoisyLabelsSpec, check_noisy_labels, run_noisy_labels, summary=_noisy_summary,
                       training_losses=LOSSES,
                       help="Noisy-label detection: rank training examples by each method's self-influence; AUC/AP "
                            "with standard errors, histograms.")
PRUNE = Command("prune", PruneSpec, check_prune, run_prune, summary=_prune_summary, keep=(STORE_DIR,),
                resume_keys=("data", "model", "train", "methods", "ks", "remove", "class_balance_ratio", "iterative",
                             "n_random", "settings"),
                training_losses=LOSSES,
                help="Dataset pruning: remove the k lowest self-influence examples, retrain, test accuracy vs random "
                     "removal.")
LDS = Command(
    "lds",
    LdsSpec,
    check_lds,
    run_lds,
    summary=lambda m: _table(m, ("lds", "lds_se", "seconds")),
    keep=(STORE_DIR,),
    resume_keys=("data", "model", "train", "n_models", "alpha", "n_test"),
    training_losses=LOSSES,
    help="Linear datamodeling score per method (ground truth: models on random α-subsets, in the "
    "ground-truth store of --out, or --store, for --resume and other runs).",
)
INFLUENCE = Command("influence", InfluenceSpec, check_influence, run_influence, training_losses=LOSSES,
                    summary=lambda m: f"{m['method']}: scores of shape {m['shape']} in {m['seconds']:.1f}s",
                    help="One method's influence scores (score(i, j) ≈ rise of test loss j when training example i "
                         "is removed).")


# -- demo section -------------------------------------------------------------------------------
def noisy_labels_section(out: Path, progress: bool, resume: bool = False):
    """The demo's section: GEX vs the training loss and the squared gradient norm on digits with 10%
    corrupted labels (MLP trained to memorise the noise); histograms and AUC."""
    from modelsense.experiments.command import execute
    from modelsense.experiments.report import Section

    run = Path(out) / "noisy_labels"
    spec = NoisyLabelsSpec(methods=("gex", "loss", "grad-dot", "knn", "random"),
                           settings=MethodSettings(num_ens=8, ft_step=200, ft_lr=0.3))
    metrics = (resume and finished_metrics(run)) or execute(NOISY_LABELS, spec, run, overwrite=True, progress=progress)
    shown = {"train_accuracy": metrics["train_accuracy"], "n_corrupted": metrics["n_corrupted"]}
    for m in metrics["auc"]:
        shown[f"AUC {m}"] = metrics["auc"][m]
        shown[f"AP {m}"] = metrics["ap"][m]
        shown[f"seconds {m}"] = metrics["seconds"][m]
    return Section(
        "Noisy labels: self-influence ranks corrupted training labels",
        "digits with 10% of the training labels moved to another class; MLP 64-128-128-10 trained with SGD "
        "(lr 0.1, 200 epochs) until it fits the noise. Each method scores every training example by its "
        "self-influence (how much its own loss would rise if it were left out): GEX (8 chained fine-tuning "
        "members of 200 SGD steps with cosine lr from 0.3, covariance of the loss deviations), the training loss and "
        "the squared gradient norm "
        "(grad-dot), beside two baselines of the GEX paper: the label disagreement of the k = N/10 nearest neighbours "
        "in the network's penultimate features (knn) and random scores (chance). AUC / AP of ranking the corrupted "
        "labels first; histograms of the self-influence of clean and corrupted examples.",
        shown,
        [run / "figures" / "self_influence_histograms.png", run / "figures" / "detection_curves.png"],
        str(run),
    )
