"""Influence experiments: `noisy-labels`, `prune`, `lds`, `influence` (and the demo's section).

Every command trains the model once (`modelsense.training.fit`, with epoch checkpoints in the second
half of training when a TracIn method is asked for) or loads it (`checkpoint=`: the model.pt of
`modelsense train`, its run's training options as the recipe of ensembles and retraining, its
checkpoint_epoch_*.pt files for TracIn; see `attribution_model`), fits each attribution method on it
(`modelsense.attribution.make_attributor`) and writes a run directory:

    noisy-labels  self-influence of every training example ranks the corrupted labels:
                  metrics `auc`, `ap`, `seconds` (objects keyed by method); self_influence.npz;
                  figures/self_influence_histograms.png, figures/detection_curves.png
    prune         remove the k lowest (or highest) self-influence examples, retrain from scratch with
                  the retraining engine (all k and methods at once), test accuracy vs random removal:
                  metrics `accuracy` {method: [per k]}, `random_accuracy` (mean over repeats)
    lds           the linear datamodeling score: M models on random α-subsets S_m (retraining engine);
                  for test example j, Spearman over m between its actual loss l_j(S_m) and the
                  prediction −Σ_{i∈S_m} score(i, j) (score = loss increase on removal, so including
                  i lowers the loss by score(i, j)); `lds` = mean over test examples, per method
    influence     one method's (N, M) scores (memory-mapped scores.npy) or self-influence, and the
                  top-k most helpful / harmful training images per test example (image data)

Method settings shared across methods (CLI options) go in one dict; each method takes what it
understands (`make_attributor(..., strict=False)`). Context the methods need from training
(TracIn checkpoints and learning rates; the TRAK / EL2N ensembles' training config and model
builder; δ as the prior precision of the Laplace-based methods) is filled in here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.attribution.evaluation import (
    auc_ap,
    auc_ap_with_errors,
    detection_curve,
    lds_standard_error,
    linear_datamodeling_score,
)
from modelsense.attribution import (
    checkpoints_from_fit,
    make_attributor,
    method_class,
    parse_methods,
    tracin_checkpoint_epochs,
)
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments import plots  # noqa: F401  (selects the Agg backend)
from modelsense.experiments.train import Recipe, TrainedRun, check_recipe, load_trained_run
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.runs import RunDir, finished_metrics
from modelsense.training.config import TrainConfig

#: training that memorises 10% label noise on digits with the MLP (train accuracy 0.999, ~10 s)
NOISY_TRAIN = {"lr": 0.1, "epochs": 200, "bs": 64, "delta": 1.0}
DEFAULT_NOISY_METHODS = "gex,loss,grad-dot,el2n,randproj,tracin-rp,if-ekfac,mpe"
DEFAULT_LDS_METHODS = "grad-dot,randproj,tracin,if-ekfac,if-kfac,arnoldi,trak,gex"
#: the cached ground truth of `lds` (kept by --resume when its key matches)
LDS_GROUND_TRUTH = "lds_ground_truth.npz"


# -- shared steps -------------------------------------------------------------------------------
def attribution_model(checkpoint: str | Path | None, data_cfg: DataConfig, data: Dataset, model_cfg: ModelConfig,
                      train_cfg: TrainConfig, methods: list[str]) -> tuple[TrainedRun | None, ModelConfig, TrainConfig]:
    """(run of `checkpoint`, model config, training config) of the model the methods score.

    No checkpoint: (None, model_cfg, train_cfg), the model is trained here. Otherwise the model.pt of
    `modelsense train` (checked against `data`), its architecture, and the recipe that ensembles and
    retraining use: its run's training options (device of `train_cfg`), else `train_cfg`. Fails
    before anything is written when `data_cfg` is not the data recipe the checkpoint was trained with,
    or when a method needs what a model.pt lacks: TracIn the parameters at epochs of training with
    their learning rates, mpe after IVON/Adam the optimizer state.
    """
    if checkpoint is None:
        return None, model_cfg, train_cfg
    trained = load_trained_run(checkpoint, data)
    check_recipe(checkpoint, Recipe(trained.data_cfg, trained.model_cfg, trained.train_cfg), data_cfg)
    recipe = trained.recipe(train_cfg)
    tracin = [m for m in methods if m.startswith("tracin")]
    epochs = [k for k in trained.snapshots if k.startswith("epoch_") and int(k.split("_")[1]) >= 1]
    if tracin and (not epochs or trained.train_cfg is None):
        lacks = (f"no checkpoint_epoch_<E>.pt files next to {trained.path}" if not epochs else
                 f"no config.json next to {trained.path} with the training options of that model (the learning rates)")
        raise ConfigError(f"{', '.join(tracin)} needs the parameters at epochs of training and their learning rates, "
                          f"but there are {lacks}; train it with `modelsense train --checkpoint-epochs E1,E2,...` "
                          "or pick another method")
    if "mpe" in methods and recipe.optimizer in ("ivon", "adam"):
        raise ConfigError(f"mpe reads the posterior of a model trained with {recipe.optimizer} from the optimizer state, "
                          f"which {trained.path} does not hold; pick another method, or drop --checkpoint to train here")
    return trained, trained.model_cfg, recipe


def train_for_attribution(data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, methods: list[str],
                          progress: bool = True, trained: TrainedRun | None = None):
    """Build and train the model; add TracIn checkpoints (second half of training) when needed.
    With `trained` (`attribution_model`): its model and snapshots as a `Fit` of `train_cfg`, no training."""
    from modelsense.training import fit

    if trained is not None:
        return trained.module, trained.as_fit(data, train_cfg), train_cfg
    if any(m.startswith("tracin") for m in methods) and not train_cfg.checkpoint_epochs:
        train_cfg = replace(train_cfg, checkpoint_epochs=tracin_checkpoint_epochs(train_cfg.epochs))
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    result = fit(module, data, train_cfg, progress=progress)
    return module, result, train_cfg


def method_context(method: str, result, train_cfg: TrainConfig, model_cfg: ModelConfig, data: Dataset) -> dict[str, Any]:
    """Settings a method takes from the training run, by what its class declares it needs
    (`method_class(method).needs`, see `modelsense.attribution.NEEDS`)."""
    needs = method_class(method).needs
    ctx: dict[str, Any] = {}
    if "checkpoints" in needs:
        ckpts, lrs = checkpoints_from_fit(result)
        ctx.update(checkpoints=ckpts, learning_rates=lrs)
    if "recipe" in needs:
        base = replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=())
        ctx.update(train_config=base,
                   model_fn=lambda s: build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=int(s)))
    if "prior_precision" in needs:
        ctx["prior_precision"] = max(train_cfg.delta, 1e-8)
    if "delta" in needs:
        ctx["delta"] = train_cfg.delta
    if "optimizer_state" in needs and train_cfg.optimizer in ("ivon", "adam"):
        ctx.update(source=train_cfg.optimizer, optimizer=result.optimizer)
    return ctx


def make_method(method: str, settings: dict[str, Any], context: dict[str, Any], progress: bool, seed: int):
    given = {k: v for k, v in settings.items() if v is not None}
    return make_attributor(method, {"seed": seed, **given, **context, "progress": progress}, strict=False)


def check_settings(methods: list[str], settings: dict[str, Any]) -> None:
    """Build each method with `settings` (no context), so a bad setting fails before anything is written."""
    for m in methods:
        make_method(m, settings, {}, progress=False, seed=0)


def _check_data_for_methods(data: Dataset, methods: list[str]) -> None:
    if not data.is_classification:
        raise ConfigError(f"influence experiments need a classification dataset; {data.name} has no classes")


def _check_self_influence(methods: list[str]) -> None:
    """Rankings by self-influence need methods whose self-score varies (not grad-cos: cos(g_i, g_i) = 1)."""
    flat = [m for m in methods if not method_class(m).informative_self]
    if flat:
        raise ConfigError(f"{', '.join(flat)} gives the same self-influence to every example (cos(g_i, g_i) = 1), "
                          "so it cannot rank training examples; use grad-dot or another method")


def _timed_fit(method, module, data, settings, context, progress, seed):
    start = time.perf_counter()
    att = make_method(method, settings, context, progress, seed).fit(module, data.x_train, data.y_train)
    return att, time.perf_counter() - start


def _base_config(data_cfg, model_cfg, train_cfg, data, methods, settings, trained=None) -> dict[str, Any]:
    return {"data": data_cfg.to_dict(), "model": asdict(model_cfg), "train": train_cfg.to_dict(),
            "dataset": data.summary(), "methods": methods,
            "settings": {k: v for k, v in settings.items() if v is not None}, "seed": train_cfg.seed,
            "checkpoint": None if trained is None else trained.summary()}


# -- noisy labels -------------------------------------------------------------------------------
def run_noisy_labels(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *,
                     methods: str | list[str] = DEFAULT_NOISY_METHODS, settings: dict[str, Any] | None = None,
                     checkpoint: str | Path | None = None, progress: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
    """Rank corrupted training labels by each method's self-influence (see the module docstring)."""
    methods = parse_methods(methods)
    _check_self_influence(methods)
    settings = dict(settings or {})
    if data_cfg.corruption_ratio <= 0 and checkpoint is not None:
        raise ConfigError(f"noisy-labels needs a model trained on corrupted labels, but checkpoint {checkpoint} was "
                          "trained on clean labels (its data recipe has corruption ratio 0); train one with "
                          "`modelsense train --corruption-ratio 0.1 --checkpoint-epochs ...` and score that")
    if data_cfg.corruption_ratio <= 0:
        raise ConfigError("noisy-labels needs corrupted labels: pass --corruption-ratio > 0 (e.g. 0.1)")
    data = load_dataset_from_config(data_cfg)
    _check_data_for_methods(data, methods)
    check_settings(methods, settings)
    corrupted = data.metadata["corrupted_indices"].numpy()
    if len(corrupted) == 0:
        raise ConfigError(f"--corruption-ratio {data_cfg.corruption_ratio} changed no label of {data.n_train} examples; raise it")
    trained, model_cfg, train_cfg = attribution_model(checkpoint, data_cfg, data, model_cfg, train_cfg, methods)
    config = _base_config(data_cfg, model_cfg, train_cfg, data, methods, settings, trained)
    with RunDir.open(out, "noisy-labels", config, overwrite=overwrite) as run:
        start = time.perf_counter()
        module, result, train_cfg = train_for_attribution(data, model_cfg, train_cfg, methods, progress, trained)
        metrics: dict[str, Any] = {"train_accuracy": result.final.get("train_accuracy"),
                                   "test_accuracy": result.final.get("test_accuracy"),
                                   "n_train": data.n_train, "n_corrupted": int(len(corrupted)),
                                   "train_seconds": time.perf_counter() - start, "auc": {}, "ap": {},
                                       "auc_se": {}, "ap_se": {}, "seconds": {}}
        run.log(f"trained: {metrics}")
        self_scores: dict[str, np.ndarray] = {}
        for m in methods:
            ctx = method_context(m, result, train_cfg, model_cfg, data)
            t0 = time.perf_counter()
            att, _ = _timed_fit(m, module, data, settings, ctx, progress, train_cfg.seed)
            s = att.self_scores().double().numpy()
            seconds = time.perf_counter() - t0
            self_scores[m] = s
            (auc, auc_se), (ap, ap_se) = auc_ap_with_errors(s, corrupted, seed=train_cfg.seed)
            metrics["auc"][m], metrics["ap"][m], metrics["seconds"][m] = auc, ap, seconds
            metrics["auc_se"][m], metrics["ap_se"][m] = auc_se, ap_se
            run.log(f"{m}: AUC {auc:.4f} AP {ap:.4f} ({seconds:.1f}s)")
            run.save_arrays("self_influence", corrupted=corrupted, **{k.replace("-", "_"): v for k, v in self_scores.items()})
            run.write_metrics(metrics)
        run.save_figure(self_influence_histograms(self_scores, corrupted), "self_influence_histograms")
        run.save_figure(detection_curves(self_scores, corrupted), "detection_curves")
        metrics["seconds_total"] = time.perf_counter() - start
        run.write_metrics(metrics)
        return metrics


def self_influence_histograms(scores: dict[str, np.ndarray], corrupted: np.ndarray):
    """One panel per method: histogram of self-influence, clean vs corrupted labels (log-spaced
    bins on the positive scores, where the GEX paper contrasts multi-modal and χ²-like shapes)."""
    import matplotlib.pyplot as plt

    n = len(scores)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        s = np.asarray(s, dtype=np.float64)
        mask = np.zeros(len(s), dtype=bool)
        mask[corrupted] = True
        pos = s[np.isfinite(s) & (s > 0)]
        if len(pos) > 0.95 * len(s) and pos.max() > 100 * np.percentile(pos, 5):
            bins = np.geomspace(np.percentile(pos, 0.5), pos.max(), 40)
            ax.set_xscale("log")
        else:
            lo, hi = np.nanpercentile(s, [0.5, 99.5])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(s[~mask], bins=bins, alpha=0.6, label="clean", color="tab:blue")
        ax.hist(s[mask], bins=bins, alpha=0.7, label="corrupted", color="tab:red")
        ax.set_title(name)
        ax.set_xlabel("self-influence")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    return fig


def detection_curves(scores: dict[str, np.ndarray], corrupted: np.ndarray):
    """Fraction of corrupted labels found vs fraction of the training set inspected (by score)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4))
    colors = plt.get_cmap("tab20").colors
    for k, (name, s) in enumerate(scores.items()):
        x, y = detection_curve(s, corrupted)
        ax.plot(x, y, label=name, color=colors[(2 * k) % 20 + (k // 10) % 2], ls=("-", "--")[(k // 10) % 2])
    frac = len(corrupted) / len(next(iter(scores.values())))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="random")
    ax.plot([0, frac, 1], [0, 1, 1], color="black", ls="--", lw=0.8, label="oracle")
    ax.set_xlim(0, min(1, 4 * frac))
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of corrupted labels found")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -- pruning ------------------------------------------------------------------------------------
def run_prune(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *,
              methods: str | list[str] = "gex,loss,el2n", ks: tuple[int, ...] = (), remove: str = "lowest",
              n_random: int = 3, settings: dict[str, Any] | None = None, checkpoint: str | Path | None = None,
              progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Remove the k lowest (or highest) self-influence examples, retrain, compare with random removal."""
    from modelsense.training import train_ensemble

    methods = parse_methods(methods)
    _check_self_influence(methods)
    settings = dict(settings or {})
    if remove not in ("lowest", "highest"):
        raise ConfigError(f"--remove must be lowest or highest, received {remove!r}")
    data = load_dataset_from_config(data_cfg)
    _check_data_for_methods(data, methods)
    check_settings(methods, settings)
    n = data.n_train
    ks = tuple(int(k) for k in ks) or tuple(int(round(f * n)) for f in (0.1, 0.2, 0.3, 0.4))
    bad = [k for k in ks if not 0 < k < n]
    if bad:
        raise ConfigError(f"--ks must lie in (0, N={n}), received {bad}")
    if n_random < 1:
        raise ConfigError(f"--n-random must be >= 1, received {n_random}")
    trained, model_cfg, train_cfg = attribution_model(checkpoint, data_cfg, data, model_cfg, train_cfg, methods)
    config = {**_base_config(data_cfg, model_cfg, train_cfg, data, methods, settings, trained),
              "ks": list(ks), "remove": remove, "n_random": n_random}
    with RunDir.open(out, "prune", config, overwrite=overwrite) as run:
        start = time.perf_counter()
        module, result, train_cfg = train_for_attribution(data, model_cfg, train_cfg, methods, progress, trained)
        metrics: dict[str, Any] = {"full_test_accuracy": result.final.get("test_accuracy"), "ks": list(ks), "remove": remove,
                                   "seconds": {}, "accuracy": {}}
        masks, labels = [], []
        self_scores = {}
        for m in methods:
            ctx = method_context(m, result, train_cfg, model_cfg, data)
            t0 = time.perf_counter()
            att, _ = _timed_fit(m, module, data, settings, ctx, progress, train_cfg.seed)
            s = att.self_scores().double().numpy()
            metrics["seconds"][m] = time.perf_counter() - t0
            self_scores[m] = s
            order = np.argsort(s if remove == "lowest" else -s, kind="stable")
            for k in ks:
                keep = np.ones(n, dtype=bool)
                keep[order[:k]] = False
                masks.append(keep)
                labels.append((m, k))
        rng = np.random.default_rng(train_cfg.seed + 99)
        for r in range(n_random):
            for k in ks:
                keep = np.ones(n, dtype=bool)
                keep[rng.choice(n, size=k, replace=False)] = False
                masks.append(keep)
                labels.append(("random", k))
        cfg = replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=())
        res = train_ensemble(lambda s: build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=int(s)),
                             data.x_train, data.y_train, torch.from_numpy(np.stack(masks)), cfg,
                             seeds=[train_cfg.seed] * len(masks), queries={"test": (data.x_test, data.y_test)},
                             keep_logits=False, progress=progress)
        acc = res.outputs["test"]["correct"].double().mean(1).numpy()
        for m in methods:
            metrics["accuracy"][m] = [float(a) for (mm, _), a in zip(labels, acc) if mm == m]
        rand = np.array([a for (mm, _), a in zip(labels, acc) if mm == "random"]).reshape(n_random, len(ks))
        metrics["random_accuracy"] = rand.mean(0).tolist()
        metrics["random_accuracy_std"] = rand.std(0).tolist()
        metrics["seconds_total"] = time.perf_counter() - start
        run.save_arrays("self_influence", **{k.replace("-", "_"): v for k, v in self_scores.items()})
        run.save_arrays("prune_masks", masks=np.stack(masks), test_accuracy=acc)
        run.save_figure(pruning_figure(ks, metrics, remove), "pruning")
        run.write_metrics(metrics)
        return metrics


def pruning_figure(ks, metrics: dict[str, Any], remove: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for m, acc in metrics["accuracy"].items():
        ax.plot(ks, acc, marker="o", label=m)
    mean, std = np.array(metrics["random_accuracy"]), np.array(metrics["random_accuracy_std"])
    ax.errorbar(ks, mean, yerr=std, color="grey", ls=":", marker="s", label="random")
    if metrics.get("full_test_accuracy") is not None:
        ax.axhline(metrics["full_test_accuracy"], color="black", lw=0.8, ls="--", label="all data")
    ax.set_xlabel(f"training examples removed ({remove} self-influence first)")
    ax.set_ylabel("test accuracy after retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -- linear datamodeling score ----------------------------------------------------------------
def lds_ground_truth(data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, x_test, y_test, *, n_models: int,
                     alpha: float, seed: int, chunk_models: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(masks (M, N) bool, test losses (M, n_test)) of M models trained from scratch on random α-subsets."""
    from modelsense.training import train_ensemble

    n = data.n_train
    k = int(round(alpha * n))
    if not 0 < k < n:
        raise ConfigError(f"--alpha {alpha} gives subsets of {k} of {n} examples; choose alpha in (0, 1)")
    rng = np.random.default_rng(seed + 4242)
    masks = np.zeros((n_models, n), dtype=bool)
    for m in range(n_models):
        masks[m, rng.choice(n, size=k, replace=False)] = True
    cfg = replace(train_cfg, checkpoint_epochs=(), checkpoint_iterations=())
    res = train_ensemble(lambda s: build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=int(s)),
                         data.x_train, data.y_train, torch.from_numpy(masks), cfg,
                         seeds=[seed + 10_000 + m for m in range(n_models)], queries={"test": (x_test, y_test)},
                         keep_logits=False, chunk_models=chunk_models, progress=progress)
    return masks, res.outputs["test"]["loss"].double().numpy()


def run_lds(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *,
            methods: str | list[str] = DEFAULT_LDS_METHODS, n_models: int = 50, alpha: float = 0.5,
            n_test: int | None = None, chunk_models: int | None = None, settings: dict[str, Any] | None = None,
            checkpoint: str | Path | None = None, progress: bool = True, resume: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
    """LDS of each method (see the module docstring); the ground truth is cached in the run
    directory (`lds_ground_truth.npz`); `resume` keeps it and reuses it when data, model, training, M, α
    and n_test match (other methods may be scored)."""
    methods = parse_methods(methods)
    settings = dict(settings or {})
    for m in methods:
        if not method_class(m).pairwise:
            raise ConfigError(f"method {m!r} has a self-influence only; the LDS needs pairwise scores")
    if n_models < 3:
        raise ConfigError(f"--n-models must be >= 3 for a rank correlation, received {n_models}")
    data = load_dataset_from_config(data_cfg)
    if not 0 < int(round(alpha * data.n_train)) < data.n_train:
        raise ConfigError(f"--alpha {alpha} gives subsets of {int(round(alpha * data.n_train))} of {data.n_train} "
                          "examples; choose alpha in (0, 1)")
    _check_data_for_methods(data, methods)
    check_settings(methods, settings)
    n_test = data.n_test if n_test is None else min(int(n_test), data.n_test)
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    trained, model_cfg, train_cfg = attribution_model(checkpoint, data_cfg, data, model_cfg, train_cfg, methods)
    gt_key = {"data": data_cfg.to_dict(), "model": asdict(model_cfg),
              "train": replace(train_cfg, checkpoint_epochs=()).to_dict(), "n_models": n_models, "alpha": alpha, "n_test": n_test}
    config = {**_base_config(data_cfg, model_cfg, train_cfg, data, methods, settings, trained),
              "n_models": n_models, "alpha": alpha, "n_test": n_test}
    with RunDir.open(out, "lds", config, resume=resume, overwrite=overwrite, keep=(LDS_GROUND_TRUTH,),
                     resume_keys=("data", "model", "train", "n_models", "alpha", "n_test")) as run:
        start = time.perf_counter()
        module, result, train_cfg = train_for_attribution(data, model_cfg, train_cfg, methods, progress, trained)
        metrics: dict[str, Any] = {"test_accuracy": result.final.get("test_accuracy"), "n_models": n_models, "alpha": alpha,
                                   "n_test": n_test, "lds": {}, "lds_se": {}, "seconds": {}}
        all_scores = {}
        for m in methods:
            ctx = method_context(m, result, train_cfg, model_cfg, data)
            t0 = time.perf_counter()
            att, _ = _timed_fit(m, module, data, settings, ctx, progress, train_cfg.seed)
            all_scores[m] = att.scores(x_test, y_test).double().numpy()
            metrics["seconds"][m] = time.perf_counter() - t0
            run.log(f"{m}: scores in {metrics['seconds'][m]:.1f}s")
        gt_path = run.path / LDS_GROUND_TRUTH
        cached = None
        if gt_path.exists():
            import json

            with np.load(gt_path) as f:
                if json.loads(str(f["key"])) == json.loads(json.dumps(gt_key, default=str)):
                    cached = (f["masks"], f["losses"])
        t0 = time.perf_counter()
        if cached is None:
            import json

            masks, losses = lds_ground_truth(data, model_cfg, train_cfg, x_test, y_test, n_models=n_models, alpha=alpha,
                                             seed=train_cfg.seed, chunk_models=chunk_models, progress=progress)
            run.save_arrays(LDS_GROUND_TRUTH, masks=masks, losses=losses, key=np.array(json.dumps(gt_key, default=str)))
        else:
            masks, losses = cached
            run.log("reused the cached ground truth")
        metrics["ground_truth_seconds"] = time.perf_counter() - t0
        per_test = {}
        for m, s in all_scores.items():
            metrics["lds"][m], per_test[m] = linear_datamodeling_score(s, masks, losses)
            metrics["lds_se"][m] = lds_standard_error(per_test[m])
            run.log(f"{m}: LDS {metrics['lds'][m]:.4f}")
        run.save_arrays("lds_per_test", **{k.replace("-", "_"): v for k, v in per_test.items()})
        run.save_figure(lds_figure(metrics), "lds")
        metrics["seconds_total"] = time.perf_counter() - start
        run.write_metrics(metrics)
        return metrics


def lds_figure(metrics: dict[str, Any]):
    import matplotlib.pyplot as plt

    names = list(metrics["lds"])
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 1.5), 3.6))
    ax.bar(names, [metrics["lds"][n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(i, metrics["lds"][n], f"{metrics['lds'][n]:.3f}\n{metrics['seconds'][n]:.1f}s", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(f"LDS (α = {metrics['alpha']}, {metrics['n_models']} models)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


# -- one method's scores ----------------------------------------------------------------------
def run_influence(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *,
                  method: str = "if-ekfac", self_only: bool = False, n_test: int | None = None, top_k: int = 5,
                  n_show: int = 6, settings: dict[str, Any] | None = None, checkpoint: str | Path | None = None,
                  progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """One method's scores (scores.npy, memory-mapped (N, n_test)) or self-influence (self_influence.npy);
    top-k most helpful / harmful training examples per shown test example (figure for image data)."""
    (method,) = parse_methods([method])
    settings = dict(settings or {})
    if not self_only and not method_class(method).pairwise:
        raise ConfigError(f"method {method!r} has a self-influence only; pass --self")
    if self_only:
        _check_self_influence([method])
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, received {top_k}")
    data = load_dataset_from_config(data_cfg)
    _check_data_for_methods(data, [method])
    check_settings([method], settings)
    n_test = data.n_test if n_test is None else min(int(n_test), data.n_test)
    trained, model_cfg, train_cfg = attribution_model(checkpoint, data_cfg, data, model_cfg, train_cfg, [method])
    config = {**_base_config(data_cfg, model_cfg, train_cfg, data, [method], settings, trained),
              "self": self_only, "n_test": n_test, "top_k": top_k}
    with RunDir.open(out, "influence", config, overwrite=overwrite) as run:
        start = time.perf_counter()
        module, result, train_cfg = train_for_attribution(data, model_cfg, train_cfg, [method], progress, trained)
        ctx = method_context(method, result, train_cfg, model_cfg, data)
        t0 = time.perf_counter()
        att, fit_seconds = _timed_fit(method, module, data, settings, ctx, progress, train_cfg.seed)
        metrics: dict[str, Any] = {"method": method, "test_accuracy": result.final.get("test_accuracy"),
                                   "fit_seconds": fit_seconds}
        if self_only:
            s = att.self_scores().numpy()
            run.save_array("self_influence", s)
            order = np.argsort(-s)
            metrics.update(shape=[len(s)], top_self_influence=order[:top_k].tolist())
            if len(data.metadata.get("corrupted_indices", [])):
                metrics["auc"], metrics["ap"] = auc_ap(s, data.metadata["corrupted_indices"].numpy())
            if _is_image(data):
                run.save_figure(image_grid(data.x_train[order[: 4 * top_k]], data.y_train[order[: 4 * top_k]],
                                           f"highest self-influence ({method})"), "top_self_influence")
        else:
            dtype = np.float64 if next(iter(att.params_.values())).dtype == torch.float64 else np.float32
            shown = min(n_show, n_test)
            with run.memmap("scores", (data.n_train, n_test), dtype) as mm:  # named scores.npy once filled
                S = att.scores(data.x_test[:n_test], data.y_test[:n_test], out=mm)
                block = S[:, :shown].numpy().copy()
            helpful = np.argsort(-block, axis=0)[:top_k].T
            harmful = np.argsort(block, axis=0)[:top_k].T
            metrics.update(shape=[data.n_train, n_test], top_helpful=helpful.tolist(), top_harmful=harmful.tolist())
            if _is_image(data):
                run.save_figure(top_k_figure(data, helpful, harmful, block), "top_influential")
        metrics["seconds"] = time.perf_counter() - t0
        metrics["seconds_total"] = time.perf_counter() - start
        run.write_metrics(metrics)
        return metrics


def _is_image(data: Dataset) -> bool:
    s = data.input_shape
    return len(s) == 3 and s[0] in (1, 3)


def _show(ax, x, title: str) -> None:
    img = x.detach().cpu().float()
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    lo, hi = float(img.min()), float(img.max())
    ax.imshow(((img - lo) / (hi - lo + 1e-12)).numpy(), cmap="gray" if img.ndim == 2 else None)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def image_grid(x, y, title: str):
    import matplotlib.pyplot as plt

    n = len(x)
    cols = min(10, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, xi, yi in zip(axes.flat, x, y):
        _show(ax, xi, f"label {int(yi)}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def top_k_figure(data: Dataset, helpful: np.ndarray, harmful: np.ndarray, block: np.ndarray):
    """Rows: test examples; columns: the test image, its top-k helpful, then top-k harmful training images."""
    import matplotlib.pyplot as plt

    rows, k = helpful.shape
    fig, axes = plt.subplots(rows, 1 + 2 * k, figsize=(1.05 * (1 + 2 * k), 1.2 * rows + 0.3), squeeze=False)
    for j in range(rows):
        _show(axes[j, 0], data.x_test[j], f"test {j}: y={int(data.y_test[j])}")
        for c, i in enumerate(helpful[j]):
            _show(axes[j, 1 + c], data.x_train[i], f"+{block[i, j]:.2g} y={int(data.y_train[i])}")
        for c, i in enumerate(harmful[j]):
            _show(axes[j, 1 + k + c], data.x_train[i], f"{block[i, j]:.2g} y={int(data.y_train[i])}")
    fig.suptitle("test example | most helpful (score > 0) | most harmful (score < 0)", fontsize=9)
    fig.tight_layout()
    return fig


# -- demo section -------------------------------------------------------------------------------
def noisy_labels_section(out: Path, progress: bool, resume: bool = False):
    """The demo's section: GEX vs the training loss and the squared gradient norm on digits with 10%
    corrupted labels (MLP trained to memorise the noise); histograms and AUC."""
    from modelsense.experiments.report import Section

    run = Path(out) / "noisy_labels"
    settings = {"num_ens": 8, "ft_step": 200, "ft_lr": 0.3}
    metrics = (resume and finished_metrics(run)) or run_noisy_labels(
        DataConfig("digits", corruption_ratio=0.1), ModelConfig("mlp"), TrainConfig(**NOISY_TRAIN), run,
        methods="gex,loss,grad-dot", settings=settings, progress=progress, overwrite=True)
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
        "members of 200 SGD steps with cosine lr from 0.3, covariance of the loss deviations), the training loss and the squared gradient norm "
        "(grad-dot). AUC / AP of ranking the corrupted labels first; histograms of the self-influence of clean "
        "and corrupted examples.",
        shown,
        [run / "figures" / "self_influence_histograms.png", run / "figures" / "detection_curves.png"],
        str(run),
    )
