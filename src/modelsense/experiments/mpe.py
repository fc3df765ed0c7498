"""`modelsense mpe ...`: the five experiments of Nickl et al. 2023, "The Memory Perturbation Equation" (NeurIPS).

    loo-iterations  LOO-CV estimate at checkpoints during training vs the test NLL per epoch (Fig. 1b/5)
    loo-l2reg       LOO-CV estimate and test NLL over a grid of prior precisions δ (Fig. 4)
    validation      estimated vs true softmax deviation when one example is removed (Fig. 2)
    evolving        sensitivities at several iterations of IVON training, ranked and binned (Fig. 3b/11)
    loco            leave-one-class-out: estimated vs true test NLL after retraining without a class (Fig. 3a)
    loco-overlay    finished loco runs (e.g. an MLP's and a LeNet's) in one figure (Fig. 3a)

The numbers come from `modelsense.mpe` (`predictive`, `evaluation`, `ground_truth`; its docstring lists
where they differ from the original code), the figures from `modelsense.mpe.plots`; this module runs them
into run directories. The defaults run on `digits` in minutes on a CPU; the original's hyper-parameters
(e.g. `--dataset fmnist --model lenet --epochs 300 --delta 100 --bs 256 --device cuda`) give the paper's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute_or_reuse
from modelsense.experiments.source import CHECKPOINT_HELP, TrainedRun, check_checkpoint, obtain_model
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.mpe import LAPLACE_STRUCTURES, VARIANTS, MPESettings, evaluation, ground_truth, predictive
from modelsense.options import check_fields, ints, joined, names, option
from modelsense.report import Section
from modelsense.retraining.store import STORE_DIR, RetrainOptions, RetrainRecipe
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig
from modelsense.training.recorder import OptimizerStateRecorder

EXPERIMENTS = ("loo-iterations", "loo-l2reg", "validation", "evolving", "loco")
PAPER_CHECKPOINT_EPOCHS = (1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300)


@dataclass(frozen=True)
class MPEExperimentConfig:
    """Settings of the MPE experiments (flag names of the original scripts, with dashes).

    Posterior: `--optim-var` reads it from the optimizer (IVON: σ² = 1/(N h + δ); Adam:
    1/(N sqrt(v) + δ)); otherwise a Laplace GGN posterior at the trained parameters with structure
    `var_version` (diag | kfac | full | ekfac) and prior precision δ = train.delta.
    Retraining (validation, loco): warm start from the trained parameters, SGD with momentum,
    cosine lr_retrain -> lrmin_retrain over epochs_retrain, batch size bs_retrain (default train.bs).
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig("mlp"))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer="sgd", lr=0.05, lrmin=0.0, epochs=100, bs=64, delta=10.0)
    )
    optim_var: bool = option(False, "posterior from the optimizer state (IVON: 1/(N h + δ), Adam: 1/(N sqrt(v) + δ)) "
                                    "instead of Laplace", flag="--optim-var/--no-optim-var")
    var_version: str = option("kfac", "Laplace GGN structure: kfac, diag, full (small models), ekfac",
                              choices=LAPLACE_STRUCTURES)
    bs_jacs: int = option(500, "examples per chunk of predictive covariances (memory bound)", low=1)
    mpe_variant: str = option("full", "full (C x C, default), diag (Nickl et al. 2023's code), loo (Sherman-Morrison; "
                                      "for exact posteriors)", choices=VARIANTS)
    loo_damping: float = option(1.0, "α of the loo variant: Δf = (I − α V Λ)^-1 V e (1 plain, 0 = full)", low=0, high=1)
    n_retrain: int = option(200, "examples to retrain without", low=1)
    epochs_retrain: int = option(10, "epochs of the warm-started retraining")
    lr_retrain: float = option(0.01, "initial learning rate of the retraining")
    lrmin_retrain: float = option(0.0, "final learning rate of the retraining's cosine schedule")
    bs_retrain: int | None = option(None, "batch size of retraining (default: --bs)")
    truth: str = option("warm", "validation's ground truth: warm (retrain from the trained parameters with the "
                                "--*-retrain options, as Nickl et al. 2023) or scratch (train each leave-one-out "
                                "model from the initialisation with the training recipe; the --*-retrain options "
                                "are unused)", choices=("warm", "scratch"))
    reference: str = option("control", "true deviation against the control model retrained on all data (control) or "
                                       "against the trained model (trained, as Nickl et al. 2023's code)",
                            choices=("control", "trained"))
    checkpoint_epochs: tuple[int, ...] = option(PAPER_CHECKPOINT_EPOCHS, "comma-separated epochs at which to estimate "
                                                "(default: the MPE code's 1,2,5,10,20,30,... up to --epochs)",
                                                parse=ints, show=joined)
    n_exp: int = option(8, "number of δ values", low=1)
    deltas_start: float = option(-1.0, "δ = logspace(start, stop, n_exp)")
    deltas_stop: float = option(3.0, "δ = logspace(start, stop, n_exp)")
    smooth: int = option(1, "loo-l2reg: moving-average window over the δ grid for the figure and the smoothed best δ "
                            "(Nickl et al. 2023's code: 4; 1 = none)")
    checkpoint_iterations: tuple[int, ...] = option((), "comma-separated optimizer steps (default: 10, 10%, 40%, 100% "
                                                    "of training)", parse=ints, show=joined, low=1)
    mc_samples: int = option(150, "Monte-Carlo samples of the residual", low=1)
    n_bins: int = option(100, "bins of the ranking", low=1)
    n_show: int = 16
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    checkpoint: str | None = option(None, CHECKPOINT_HELP + " (a Laplace posterior: the "
                                          "optimizer state is not in model.pt)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.optim_var and self.train.optimizer not in ("ivon", "adam"):
            raise ConfigError(
                f"--optim-var reads the posterior from the optimizer state, which needs --optimizer ivon or adam "
                f"(received {self.train.optimizer!r}); drop --optim-var for a Laplace posterior"
            )
        if not self.optim_var and not self.train.delta > 0:
            raise ConfigError(f"a Laplace posterior needs a prior precision --delta > 0, received {self.train.delta}")
        if self.optim_var and self.train.optimizer == "adam" and not self.train.delta > 0:
            raise ConfigError(f"the Adam posterior needs --delta > 0, received {self.train.delta}")
        try:  # TrainConfig checks the retraining options
            self.retrain_config()
        except ConfigError as exc:
            raise ConfigError(f"bad retraining option: {exc} (the retraining's lr, lrmin, epochs, bs are --lr-retrain, "
                              "--lrmin-retrain, --epochs-retrain, --bs-retrain)") from None
        if not 1 <= int(self.smooth) <= int(self.n_exp):
            raise ConfigError(f"--smooth must lie in [1, --n-exp = {self.n_exp}], received {self.smooth}")
        if self.deltas_stop < self.deltas_start:
            raise ConfigError(f"--deltas-stop ({self.deltas_stop}) must be >= --deltas-start ({self.deltas_start})")
        for name in ("checkpoint_epochs", "checkpoint_iterations"):
            object.__setattr__(self, name, tuple(sorted({int(e) for e in getattr(self, name)})))

    @property
    def settings(self) -> MPESettings:
        return MPESettings(self.mpe_variant, self.loo_damping)

    @property
    def posterior_name(self) -> str:
        return self.train.optimizer if self.optim_var else f"laplace-{self.var_version}"

    @property
    def posterior_options(self) -> dict[str, Any]:
        """The posterior the flags select, as `mpe.predictive.posterior_at`'s settings."""
        return {"source": self.train.optimizer if self.optim_var else "laplace", "prior_precision": self.train.delta,
                "structure": self.var_version, "chunk_size": self.bs_jacs}

    def retrain_config(self) -> TrainConfig:
        t = self.train
        return TrainConfig(optimizer="sgd", lr=self.lr_retrain, lrmin=self.lrmin_retrain, epochs=self.epochs_retrain,
                           bs=t.bs if self.bs_retrain is None else self.bs_retrain, delta=t.delta, momentum=t.momentum,
                           seed=t.seed, device=t.device, fixed_batches=t.fixed_batches, eval_every=0)

    def truth_config(self, trained: TrainedRun | None = None) -> TrainConfig:
        """The recipe of the ground-truth models: `retrain_config()` (warm), or the training recipe (scratch:
        the checkpoint's where one is studied) without evaluations or snapshots."""
        if self.truth == "warm":
            return self.retrain_config()
        recipe = self.train if trained is None else trained.recipe(self.train)
        return replace(recipe, eval_every=0, checkpoint_epochs=(), checkpoint_iterations=())


_SGD = {"optimizer": "sgd", "lr": 0.05, "lrmin": 0.0, "bs": 64, "delta": 10.0}
_RETRAIN_40 = {"epochs_retrain": 40, "lr_retrain": 0.1, "lrmin_retrain": 0.0, "bs_retrain": 64}
#: CPU defaults on digits per experiment (what the CLI shows); everything else as in MPEExperimentConfig.
DEFAULTS: dict[str, dict[str, Any]] = {
    "loo-iterations": {"train": {**_SGD, "epochs": 50}},
    "loo-l2reg": {"train": {**_SGD, "epochs": 50}, "n_exp": 8, "deltas_start": -1.0, "deltas_stop": 2.5},
    "validation": {"train": {**_SGD, "epochs": 100}, "n_retrain": 200, **_RETRAIN_40},
    "evolving": {"train": {**_SGD, "optimizer": "ivon", "lr": 0.3, "epochs": 30, "hess_init": 1.0}, "optim_var": True},
    "loco": {"train": {**_SGD, "epochs": 100}, **_RETRAIN_40},
}


def spec_class(experiment: str) -> type:
    """The spec of `mpe <experiment>`: MPEExperimentConfig with the experiment's defaults (`DEFAULTS`)."""
    defaults = DEFAULTS[experiment]
    fields_ = [("train", TrainConfig, field(default_factory=lambda t=dict(defaults["train"]): TrainConfig(**t)))]
    fields_ += [(f.name, f.type, field(default=defaults[f.name], metadata=f.metadata))
                for f in dataclasses.fields(MPEExperimentConfig) if f.name in defaults and f.name != "train"]
    name = "".join(w.capitalize() for w in experiment.split("-")) + "Spec"
    return dataclasses.make_dataclass(name, fields_, bases=(MPEExperimentConfig,), frozen=True)


def default_config(experiment: str, **overrides: Any) -> MPEExperimentConfig:
    """The spec of `mpe <experiment>` (its CPU defaults) with `overrides` (fields; `train` may be a dict)."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown MPE experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
    if isinstance(overrides.get("train"), dict):
        overrides["train"] = TrainConfig(**{**DEFAULTS[experiment]["train"], **overrides["train"]})
    return COMMANDS[experiment].spec(**overrides)


# --- shared steps ----------------------------------------------------------------------------
def _model_fn(cfg: MPEExperimentConfig, data: Dataset):
    return lambda seed: build_model_from_config(cfg.model, data.input_shape, data.num_classes, seed=seed)


def _obtain(cfg: MPEExperimentConfig, prepared: Prepared, progress: bool, iterations: tuple[int, ...] = (),
            train: TrainConfig | None = None, on_epoch=None):
    """The model (`obtain_model`: trained with the optimizer state recorded at `iterations`, `on_epoch(epoch,
    row, recorder)` after each epoch; or the checked checkpoint of `check`) and the recorder."""
    recorder = OptimizerStateRecorder(iterations=iterations)
    got = obtain_model(prepared.data, cfg.model, train or cfg.train, trained=prepared.extra.get("trained"),
                       progress=progress, setup=recorder.watch,
                       on_epoch=on_epoch and (lambda epoch, row: on_epoch(epoch, row, recorder)))
    return got, recorder


def _posterior(cfg: MPEExperimentConfig, module, data: Dataset, optimizer=None):
    return predictive.posterior_at(module, data.x_train, data.y_train, optimizer=optimizer, **cfg.posterior_options)


def _ground_truth(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, module, removed, progress: bool,
                  truth_cfg: TrainConfig, left: int, consequence: str, remedy: str):
    """`retrain_without_in_store` with the recipe `truth_cfg`, warm-started from the module's parameters unless
    `--truth scratch`, and the relaxation R of SGD retraining on `left` examples (None for another optimizer;
    a warning in the log below MIN_RELAXATION): (tables, seconds, R)."""
    relaxation = None
    if truth_cfg.optimizer == "sgd":
        relaxation = ground_truth.retraining_relaxation(truth_cfg, left)
        if relaxation < ground_truth.MIN_RELAXATION:
            run.log(f"warning: the retraining relaxes the slowest directions by only R = {relaxation:.2f} e-folds (< "
                    f"{ground_truth.MIN_RELAXATION}): {consequence}; raise {remedy}")
    params = {k: v.detach().cpu() for k, v in module.named_parameters()} if cfg.truth == "warm" else None
    start = time.perf_counter()
    tables = ground_truth.retrain_without_in_store(
        ground_truth.mpe_recipe(cfg.data, cfg.model, truth_cfg, params), prepared.data, removed, cfg.retrain, run.path,
        init_params=params, progress=progress, log=run.log)
    return tables, time.perf_counter() - start, relaxation


def _converged(relaxation: float | None) -> dict[str, Any]:
    return {"retrain_relaxation": relaxation,
            "ground_truth_converged": None if relaxation is None else relaxation >= ground_truth.MIN_RELAXATION}


# --- the five experiments ------------------------------------------------------------------------
def run_loo_iterations(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, progress: bool) -> dict[str, Any]:
    """Train; at the checkpoint epochs (and the last) estimate the LOO-CV NLL with the MPE. metrics:
    `estimated_nll` and `test_nll` at them, `final_abs_gap` = |estimated − test| at the last, `test_nll_per_epoch`."""
    from modelsense.mpe import plots

    data, start = prepared.data, time.perf_counter()
    marks = sorted({e for e in cfg.checkpoint_epochs if 1 <= e <= cfg.train.epochs} | {cfg.train.epochs})
    est: dict[int, dict[str, float]] = {}

    def on_epoch(epoch, row, recorder):
        if epoch in marks:
            post = _posterior(cfg, recorder.module.eval(), data, recorder.optimizer)
            variants = predictive.loo_estimates(post, data.x_train, data.y_train, cfg.bs_jacs, cfg.loo_damping)[2]
            est[epoch] = {v: r.estimated_loo_nll for v, r in variants.items()}
            recorder.module.train()
            run.log(f"epoch {epoch}: estimated LOO NLL {est[epoch][cfg.mpe_variant]:.4f}, "
                    f"test NLL {row['test_loss']:.4f}")

    got, _ = _obtain(cfg, prepared, progress, train=replace(cfg.train, eval_every=1), on_epoch=on_epoch)
    hist = got.fit.history
    test_by_epoch = dict(zip(hist["epoch"], hist["test_loss"]))
    estimated, test = [est[e][cfg.mpe_variant] for e in marks], [test_by_epoch[e] for e in marks]
    run.save_arrays("loo_iterations", epochs=np.array(hist["epoch"]), test_nll=np.array(hist["test_loss"]),
                    train_nll=np.array(hist["train_loss"]), checkpoint_epochs=np.array(marks),
                    estimated_nll=np.array(estimated))
    title = f"{cfg.model.name} on {data.name}, {cfg.posterior_name}"
    run.save_figure(plots.plot_loo_iterations(hist["epoch"], hist["test_loss"], marks, estimated, title),
                    "loo_iterations")
    return {"checkpoint_epochs": marks, "estimated_nll": estimated, "test_nll": test,
            "final_abs_gap": abs(estimated[-1] - test[-1]), "posterior": cfg.posterior_name,
            "mpe_variant": cfg.mpe_variant,
            "estimated_nll_by_variant": {v: [est[e][v] for e in marks] for v in VARIANTS},
            "test_nll_per_epoch": hist["test_loss"], **{f"final_{k}": v for k, v in got.fit.final_metrics.items()},
            "seconds": time.perf_counter() - start}


def run_loo_l2reg(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, progress: bool) -> dict[str, Any]:
    """`mpe.evaluation.loo_nll_over_deltas` for δ in logspace(deltas_start, deltas_stop, n_exp); with `--smooth w`
    > 1 also `smoothed` (`smoothed_best_deltas`), which the figure draws (Nickl et al. 2023's code: w = 4)."""
    from modelsense.mpe import plots

    deltas, start = np.logspace(cfg.deltas_start, cfg.deltas_stop, cfg.n_exp), time.perf_counter()
    metrics = evaluation.loo_nll_over_deltas(
        _model_fn(cfg, prepared.data), prepared.data, cfg.train, deltas, structure=cfg.var_version,
        chunk_size=cfg.bs_jacs, variant=cfg.mpe_variant, loo_damping=cfg.loo_damping, progress=progress, log=run.log)
    metrics |= {"posterior": cfg.posterior_name, "mpe_variant": cfg.mpe_variant, "smooth": cfg.smooth,
                "seconds": time.perf_counter() - start}
    curves = ("deltas", "estimated_nll", "test_nll")
    arrays = {k: np.array(metrics[k]) for k in curves}
    if cfg.smooth > 1:
        metrics["smoothed"] = evaluation.smoothed_best_deltas(deltas, metrics["estimated_nll"], metrics["test_nll"],
                                                              cfg.smooth)
        arrays |= {f"smoothed_{k}": np.array(metrics["smoothed"][k]) for k in curves}
    run.save_arrays("loo_l2reg", **arrays)
    run.save_figure(plots.plot_loo_l2reg(deltas, metrics["estimated_nll"], metrics["test_nll"],
                                         f"{cfg.model.name} on {prepared.data.name}", window=cfg.smooth), "loo_l2reg")
    return metrics


def run_validation(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, progress: bool) -> dict[str, Any]:
    """`mpe.evaluation.validation_metrics` for n_retrain examples, the truth retrained without each (warm, or
    `--truth scratch`: `truth_config`), and `retrain_relaxation` R: below MIN_RELAXATION
    (`ground_truth_converged` false) the true deviations, and all measured against them, are too small."""
    from modelsense.mpe import plots

    data, start = prepared.data, time.perf_counter()
    got, _ = _obtain(cfg, prepared, progress)
    t_train, t0 = time.perf_counter() - start, time.perf_counter()
    post = _posterior(cfg, got.module, data, got.fit.optimizer)
    logits, V, variants = predictive.loo_estimates(post, data.x_train, data.y_train, cfg.bs_jacs, cfg.loo_damping)
    t_mpe = time.perf_counter() - t0
    idx = torch.as_tensor(evaluation.retrain_indices(data.n_train, cfg.n_retrain))
    tables, t_retrain, relaxation = _ground_truth(
        cfg, prepared, run, got.module, idx, progress, cfg.truth_config(prepared.extra["trained"]), data.n_train - 1,
        "the true deviations are underestimated", "--epochs-retrain or --lr-retrain" if cfg.truth == "warm"
        else "--epochs or --lr")
    logits_all = torch.from_numpy(tables["train_logits"])
    loo_logits, control_logits = logits_all[torch.arange(len(idx)), idx], logits_all[-1, idx]
    scores, true = evaluation.validation_metrics(logits, data.y_train, V, variants, idx, loo_logits, control_logits,
                                                 variant=cfg.mpe_variant, reference=cfg.reference)
    chosen = variants[cfg.mpe_variant]
    run.save_array("sensitivities", chosen.sensitivity)
    run.save_arrays("validation", indices=idx, true_deviation=true, estimated_deviation=chosen.sensitivity[idx].numpy(),
                    loo_logits=loo_logits, control_logits=control_logits, logits=logits, covariances=V[idx],
                    **{f"sensitivity_{v}": r.sensitivity for v, r in variants.items()})
    truth = "from scratch" if cfg.truth == "scratch" else "warm"
    title = f"{cfg.posterior_name}, {cfg.mpe_variant}, retraining {truth}" + (
        "" if relaxation is None else f" R = {relaxation:.1f}")
    run.save_figure(plots.plot_validation(true, chosen.sensitivity[idx].numpy(), title, slope=scores["slope"],
                                          pearson=scores["pearson"]), "validation")
    if len(data.input_shape) == 3:
        run.save_figure(plots.plot_most_sensitive(data, chosen, cfg.n_show), "most_sensitive")
    return {**scores, "mpe_variant": cfg.mpe_variant, "posterior": cfg.posterior_name, "reference": cfg.reference,
            "truth": cfg.truth, **_converged(relaxation), **got.fit.final_metrics, "seconds_train": t_train,
            "seconds_mpe": t_mpe, "seconds_retrain": t_retrain, "seconds": time.perf_counter() - start}


def run_evolving(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, progress: bool) -> dict[str, Any]:
    """`mpe.evaluation.sensitivities_over_training` at the checkpoint iterations, ranked by the last and averaged
    in `--n-bins` bins (`binned_by_rank`); metrics `spearman_to_last`, `top_decile_overlap_to_last`."""
    from modelsense.mpe import plots

    data, t, start = prepared.data, cfg.train, time.perf_counter()
    its = evaluation.checkpoint_iterations(data.n_train, t.bs, t.epochs, cfg.checkpoint_iterations)
    got, recorder = _obtain(cfg, prepared, progress, iterations=its)
    sens = evaluation.sensitivities_over_training(
        _model_fn(cfg, data), [recorder.snapshots[f"iteration_{it}"] for it in its], data.x_train, data.y_train,
        cfg.settings, **cfg.posterior_options, mc_samples=cfg.mc_samples, seed=t.seed, device=t.device,
        progress=progress)  # (K, N)
    order, binned = evaluation.binned_by_rank(sens, cfg.n_bins)  # (N,), (K, n_bins)
    run.save_arrays("evolving", iterations=np.array(its), sensitivities=sens, binned=binned, order=order)
    run.save_figure(plots.plot_evolving(binned, its, f"{cfg.model.name} on {data.name}, {cfg.posterior_name}"),
                    "evolving")
    return {"iterations": list(its), "total_iterations": evaluation.training_steps(data.n_train, t.bs, t.epochs),
            "posterior": cfg.posterior_name, "mpe_variant": cfg.mpe_variant,
            **{k: dict(zip(map(str, its), v)) for k, v in evaluation.agreement_with_last(sens).items()},
            **got.fit.final_metrics, "seconds": time.perf_counter() - start}


def run_loco(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, progress: bool) -> dict[str, Any]:
    """Leave one class out: `mpe.predictive.class_removal_estimates` against warm-started retraining without each
    class (`mpe.evaluation.loco_metrics`), and `retrain_relaxation`."""
    from modelsense.mpe import plots

    data, start = prepared.data, time.perf_counter()
    got, _ = _obtain(cfg, prepared, progress)
    post = _posterior(cfg, got.module, data, got.fit.optimizer)
    est = predictive.class_removal_estimates(post, data.x_train, data.y_train, data.num_classes, cfg.settings,
                                             cfg.bs_jacs)
    tables, seconds_retrain, relaxation = _ground_truth(
        cfg, prepared, run, got.module, est["removed"], progress, cfg.truth_config(),
        data.n_train - max(len(r) for r in est["removed"]), "the true NLLs are not converged",
        "--epochs-retrain or --lr-retrain")
    metrics = {**evaluation.loco_metrics(est, tables), **_converged(relaxation), "posterior": cfg.posterior_name,
               "mpe_variant": cfg.mpe_variant, **got.fit.final_metrics, "seconds_retrain": seconds_retrain,
               "seconds": time.perf_counter() - start}
    run.save_arrays("loco", classes=np.array(est["classes"]), estimated_nll=est["estimated_nll"],
                    **{k: np.array(metrics[k]) for k in ("estimated_nll_joint", "true_test_nll", "true_test_accuracy")})
    run.save_figure(plots.plot_loco([metrics], f"{cfg.model.name} on {data.name}"), "loco")
    return metrics


RUNNERS = {"loo-iterations": run_loo_iterations, "loo-l2reg": run_loo_l2reg, "validation": run_validation,
           "evolving": run_evolving, "loco": run_loco}
#: experiments that can study a model trained elsewhere (they need no training trajectory)
CHECKPOINT_EXPERIMENTS = ("validation", "loco")


def _check(experiment: str):
    def check(cfg: MPEExperimentConfig) -> Prepared:
        data = load_dataset_from_config(cfg.data)  # validates before anything is written
        if experiment == "loo-l2reg" and cfg.train.optimizer == "ivon":
            raise ConfigError("loo-l2reg trains with sgd or adam (as the code of Nickl et al. 2023); IVON is not "
                              "supported here")
        if experiment == "loo-l2reg" and cfg.optim_var:
            raise ConfigError("loo-l2reg uses Laplace posteriors (as the code of Nickl et al. 2023); drop --optim-var")
        if experiment == "evolving":
            evaluation.checkpoint_iterations(data.n_train, cfg.train.bs, cfg.train.epochs, cfg.checkpoint_iterations)
        predictive.check_classification_head(_model_fn(cfg, data)(cfg.train.seed), data.x_train, data.num_classes)
        trained = None
        if cfg.checkpoint is not None:
            if experiment not in CHECKPOINT_EXPERIMENTS:
                raise ConfigError(f"mpe {experiment} follows the training itself; --checkpoint is for "
                                  f"{' and '.join(CHECKPOINT_EXPERIMENTS)}")
            if cfg.optim_var:
                raise ConfigError("--optim-var reads the optimizer state, which a model.pt does not hold; use a "
                                  "Laplace posterior (drop --optim-var) or train here")
            trained = check_checkpoint(cfg.checkpoint, cfg.data, data)
        if experiment in CHECKPOINT_EXPERIMENTS:
            RetrainRecipe(cfg.data, cfg.model, cfg.retrain_config())  # the engine retrains (sgd)
        if experiment == "validation" and cfg.truth == "scratch":
            try:
                RetrainRecipe(cfg.data, cfg.model, cfg.truth_config(trained))
            except ConfigError as exc:
                raise ConfigError(f"--truth scratch retrains with the training recipe: {exc}") from None
        return Prepared(data, {"experiment": experiment, "dataset": data.summary(), "posterior": cfg.posterior_name,
                               "source": None if trained is None else trained.summary()}, {"trained": trained})

    return check


def _run(experiment: str):
    def run(cfg: MPEExperimentConfig, prepared: Prepared, run: RunDir, progress: bool) -> dict[str, Any]:
        run.log(f"mpe {experiment}: {cfg.model.name} on {prepared.data.name}, posterior {cfg.posterior_name}, "
                f"variant {cfg.mpe_variant}")
        return RUNNERS[experiment](cfg, prepared, run, progress)

    return run


_POSTERIOR = {"optim_var", "var_version", "bs_jacs", "mpe_variant", "loo_damping"}
_RETRAIN = {"epochs_retrain", "lr_retrain", "lrmin_retrain", "bs_retrain", "retrain", "checkpoint"}
#: the options of each experiment beside data / model / training (the rest are hidden)
_OPTIONS = {"validation": _POSTERIOR | _RETRAIN | {"n_retrain", "reference", "truth"},
            "loo-iterations": _POSTERIOR | {"checkpoint_epochs"},
            "loo-l2reg": (_POSTERIOR - {"optim_var"}) | {"n_exp", "deltas_start", "deltas_stop", "smooth"},
            "evolving": _POSTERIOR | {"checkpoint_iterations", "mc_samples", "n_bins"},
            "loco": _POSTERIOR | _RETRAIN}
# --width / --depth stay: they size a cnn or a vit (--patch) trained here
_HIDDEN_ALWAYS = {"data.corruption_ratio", "data.drop_classes", "model.norm", "train.checkpoint_epochs",
                  "train.checkpoint_iterations"}


def _hidden(experiment: str) -> frozenset[str]:
    unused = {f.name for f in dataclasses.fields(MPEExperimentConfig)} - {"data", "model", "train", "n_show"}
    unused -= _OPTIONS[experiment]
    retrain = {f"retrain.{f.name}" for f in dataclasses.fields(RetrainOptions)} if "retrain" in unused else set()
    return frozenset(_HIDDEN_ALWAYS | unused | retrain)


_HELP = {
    "validation": "Estimated vs true softmax deviation under removal of --n-retrain examples (Nickl et al. 2023, "
                  "Fig. 2); metrics pearson, spearman, slope, n_retrain.",
    "loo-iterations": "LOO-CV estimate at checkpoints during training vs test NLL per epoch (Nickl et al. 2023, "
                      "Fig. 1b/5); metrics estimated_nll, test_nll, final_abs_gap.",
    "loo-l2reg": "LOO-CV estimate and test NLL over a grid of δ (Nickl et al. 2023, Fig. 4); metrics "
                 "best_delta_estimated, best_delta_test. (--delta is unused.)",
    "evolving": "Sensitivities at several iterations of IVON training, ranked by the last (Nickl et al. 2023, "
                "Fig. 3b/11); metrics spearman_to_last.",
    "loco": "Leave one class out: estimated vs true test NLL after retraining without each class (Nickl et al. "
            "2023, Fig. 3a); metrics spearman.",
}


def _validation_summary(m: dict[str, Any]) -> str:
    by = "  ".join(f"{v}: P {r['pearson']:.3f} S {r['spearman']:.3f} slope {r['slope']:.3g}"
                   for v, r in m["by_variant"].items())
    line = (f"{m['posterior']}, {m['n_retrain']} retrained: Pearson {m['pearson']:.3f}, Spearman {m['spearman']:.3f}, "
            f"slope {m['slope']:.3g} ({m['mpe_variant']}; mean deviation estimated {m['mean_estimated_deviation']:.4g} "
            f"vs true {m['mean_true_deviation']:.4g}, LOO NLL {m['estimated_loo_nll']:.4f} vs {m['true_loo_nll']:.4f}) "
            f"| {by}")
    if m.get("truth") == "scratch":
        line += " | ground truth retrained from scratch"
    if m["ground_truth_converged"] is False:
        line += (f"\nwarning: the retraining relaxed the slowest directions by only R = {m['retrain_relaxation']:.2f} "
                 f"e-folds: the true deviations are underestimated; raise --epochs-retrain or --lr-retrain "
                 f"(R >= {ground_truth.MIN_RELAXATION:g})")
    return line


_SUMMARIES = {
    "validation": _validation_summary,
    "loo-iterations": lambda m: (f"{m['posterior']}: estimated LOO NLL {m['estimated_nll'][-1]:.4f} vs test NLL "
                                 f"{m['test_nll'][-1]:.4f} (|gap| {m['final_abs_gap']:.4f}) at epoch "
                                 f"{m['checkpoint_epochs'][-1]}"),
    "loo-l2reg": lambda m: (f"best δ by LOO estimate {m['best_delta_estimated']:.4g}, by test NLL "
                            f"{m['best_delta_test']:.4g}" + ("" if "smoothed" not in m else
                            f"; after a moving average of {m['smooth']}: {m['smoothed']['best_delta_estimated']:.4g}, "
                            f"{m['smoothed']['best_delta_test']:.4g}")),
    "evolving": lambda m: "Spearman to the last checkpoint by iteration: " + "  ".join(
        f"{k}: {v:.3f}" for k, v in m["spearman_to_last"].items()),
    "loco": lambda m: (f"Spearman over classes: {m['spearman']:.3f} (per-example estimate), {m['spearman_joint']:.3f} "
                       f"(joint)"),
}
_RESUME_KEYS = ("data", "model", "train", "epochs_retrain", "lr_retrain", "lrmin_retrain", "bs_retrain", "n_retrain",
                "truth")

COMMANDS = {e: Command(f"mpe {e}", spec_class(e), _check(e), _run(e), summary=_SUMMARIES[e], hide=_hidden(e),
                       keep=(STORE_DIR,) if e in CHECKPOINT_EXPERIMENTS else (),
                       resume_keys=_RESUME_KEYS if e in CHECKPOINT_EXPERIMENTS else None, help=_HELP[e])
            for e in EXPERIMENTS}


# --- demo section -----------------------------------------------------------------------------
def mpe_section(out: Path, progress: bool, resume: bool = False) -> Section:
    """The demo's MPE section: a small `validation` run (MLP 64-64-10 on digits, KFAC Laplace, 64
    retrained examples), its scatter and the most sensitive training images. Under a minute."""
    run = Path(out) / "mpe_validation"
    cfg = default_config(
        "validation", model=ModelConfig("mlp", widths=(64, 64)),
        train={"epochs": 40}, n_retrain=64, epochs_retrain=40, lr_retrain=0.1, bs_retrain=64,  # relaxation R = 3.3
    )
    metrics = execute_or_reuse(COMMANDS["validation"], cfg, run, resume=resume, progress=progress)
    keep = ("pearson", "spearman", "slope", "mean_estimated_deviation", "mean_true_deviation", "estimated_loo_nll",
            "true_loo_nll", "retrain_relaxation", "n_retrain", "posterior", "mpe_variant", "test_accuracy", "seconds")
    return Section(
        "Memory perturbation: which training examples the model is most sensitive to",
        "MPE sensitivities s_i = ‖Λ_i V_i e_i‖₁ (prediction error e_i, softmax Hessian Λ_i, predictive "
        "covariance V_i = J_i Σ J_iᵀ from a KFAC Laplace posterior) predict how much the softmax output of a "
        "training example moves when the model is retrained without it. Scatter: estimated vs true deviation for "
        f"{metrics['n_retrain']} examples retrained without them (all at once, warm-started, to convergence: "
        f"relaxation R = {metrics['retrain_relaxation']:.1f}); `slope` is the least-squares slope of estimated on true "
        "(1 = the right scale): the KFAC posterior overestimates the predictive variances V_i about twofold on this "
        "MLP (the full GGN posterior gives a slope of about 1.05 with the `loo` variant); below, the training images "
        "with the largest sensitivities.",
        {k: metrics[k] for k in keep if k in metrics},
        [run / "figures" / "validation.png", run / "figures" / "most_sensitive.png"],
        str(run),
    )


# --- several loco runs in one figure -------------------------------------------------------------
@dataclass(frozen=True)
class LocoOverlaySpec:
    """`modelsense mpe loco-overlay`: finished `mpe loco` runs (e.g. an MLP's and a LeNet's) in one figure,
    as Nickl et al. 2023's Fig. 3a (their plot_loco.py --names_exp)."""

    runs: tuple[str, ...] = option((), "comma-separated run directories of finished `mpe loco` runs (two or more)",
                                   parse=names, show=joined)
    labels: tuple[str, ...] = option((), "comma-separated legend labels, one per run (default: each run's model "
                                         "and dataset)", parse=names, show=joined)


def check_loco_overlay(spec: LocoOverlaySpec) -> Prepared:
    """Validate the finished `mpe loco` runs of `--runs` and read each one's label and metrics."""
    from modelsense.runs import read_json, require_finished

    if len(spec.runs) < 2:
        raise ConfigError(f"--runs takes two or more `mpe loco` run directories, received {len(spec.runs)}")
    if spec.labels and len(spec.labels) != len(spec.runs):
        raise ConfigError(f"--labels gives {len(spec.labels)} labels for {len(spec.runs)} runs; give one per run")
    runs = []
    for k, path in enumerate(map(Path, spec.runs)):
        if not (path / "config.json").is_file():
            raise ConfigError(f"--runs {path}: not a run directory (no config.json); pass `mpe loco --out` folders")
        config = read_json(path / "config.json", "the config of an `mpe loco` run")
        if config.get("command") != COMMANDS["loco"].name:
            raise ConfigError(f"--runs {path} holds a {config.get('command')!r} run, not {COMMANDS['loco'].name!r}")
        require_finished(path, f"--runs {path}")
        m = read_json(path / "metrics.json", "the metrics of an `mpe loco` run")
        label = spec.labels[k] if spec.labels else (f"{config['model']['name']} on "
                                                    f"{config.get('dataset', {}).get('name', config['data']['name'])}")
        runs.append({"path": str(path.resolve()), "label": label,
                     **{key: m[key] for key in ("classes", "true_test_nll", "estimated_nll", "accuracy_drop",
                                                "spearman", "pearson")}})
    return Prepared(None, {"runs": [{"path": r["path"], "label": r["label"]} for r in runs]}, {"runs": runs})


def run_loco_overlay(spec: LocoOverlaySpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """figures/loco_overlay.png; metrics: per run its label, path, Spearman and Pearson over classes."""
    from modelsense.mpe import plots

    runs = prepared.extra["runs"]
    run.save_figure(plots.plot_loco(runs, "leave one class out"), "loco_overlay")
    return {"runs": [{k: r[k] for k in ("label", "path", "spearman", "pearson")} for r in runs]}


COMMANDS["loco-overlay"] = Command(
    "mpe loco-overlay", LocoOverlaySpec, check_loco_overlay, run_loco_overlay,
    summary=lambda m: "  ".join(f"{r['label']}: Spearman {r['spearman']:.3f}" for r in m["runs"]),
    help="Finished `mpe loco` runs (e.g. an MLP and a LeNet) in one figure (Nickl et al. 2023, Fig. 3a).")
