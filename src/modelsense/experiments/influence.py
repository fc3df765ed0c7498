"""Influence experiments: `noisy-labels`, `prune`, `lds`, `influence` (and the demo's section).

Every command trains the model (with epoch checkpoints in the second half of training when a TracIn
method is asked for) or loads it (`--checkpoint`, `--weights`: see `attribution_model`), fits each
method on it with the shared settings and its context from training (`attribution.settings`), and
writes a run directory:

    noisy-labels  each method's self-influence (or `--score negated-test`: minus its influence on the
                  mean loss of the first `--validation-size` test examples, all by default as the GEX
                  code) ranks the corrupted labels: `auc`, `ap` (+ `_se`), `seconds` by method;
                  self_influence.npz; figures/self_influence_histograms.png, detection_curves.png
    prune         remove the k lowest (or highest) self-influence examples (`attribution.selection.
                  pruning_masks`: class-balanced, iterative), retrain from scratch, test accuracy vs
                  random removal: `accuracy` {method: [per k]}, `random_accuracy`; prune_masks.npz
    lds           the linear datamodeling score (`attribution.evaluation.linear_datamodeling_score`)
                  on M models retrained on random α-subsets: `lds`, `lds_se` by method
    influence     one method's (N, n_test) scores (memory-mapped scores.npy) or self-influence, the
                  top-k most helpful / harmful training images per test example; --by-module: the
                  exact split over modules (*_by_module.npz) and figures/module_shares.png

Retrained models are jobs of the ground-truth store (`retraining.store`: `--resume`, `--store`). The
methods score the model's training loss (`--loss`, a checkpoint's recipe) unless `--score-loss` is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.attribution import by_module_names, method_class, method_names, parse_methods, tracin_checkpoint_epochs
from modelsense.attribution import evaluation as ev
from modelsense.attribution.settings import MethodSettings, check_pairwise, check_self_influence, method_for_run
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments import source
from modelsense.experiments.command import Command, Prepared
from modelsense.models import ModelConfig
from modelsense.options import check_fields, ints, joined, names, option
from modelsense.retraining.store import STORE_DIR, RetrainOptions, RetrainRecipe, jobs_from, retrain, subset_size
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.objective import LOSSES

#: training that memorises 10% label noise on digits with the MLP (train accuracy 0.999, ~10 s)
NOISY_TRAIN = {"lr": 0.1, "epochs": 200, "bs": 64, "delta": 1.0}
#: 100% train accuracy on clean digits (MLP)
CLEAN_TRAIN = {"lr": 0.1, "epochs": 50, "bs": 64, "delta": 1.0}
DEFAULT_NOISY_METHODS = ("gex", "loss", "grad-dot", "el2n", "randproj", "tracin-rp", "if-ekfac", "mpe")
DEFAULT_LDS_METHODS = ("grad-dot", "randproj", "tracin", "if-ekfac", "if-kfac", "arnoldi", "trak", "gex")
NOISY_SCORES = ("self", "negated-test")


def methods_help(what: str = "") -> str:
    """The help text of a `--methods` option."""
    return f"comma-separated attribution methods{what}: {', '.join(method_names())}"


@dataclass(frozen=True)
class InfluenceCommandSpec:
    """What every influence command's spec starts with: the data, model and training recipe; each spec
    ends with the methods' shared `settings` and the model's source (`checkpoint`, `weights`), so the
    command's own options come first in `--help`. Every field's declared checks are run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**CLEAN_TRAIN))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class NoisyLabelsSpec(InfluenceCommandSpec):
    """`modelsense noisy-labels`: rank training examples by each method's self-influence."""

    data: DataConfig = field(default_factory=lambda: DataConfig(corruption_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**NOISY_TRAIN))
    methods: tuple[str, ...] = option(DEFAULT_NOISY_METHODS, methods_help(), parse=names, show=joined)
    score: str = option("self", "what ranks the labels: self (self-influence) or negated-test (minus the influence on "
                                "the mean loss of clean validation examples, the GEX code's --self_influence=False; "
                                "pairwise methods)", choices=NOISY_SCORES)
    validation_size: int | None = option(None, "negated-test: the first n test examples are the validation set "
                                               "(default: the whole test set, as the GEX code)", low=1)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, source.CHECKPOINT_HELP)
    weights: str | None = option(None, source.WEIGHTS_HELP)


@dataclass(frozen=True)
class PruneSpec(InfluenceCommandSpec):
    """`modelsense prune`: remove the lowest (or highest) self-influence examples, retrain."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(**NOISY_TRAIN))
    methods: tuple[str, ...] = option(("gex", "loss", "el2n"), methods_help(), parse=names, show=joined)
    ks: tuple[int, ...] = option((), "comma-separated numbers of examples to remove (default 10-40% of N)", parse=ints,
                                 show=joined)
    remove: str = option("lowest", "lowest (as Kim et al. 2023, GEX) or highest self-influence first",
                         choices=("lowest", "highest"))
    class_balance_ratio: float = option(0.0, "fraction r of each k removed class-wise (⌊r k / classes⌋ lowest of each "
                                             "class), the rest globally (the GEX code's --class_balance_ratio)",
                                        low=0, high=1)
    iterative: bool = option(False, "rescore after each k: the next examples are removed by the self-influence of the "
                                    "model retrained without the previous ones (the GEX code's --iterative_pruning)",
                             flag="--iterative")
    n_random: int = option(3, "random-removal repeats per k", low=1)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, source.CHECKPOINT_HELP)
    weights: str | None = option(None, source.WEIGHTS_HELP)


@dataclass(frozen=True)
class LdsSpec(InfluenceCommandSpec):
    """`modelsense lds`: the linear datamodeling score of each method."""

    methods: tuple[str, ...] = option(DEFAULT_LDS_METHODS, methods_help(" (pairwise)"), parse=names, show=joined)
    n_models: int = option(50, "models trained on random subsets (ground truth)", low=3)
    alpha: float = option(0.5, "fraction of the training set in each subset")
    n_test: int | None = option(None, "first n test examples (default all)")
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    settings: MethodSettings = field(default_factory=MethodSettings)
    checkpoint: str | None = option(None, source.CHECKPOINT_HELP)
    weights: str | None = option(None, source.WEIGHTS_HELP)


@dataclass(frozen=True)
class InfluenceSpec(InfluenceCommandSpec):
    """`modelsense influence`: one method's (N, n_test) scores or self-influence."""

    method: str = option("if-ekfac", "one attribution method: " + ", ".join(method_names()))
    self_only: bool = option(False, "self-influence only (N,) instead of the (N, n_test) matrix", flag="--self")
    n_test: int | None = option(None, "first n test examples (default all)")
    top_k: int = option(5, "most helpful / harmful training examples shown per test example", low=1)
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
    checkpoint: str | None = option(None, source.CHECKPOINT_HELP)
    weights: str | None = option(None, source.WEIGHTS_HELP)


# -- shared steps -------------------------------------------------------------------------------
def attribution_model(checkpoint: str | Path | None, data_cfg: DataConfig, data: Dataset, model_cfg: ModelConfig,
                      train_cfg: TrainConfig, methods: list[str],
                      weights: str | Path | None = None) -> tuple[source.TrainedRun | None, ModelConfig, TrainConfig]:
    """(run of `checkpoint` or `weights`, model config, training config) of the model the methods score.

    Neither: (None, model_cfg, train_cfg), the model is trained here. A checkpoint: the model.pt of
    `modelsense train` (checked against `data` and `data_cfg`), its architecture, and the recipe that
    ensembles and retraining use: its run's training options (device of `train_cfg`), else
    `train_cfg`. Fails before anything is written when a method needs what the model lacks: TracIn
    the parameters at epochs of training with their learning rates, mpe after IVON/Adam the
    optimizer state.
    """
    trained = source.model_source(checkpoint, weights, data_cfg, model_cfg, data)
    if trained is None:
        return None, model_cfg, train_cfg
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


def prepare(spec: Any, methods: list[str]) -> Prepared:
    """The shared checks of the influence commands (nothing written): data, methods, settings, and
    the model's source (its recipe and what the methods need from it)."""
    data = load_dataset_from_config(spec.data)
    if not data.is_classification:
        raise ConfigError(f"influence experiments need a classification dataset; {data.name} has no classes")
    trained, model_cfg, train_cfg = attribution_model(spec.checkpoint, spec.data, data, spec.model, spec.train, methods,
                                                      spec.weights)
    if hasattr(spec, "retrain"):  # prune, lds, relabel: retraining is the engine's (sgd or adam)
        RetrainRecipe(spec.data, spec.model, spec.train)
    config = {"dataset": data.summary(), "source": None if trained is None else trained.summary()}
    if hasattr(spec, "n_test"):  # lds, influence: the first n test examples
        config["n_test"] = data.n_test if spec.n_test is None else min(int(spec.n_test), data.n_test)
    return Prepared(data, config, {"trained": trained, "model": model_cfg, "train": train_cfg, "methods": methods,
                                   "settings": spec.settings.for_methods(methods, train_cfg.loss)})


def _snapshot_epochs(methods: list[str], train: TrainConfig) -> tuple[int, ...]:
    """Epochs to snapshot in training for the TracIn methods among `methods` (none: ())."""
    tracin = any("checkpoints" in method_class(m).needs for m in methods)
    return tracin_checkpoint_epochs(train.epochs) if tracin else ()


def obtain(prepared: Prepared, run: RunDir, progress: bool) -> source.Obtained:
    """The model the methods score (trained here and saved in the run, or the checkpoint's)."""
    x = prepared.extra
    epochs = () if x["train"].checkpoint_epochs else _snapshot_epochs(x["methods"], x["train"])
    return source.obtain_model(prepared.data, x["model"], x["train"], trained=x["trained"], run=run, progress=progress,
                               checkpoint_epochs=epochs)


def _method(method: str, got: source.Obtained, prepared: Prepared, progress: bool, data: Dataset | None = None):
    """The unfitted attributor of `method`, with the shared settings and its context from the training
    of `got` (on `data`, default the prepared dataset)."""
    return method_for_run(method, prepared.extra["settings"], got.fit, got.train, got.model, data or prepared.data,
                          progress, prepared.extra["methods"])


def fit_method(method: str, got: source.Obtained, prepared: Prepared, progress: bool):
    """(fitted attributor, seconds)."""
    data, start = prepared.data, time.perf_counter()
    att = _method(method, got, prepared, progress).fit(got.module, data.x_train, data.y_train)
    return att, time.perf_counter() - start


def arrays_by_method(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{method: array} keyed as .npz names (grad-dot -> grad_dot)."""
    return {k.replace("-", "_"): v for k, v in values.items()}


# -- noisy labels -------------------------------------------------------------------------------
def check_noisy_labels(spec: NoisyLabelsSpec) -> Prepared:
    """Validate the noisy-labels options (score kind against the methods) and load the data."""
    methods = parse_methods(list(spec.methods))
    if spec.score == "self":
        check_self_influence(methods)
        if spec.validation_size is not None:
            raise ConfigError("--validation-size is the validation set of --score negated-test; drop it or pass "
                              "--score negated-test")
    else:
        check_pairwise(methods, "--score negated-test", "drop {it} or use --score self")
    if spec.data.corruption_ratio <= 0 and spec.checkpoint is not None:
        raise ConfigError(f"noisy-labels needs a model trained on corrupted labels, but checkpoint {spec.checkpoint} "
                          "was trained on clean labels (its data recipe has corruption ratio 0); train one with "
                          "`modelsense train --corruption-ratio 0.1 --checkpoint-epochs ...` and score that")
    if spec.data.corruption_ratio <= 0:
        raise ConfigError("noisy-labels needs corrupted labels: pass --corruption-ratio > 0 (e.g. 0.1)")
    prepared = prepare(spec, methods)
    data = prepared.data
    if len(data.metadata["corrupted_indices"]) == 0:
        raise ConfigError(f"--corruption-ratio {spec.data.corruption_ratio} changed no label of "
                          f"{data.n_train} examples; raise it")
    if spec.score == "negated-test":
        if (spec.validation_size or 0) > data.n_test:
            raise ConfigError(f"--validation-size {spec.validation_size} exceeds the {data.n_test} test examples")
        prepared.config["validation_size"] = spec.validation_size or data.n_test
    return prepared


def run_noisy_labels(spec: NoisyLabelsSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Rank corrupted training labels by each method's self-influence (see the module docstring)."""
    from modelsense.attribution import plots

    data, start, v = prepared.data, time.perf_counter(), prepared.config.get("validation_size")
    corrupted = data.metadata["corrupted_indices"].numpy()
    got = obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"train_accuracy": got.fit.final.get("train_accuracy"),
                               "test_accuracy": got.fit.final.get("test_accuracy"), "n_train": data.n_train,
                               "n_corrupted": int(len(corrupted)), "train_seconds": time.perf_counter() - start,
                               "auc": {}, "auc_se": {}, "ap": {}, "ap_se": {}, "seconds": {},
                               **({} if v is None else {"validation_size": v})}
    run.log(f"model: train accuracy {metrics['train_accuracy']:.4f}")
    self_scores: dict[str, np.ndarray] = {}
    for m in prepared.extra["methods"]:
        att, seconds = fit_method(m, got, prepared, progress)
        start = time.perf_counter()
        s = self_scores[m] = (att.self_scores().double().numpy() if v is None
                              else ev.negated_test_influence(att, data.x_test[:v], data.y_test[:v]))
        seconds += 0.0 if v is None else time.perf_counter() - start
        (auc, auc_se), (ap, ap_se) = ev.auc_ap_with_errors(s, corrupted, seed=got.train.seed)
        for key, value in (("auc", auc), ("auc_se", auc_se), ("ap", ap), ("ap_se", ap_se), ("seconds", seconds)):
            metrics[key][m] = value
        run.log(f"{m}: AUC {auc:.4f} ± {auc_se:.3f}, AP {ap:.4f} ± {ap_se:.3f} ({seconds:.1f}s)")
        run.save_arrays("self_influence", corrupted=corrupted, **arrays_by_method(self_scores))
        run.write_metrics(metrics)
    what = "self-influence" if v is None else "negated train-test influence"
    run.save_figure(plots.self_influence_histograms(self_scores, corrupted, what), "self_influence_histograms")
    run.save_figure(plots.detection_curves(self_scores, corrupted), "detection_curves")
    return metrics


# -- pruning ------------------------------------------------------------------------------------
def check_prune(spec: PruneSpec) -> Prepared:
    """Validate the pruning options and the budgets `--ks` (default 10-40% of N) and load the data."""
    methods = parse_methods(list(spec.methods))
    check_self_influence(methods)
    prepared = prepare(spec, methods)
    n = prepared.data.n_train
    ks = tuple(spec.ks) or tuple(int(round(f * n)) for f in (0.1, 0.2, 0.3, 0.4))
    bad = [k for k in ks if not 0 < k < n]
    if bad:
        raise ConfigError(f"--ks must lie in (0, N={n}), received {bad}")
    if spec.iterative and (len(ks) < 2 or list(ks) != sorted(set(ks))):
        raise ConfigError(f"--iterative removes more examples at each k and rescores in between: give at least two "
                          f"increasing --ks, received {list(ks)}")
    prepared.config["ks"] = list(ks)
    return prepared


def run_prune(spec: PruneSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Remove the k lowest (or highest) self-influence examples, retrain (jobs of the ground-truth
    store: `--resume` continues an interrupted retraining), compare with random removal."""
    from modelsense.attribution import plots
    from modelsense.attribution.selection import pruning_masks, random_removal_masks

    data, ks = prepared.data, prepared.config["ks"]
    got = obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"full_test_accuracy": got.fit.final.get("test_accuracy"), "ks": list(ks),
                               "remove": spec.remove, "class_balance_ratio": spec.class_balance_ratio,
                               "iterative": spec.iterative, "seconds": {}, "accuracy": {}}
    masks, self_scores = [], {}
    for m in prepared.extra["methods"]:
        att, metrics["seconds"][m] = fit_method(m, got, prepared, progress)
        self_scores[m] = att.self_scores().double().numpy()

        def rescore(keep: np.ndarray, m: str = m) -> np.ndarray:  # on the model retrained without the removed
            start = time.perf_counter()
            s = _self_scores_without(m, keep, got, prepared, progress)
            metrics["seconds"][m] += time.perf_counter() - start
            run.log(f"{m}: rescored after removing {int((~keep).sum())} examples")
            return s

        masks.append(pruning_masks(self_scores[m], ks, data.y_train.numpy(), data.num_classes, spec.class_balance_ratio,
                                   spec.remove, rescore if spec.iterative else None))
    masks.append(random_removal_masks(data.n_train, ks, spec.n_random, np.random.default_rng(got.train.seed + 99)))
    masks = np.concatenate(masks)
    recipe = RetrainRecipe(spec.data, got.model, replace(got.train, checkpoint_epochs=(), checkpoint_iterations=()))
    tables = retrain(recipe, jobs_from(masks, [got.train.seed] * len(masks)), spec.retrain, run.path, data=data,
                     progress=progress, log=run.log)
    acc = tables["test_correct"].astype(np.float64).mean(1)
    for i, m in enumerate(prepared.extra["methods"]):
        metrics["accuracy"][m] = acc[i * len(ks):(i + 1) * len(ks)].tolist()
    rand = acc[len(self_scores) * len(ks):].reshape(spec.n_random, len(ks))
    metrics["random_accuracy"], metrics["random_accuracy_std"] = rand.mean(0).tolist(), rand.std(0).tolist()
    run.save_arrays("self_influence", **arrays_by_method(self_scores))
    run.save_arrays("prune_masks", masks=masks, test_accuracy=acc)
    run.save_figure(plots.pruning_figure(ks, metrics, spec.remove + (", iterative" if spec.iterative else "")),
                    "pruning")
    return metrics


def _self_scores_without(method: str, keep: np.ndarray, got: source.Obtained, prepared: Prepared,
                         progress: bool) -> np.ndarray:
    """Self-influence of the kept examples under the model trained on them alone (the recipe and seed
    of `got`, so the model of the retraining job with mask `keep`), by `method` fitted on them."""
    data, rows = prepared.data, torch.from_numpy(np.flatnonzero(keep))
    kept = Dataset(data.name, data.x_train[rows], data.y_train[rows], data.x_test, data.y_test, data.num_classes,
                   data.source, {})
    sub = source.obtain_model(kept, got.model, got.train, progress=progress,
                              checkpoint_epochs=_snapshot_epochs([method], got.train))
    att = _method(method, sub, prepared, progress, kept).fit(sub.module, kept.x_train, kept.y_train)
    return att.self_scores().double().numpy()


# -- linear datamodeling score ----------------------------------------------------------------
def check_lds(spec: LdsSpec) -> Prepared:
    """Validate the LDS options (pairwise methods, subset size in (0, N)) and load the data."""
    methods = parse_methods(list(spec.methods))
    check_pairwise(methods, "the LDS", "drop {it} or ask for pairwise methods")
    prepared = prepare(spec, methods)
    n = prepared.data.n_train
    if not 0 < subset_size(n, spec.alpha) < n:
        raise ConfigError(f"--alpha {spec.alpha} gives subsets of {subset_size(n, spec.alpha)} of {n} examples; "
                          "choose alpha in (0, 1)")
    return prepared


def run_lds(spec: LdsSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """LDS of each method (see the module docstring); the ground truth's models are jobs of the one
    ground-truth store (`lds_ground_truth`; OUT/store unless --store), so `--resume` (or another run
    given the same --store) reuses them."""
    from modelsense.attribution import plots

    data, n_test = prepared.data, prepared.config["n_test"]
    got = obtain(prepared, run, progress)
    metrics: dict[str, Any] = {"test_accuracy": got.fit.final.get("test_accuracy"), "n_models": spec.n_models,
                               "alpha": spec.alpha, "n_test": n_test, "lds": {}, "lds_se": {}, "seconds": {}}
    all_scores, per_test = {}, {}
    for m in prepared.extra["methods"]:
        start = time.perf_counter()
        att, _ = fit_method(m, got, prepared, progress)
        all_scores[m] = att.scores(data.x_test[:n_test], data.y_test[:n_test]).double().numpy()
        metrics["seconds"][m] = time.perf_counter() - start
        run.log(f"{m}: scores in {metrics['seconds'][m]:.1f}s")
    start = time.perf_counter()
    masks, losses = ev.lds_ground_truth(spec.data, data, got.model, got.train, n_test, n_models=spec.n_models,
                                        alpha=spec.alpha, root=spec.retrain.root(run.path),
                                        retrain_options=spec.retrain, progress=progress, log=run.log)
    metrics["ground_truth_seconds"] = time.perf_counter() - start
    for m, s in all_scores.items():
        metrics["lds"][m], per_test[m] = ev.linear_datamodeling_score(s, masks, losses)
        metrics["lds_se"][m] = ev.lds_standard_error(per_test[m])
        run.log(f"{m}: LDS {metrics['lds'][m]:.4f} ± {metrics['lds_se'][m]:.4f}")
    run.save_arrays("lds_per_test", **arrays_by_method(per_test))
    run.save_figure(plots.lds_figure(metrics), "lds")
    return metrics


# -- one method's scores ----------------------------------------------------------------------
def check_influence(spec: InfluenceSpec) -> Prepared:
    """Validate the influence options (pairwise or --self, --by-module, a saved state) and load the data."""
    (method,) = parse_methods([spec.method])
    if spec.self_only:
        check_self_influence([method])
    else:
        check_pairwise([method], "influence without --self", "pass --self")
    if spec.by_module and not method_class(method).splits_by_module:
        raise ConfigError(f"--by-module: method {method!r} does not split exactly over modules (its preconditioner, "
                          "projection or ensemble mixes the parameters of different modules); choose one of "
                          f"{', '.join(by_module_names())}")
    if spec.state is not None:
        from modelsense.attribution.state import read_saved

        saved = read_saved(spec.state).get("method")
        if saved != method:
            raise ConfigError(f"--state {spec.state} holds a fitted {saved!r}, not {method!r}; pass --method {saved} "
                              "or drop --state")
        if spec.checkpoint is None and spec.weights is None:
            raise ConfigError("--state scores the model it was fitted on: pass that model as --checkpoint RUN/model.pt "
                              "or --weights")
    return prepare(spec, [method])


def run_influence(spec: InfluenceSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """One method's scores (scores.npy, memory-mapped (N, n_test)) or self-influence (self_influence.npy);
    top-k most helpful / harmful training examples per shown test example (figure for image data)."""
    from modelsense.attribution import plots

    data, n_test, top_k = prepared.data, prepared.config["n_test"], spec.top_k
    (method,) = prepared.extra["methods"]
    got = obtain(prepared, run, progress)
    start = time.perf_counter()
    if spec.state is not None:
        att = _method(method, got, prepared, progress).load(spec.state, got.module, data.x_train, data.y_train)
        fit_seconds = time.perf_counter() - start
        run.log(f"{method}: state loaded from {spec.state}")
    else:
        att, fit_seconds = fit_method(method, got, prepared, progress)
    if spec.save_state:
        att.save(run.path / "state")
    metrics: dict[str, Any] = {"method": method, "test_accuracy": got.fit.final.get("test_accuracy"),
                               "fit_seconds": fit_seconds, "state": "loaded" if spec.state else "fitted"}
    image = plots.is_image(tuple(data.input_shape))
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    parts = None
    if spec.by_module:  # the exact split, each module's share of the parameters and of the top 1%
        split = att.self_scores(by_module=True) if spec.self_only else att.scores(x_test, y_test, by_module=True)
        parts = {k: v.numpy() for k, v in split.items()}
        run.save_arrays(("self_influence" if spec.self_only else "scores") + "_by_module", **parts)
        metrics["module_params"] = {m: len(v) for m, v in att.model_.spec.modules.items()}
        shares = ev.module_shares(parts, 0.01)
        # self-influence: the highest 1% only (the lowest are the least remarkable examples, not harmful ones)
        metrics["module_share"] = {"highest self-influence": shares["helpful"]} if spec.self_only else shares
        n_params, what = sum(metrics["module_params"].values()), "self-influence" if spec.self_only else "influence"
        param_shares = {m: k / n_params for m, k in metrics["module_params"].items()}
        run.save_figure(plots.module_share_figure(metrics["module_share"], param_shares,
                                                  f"{method}: module shares of the top 1% {what}"), "module_shares")
    if spec.self_only:
        s = sum(parts.values()) if parts else att.self_scores().numpy()
        run.save_array("self_influence", s)
        order = np.argsort(-s)
        metrics.update(shape=[len(s)], top_self_influence=order[:top_k].tolist())
        if len(data.metadata.get("corrupted_indices", [])):
            metrics["auc"], metrics["ap"] = ev.auc_ap(s, data.metadata["corrupted_indices"].numpy())
        if image:
            run.save_figure(plots.image_grid(data.x_train[order[: 4 * top_k]], data.y_train[order[: 4 * top_k]],
                                             f"highest self-influence ({method})"), "top_self_influence")
    else:
        dtype = np.float64 if next(iter(att.params_.values())).dtype == torch.float64 else np.float32
        with run.memmap("scores", (data.n_train, n_test), dtype) as mm:  # named scores.npy once filled
            if parts:
                mm[:] = sum(parts.values())
            S = torch.from_numpy(np.asarray(mm)) if parts else att.scores(x_test, y_test, out=mm)
            block = S[:, :min(spec.n_show, n_test)].numpy().copy()
        helpful, harmful = ev.most_influential(block, top_k)
        metrics.update(shape=[data.n_train, n_test], top_helpful=helpful.tolist(), top_harmful=harmful.tolist())
        if image:
            run.save_figure(plots.top_k_figure(data.x_train, data.y_train, data.x_test, data.y_test, helpful, harmful,
                                               block), "top_influential")
    metrics["seconds"] = time.perf_counter() - start
    return metrics


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
LDS = Command("lds", LdsSpec, check_lds, run_lds, summary=lambda m: _table(m, ("lds", "lds_se", "seconds")),
              keep=(STORE_DIR,), resume_keys=("data", "model", "train", "n_models", "alpha", "n_test"),
              training_losses=LOSSES,
              help="Linear datamodeling score per method (ground truth: models on random α-subsets, in the "
                   "ground-truth store of --out, or --store, for --resume and other runs).")
INFLUENCE = Command("influence", InfluenceSpec, check_influence, run_influence, training_losses=LOSSES,
                    summary=lambda m: f"{m['method']}: scores of shape {m['shape']} in {m['seconds']:.1f}s",
                    help="One method's influence scores (score(i, j) ≈ rise of test loss j when training example i "
                         "is removed).")


# -- demo section -------------------------------------------------------------------------------
def noisy_labels_section(out: Path, progress: bool, resume: bool = False):
    """The demo's section: GEX vs the training loss and the squared gradient norm on digits with 10%
    corrupted labels (MLP trained to memorise the noise); histograms and AUC."""
    from modelsense.experiments.command import execute_or_reuse
    from modelsense.report import Section

    run = Path(out) / "noisy_labels"
    spec = NoisyLabelsSpec(methods=("gex", "loss", "grad-dot", "knn", "random"),
                           settings=MethodSettings(num_ens=8, ft_step=200, ft_lr=0.3))
    metrics = execute_or_reuse(NOISY_LABELS, spec, run, resume=resume, progress=progress)
    shown = {"train_accuracy": metrics["train_accuracy"], "n_corrupted": metrics["n_corrupted"],
             **{f"{name} {m}": metrics[key][m] for m in metrics["auc"]
                for name, key in (("AUC", "auc"), ("AP", "ap"), ("seconds", "seconds"))}}
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
