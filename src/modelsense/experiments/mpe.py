"""`modelsense mpe ...`: the five experiments of Nickl et al. 2023, "The Memory Perturbation Equation" (NeurIPS).

    loo-iterations  LOO-CV estimate at checkpoints during training vs the test NLL per epoch (Fig. 1b/5)
    loo-l2reg       LOO-CV estimate and test NLL over a grid of prior precisions δ (Fig. 4)
    validation      estimated vs true softmax deviation when one example is removed (Fig. 2)
    evolving        sensitivities at several iterations of IVON training, ranked and binned (Fig. 3b/11)
    loco            leave-one-class-out: estimated vs true test NLL after retraining without a class (Fig. 3a)
    loco-overlay    finished loco runs (e.g. an MLP's and a LeNet's) in one figure (Fig. 3a)

The numbers come from `modelsense.mpe` (the estimator, its ground truth, `predictive` covariances,
`evaluation` against the truth), the figures from `modelsense.mpe.plots`, the optimizer-state snapshots
of `evolving` from `modelsense.training.recorder`; this module runs them.

Each writes a run directory (config.json, metrics.json, arrays, figures/). The defaults run on
`digits` in minutes on a CPU; the original's hyper-parameters (e.g. `--dataset fmnist --model lenet
--epochs 300 --delta 100 --bs 256 --device cuda`) give the paper's settings.

Conventions and where the results differ from the original code (SEEDS.md 0.7):
  * objective: mean minibatch NLL + δ/(2N)‖θ‖² (IVON: ess = N, weight_decay = δ/N); posterior
    precision Σ_i J_iᵀΛ_iJ_i + δI (Laplace) or N·h + δ (IVON), N·sqrt(v) + δ (Adam).
  * minibatches are reshuffled every epoch (the original never reshuffles; `--fixed-batches` restores it).
  * `--optimizer adamw` is AdamW with decoupled weight decay δ/N and no L2 term in the loss (the
    original's first script); the original's loo-l2reg built `AdamW(params, lr)`, whose default weight
    decay 0.01 came on top of the L2 term: that is not reproduced.
  * output sizes follow the data (the original hard-coded 10 classes for LeNet/ResNet).
  * evolving: a checkpoint labelled t is taken after t optimizer steps (the original labelled it t+1),
    and the last default checkpoint is the end of training; bins use `np.array_split`, so N need not be
    divisible by the number of bins.
  * validation/loco ground truth: the retraining engine trains all leave-out models at once, with
    shared minibatches and a control model retrained on all data (`--reference control`); the
    original retrained one model at a time with its own shuffling and compared with θ*.
    `validation --truth scratch` trains them from the initialisation with the training recipe instead
    of warm-starting them.
  * loo-l2reg: `--smooth 4` draws both curves after the original's moving average of window 4 (at the
    geometric mean of each window's δ) and reports the smoothed best δ beside the raw one. The
    retraining must run long enough to converge: validation reports its relaxation R
    (`mpe.ground_truth.retraining_relaxation`) and warns below 3; the defaults give R ≈ 3.3.
  * `--optim-var` with `--optimizer sgd` is an error (the original silently fell back to Laplace).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel, Params
from modelsense.curvature.posterior import in_float64_on_failure
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared
from modelsense.experiments.report import Section
from modelsense.experiments.source import CHECKPOINT_HELP, TrainedRun, check_checkpoint
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.mpe import (
    LAPLACE_STRUCTURES,
    VARIANTS,
    MPESettings,
    build_posterior,
    group_loo_nll,
    mc_prediction_error,
    memory_perturbation,
    per_example_nll,
    softmax_deviation,
)
from modelsense.mpe.evaluation import (
    agreement_with_last,
    binned_by_rank,
    correlations,
    default_checkpoint_iterations,
    retrain_indices,
    smoothed_curves,
)
from modelsense.mpe.ground_truth import (
    MIN_RELAXATION,
    leave_out_masks,
    retraining_relaxation,
)
from modelsense.mpe.predictive import (
    all_variants,
    group_removal_nll,
    predictive_covariances,
)
from modelsense.options import ints, joined, names, option
from modelsense.progress import progress_bar
from modelsense.retraining.store import (
    STORE_DIR,
    RetrainOptions,
    RetrainRecipe,
    jobs_from,
    params_digest,
    retrain,
)
from modelsense.runs import RunDir, finished_metrics
from modelsense.training.config import TrainConfig
from modelsense.training.ensemble import train_ensemble
from modelsense.training.fit import Fit, fit
from modelsense.training.recorder import OptimizerStateRecorder, stand_in_optimizer

EXPERIMENTS = ("loo-iterations", "loo-l2reg", "validation", "evolving", "loco")
REFERENCES = ("control", "trained")
TRUTHS = ("warm", "scratch")
LOO_DAMPING_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_CHECKPOINT_EPOCHS = (1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300)


@dataclass
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
    var_version: str = option("kfac", "Laplace GGN structure: kfac, diag, full (small models), ekfac")
    bs_jacs: int = option(500, "examples per chunk of predictive covariances (memory bound)")
    mpe_variant: str = option("full", "full (C x C, default), diag (Nickl et al. 2023's code), loo (Sherman-Morrison; "
                                      "for exact posteriors)")
    loo_damping: float = option(1.0, "α of the loo variant: Δf = (I − α V Λ)^-1 V e (1 plain, 0 = full)")
    n_retrain: int = option(200, "examples to retrain without")
    epochs_retrain: int = option(10, "epochs of the warm-started retraining")
    lr_retrain: float = option(0.01, "initial learning rate of the retraining")
    lrmin_retrain: float = option(0.0, "final learning rate of the retraining's cosine schedule")
    bs_retrain: int | None = option(None, "batch size of retraining (default: --bs)")
    truth: str = option("warm", "validation's ground truth: warm (retrain from the trained parameters with the "
                                "--*-retrain options, as Nickl et al. 2023) or scratch (train each leave-one-out "
                                "model from the initialisation with the training recipe; the --*-retrain options "
                                "are unused)")
    reference: str = option("control", "true deviation against the control model retrained on all data (control) or "
                                       "against the trained model (trained, as Nickl et al. 2023's code)")
    checkpoint_epochs: tuple[int, ...] = option(PAPER_CHECKPOINT_EPOCHS, "comma-separated epochs at which to estimate "
                                                "(default: the MPE code's 1,2,5,10,20,30,... up to --epochs)",
                                                parse=ints, show=joined)
    n_exp: int = option(8, "number of δ values")
    deltas_start: float = option(-1.0, "δ = logspace(start, stop, n_exp)")
    deltas_stop: float = option(3.0, "δ = logspace(start, stop, n_exp)")
    smooth: int = option(1, "loo-l2reg: moving-average window over the δ grid for the figure and the smoothed best δ "
                            "(Nickl et al. 2023's code: 4; 1 = none)")
    checkpoint_iterations: tuple[int, ...] = option((), "comma-separated optimizer steps (default: 10, 10%, 40%, 100% "
                                                    "of training)", parse=ints, show=joined)
    mc_samples: int = option(150, "Monte-Carlo samples of the residual")
    n_bins: int = option(100, "bins of the ranking")
    n_show: int = 16
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    checkpoint: str | None = option(None, CHECKPOINT_HELP + " (a Laplace posterior: the "
                                          "optimizer state is not in model.pt)")

    def __post_init__(self) -> None:
        if self.var_version not in LAPLACE_STRUCTURES:
            raise ConfigError(
                f"--var-version must be one of {', '.join(LAPLACE_STRUCTURES)}, received {self.var_version!r}"
            )
        MPESettings(self.mpe_variant, self.loo_damping)  # validates variant and damping
        if self.optim_var and self.train.optimizer not in ("ivon", "adam"):
            raise ConfigError(
                f"--optim-var reads the posterior from the optimizer state, which needs --optimizer ivon or adam "
                f"(received {self.train.optimizer!r}); drop --optim-var for a Laplace posterior"
            )
        if not self.optim_var and not self.train.delta > 0:
            raise ConfigError(f"a Laplace posterior needs a prior precision --delta > 0, received {self.train.delta}")
        if self.optim_var and self.train.optimizer == "adam" and not self.train.delta > 0:
            raise ConfigError(f"the Adam posterior needs --delta > 0, received {self.train.delta}")
        for name in ("bs_jacs", "n_retrain", "n_exp", "mc_samples", "n_bins"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, received {getattr(self, name)}")
        try:  # TrainConfig checks the retraining options
            self.retrain_config()
        except ConfigError as exc:
            raise ConfigError(f"bad retraining option: {exc} (the retraining's lr, lrmin, epochs, bs are --lr-retrain, "
                              "--lrmin-retrain, --epochs-retrain, --bs-retrain)") from None
        if self.truth not in TRUTHS:
            raise ConfigError(f"--truth must be one of {', '.join(TRUTHS)}, received {self.truth!r}")
        if not 1 <= int(self.smooth) <= int(self.n_exp):
            raise ConfigError(f"--smooth must lie in [1, --n-exp = {self.n_exp}], received {self.smooth}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"--reference must be one of {', '.join(REFERENCES)}, received {self.reference!r}")
        if self.deltas_stop < self.deltas_start:
            raise ConfigError(f"--deltas-stop ({self.deltas_stop}) must be >= --deltas-start ({self.deltas_start})")
        self.checkpoint_epochs = tuple(sorted({int(e) for e in self.checkpoint_epochs}))
        self.checkpoint_iterations = tuple(sorted({int(i) for i in self.checkpoint_iterations}))
        if any(i < 1 for i in self.checkpoint_iterations):
            raise ConfigError(f"checkpoint iterations must be >= 1, received {self.checkpoint_iterations}")

    @property
    def settings(self) -> MPESettings:
        return MPESettings(self.mpe_variant, self.loo_damping)

    @property
    def posterior_name(self) -> str:
        return self.train.optimizer if self.optim_var else f"laplace-{self.var_version}"

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: CPU defaults on digits per experiment (what the CLI shows); everything else as in MPEExperimentConfig.
DEFAULTS: dict[str, dict[str, Any]] = {
    "loo-iterations": {"train": {"optimizer": "sgd", "lr": 0.05, "lrmin": 0.0, "epochs": 50, "bs": 64, "delta": 10.0}},
    "loo-l2reg": {"train": {"optimizer": "sgd", "lr": 0.05, "lrmin": 0.0, "epochs": 50, "bs": 64, "delta": 10.0},
                  "n_exp": 8, "deltas_start": -1.0, "deltas_stop": 2.5},
    "validation": {"train": {"optimizer": "sgd", "lr": 0.05, "lrmin": 0.0, "epochs": 100, "bs": 64, "delta": 10.0},
                   "n_retrain": 200, "epochs_retrain": 40, "lr_retrain": 0.1, "lrmin_retrain": 0.0, "bs_retrain": 64},
    "evolving": {"train": {"optimizer": "ivon", "lr": 0.3, "lrmin": 0.0, "epochs": 30, "bs": 64, "delta": 10.0,
                           "hess_init": 1.0}, "optim_var": True},
    "loco": {"train": {"optimizer": "sgd", "lr": 0.05, "lrmin": 0.0, "epochs": 100, "bs": 64, "delta": 10.0},
             "epochs_retrain": 40, "lr_retrain": 0.1, "lrmin_retrain": 0.0, "bs_retrain": 64},
}


def default_config(experiment: str, **overrides: Any) -> MPEExperimentConfig:
    """The CPU defaults of `experiment` with `overrides` (fields of MPEExperimentConfig; `train` may be a dict)."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown MPE experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS[experiment].items()}
    train = {**spec.pop("train"), **(overrides.pop("train", {}) or {})}
    return MPEExperimentConfig(**{**spec, **overrides, "train": TrainConfig(**train)})


# --- shared steps ----------------------------------------------------------------------------
def _model_fn(cfg: MPEExperimentConfig, data: Dataset):
    def make(seed: int) -> nn.Module:
        return build_model_from_config(cfg.model, data.input_shape, data.num_classes, seed=seed)

    return make


def _check_head(module: nn.Module, data: Dataset) -> None:
    with torch.no_grad():
        out = module(data.x_train[:2].to(next(module.parameters()).device))
    if out.dim() != 2 or out.shape[-1] != data.num_classes or data.num_classes < 2:
        raise ConfigError(
            f"the MPE experiments need a classification head with one logit per class: {data.num_classes} classes, "
            f"but the model outputs shape {tuple(out.shape[1:])}"
        )


def _module_with(model_fn, seed: int, params: Params, device: str) -> nn.Module:
    module = model_fn(seed).to(device)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(params[n])
    return module.eval()


def posterior_at(
    cfg: MPEExperimentConfig, module: nn.Module, data: Dataset, optimizer=None, n_train: int | None = None
):
    """The posterior the flags select, at the module's current parameters (a Laplace posterior is
    retried in float64 when float32 fails: `curvature.posterior.in_float64_on_failure`)."""
    device = next(module.parameters()).device
    if cfg.optim_var:
        return build_posterior(cfg.train.optimizer, FunctionalModel(module), prior_precision=cfg.train.delta,
                               optimizer=optimizer, n_train=n_train or data.n_train, chunk_size=cfg.bs_jacs)
    y = data.y_train.to(device)
    return in_float64_on_failure(
        lambda model, x: build_posterior("laplace", model, x, y, prior_precision=cfg.train.delta,
                                         structure=cfg.var_version, chunk_size=cfg.bs_jacs),
        module, data.x_train.to(device))


def _evolving_iterations(cfg: MPEExperimentConfig, data: Dataset) -> tuple[int, ...]:
    steps_per_epoch = math.ceil(data.n_train / cfg.train.bs)
    total = steps_per_epoch * cfg.train.epochs
    its = cfg.checkpoint_iterations or default_checkpoint_iterations(total)
    late = [i for i in its if i > total]
    if late:
        raise ConfigError(
            f"checkpoint iterations {late} exceed the {total} steps of training ({cfg.train.epochs} epochs x "
            f"{steps_per_epoch})"
        )
    return its


def check_experiment(experiment: str, cfg: MPEExperimentConfig, data: Dataset) -> None:
    """Raise ConfigError when `cfg` cannot run `experiment` on `data` (before anything is written)."""
    if experiment not in RUNNERS:
        raise ConfigError(f"unknown MPE experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
    if experiment == "loo-l2reg" and cfg.train.optimizer == "ivon":
        raise ConfigError(
            "loo-l2reg trains with sgd or adam (as the code of Nickl et al. 2023); IVON is not supported here"
        )
    if experiment == "loo-l2reg" and cfg.optim_var:
        raise ConfigError("loo-l2reg uses Laplace posteriors (as the code of Nickl et al. 2023); drop --optim-var")
    if experiment == "evolving":
        _evolving_iterations(cfg, data)
    _check_head(_model_fn(cfg, data)(cfg.train.seed), data)


def _train(cfg: MPEExperimentConfig, data: Dataset, progress: bool, train_cfg: TrainConfig | None = None,
           on_epoch=None, iterations: tuple[int, ...] = (),
           trained: TrainedRun | None = None) -> tuple[nn.Module, Fit, OptimizerStateRecorder | None]:
    """Train the model (recording the optimizer state at `iterations`), or take the checked checkpoint
    `trained` as it is (no optimizer state: a Laplace posterior)."""
    if trained is not None:
        recipe = trained.recipe(cfg.train)
        return trained.module.to(recipe.device).eval(), trained.as_fit(data, recipe), None
    train_cfg = train_cfg or cfg.train
    module = _model_fn(cfg, data)(train_cfg.seed)
    _check_head(module, data)
    recorder = OptimizerStateRecorder(module, iterations)
    with recorder:
        result = fit(module, data, train_cfg, progress=progress,
                     on_epoch=None if on_epoch is None else (lambda e, row: on_epoch(e, row, module, recorder)))
    return result.module, result, recorder


def _retrain_without(
    cfg: MPEExperimentConfig,
    data: Dataset,
    run: RunDir,
    params: Params,
    removed: list[Tensor] | Tensor,
    progress: bool,
    trained: TrainedRun | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """The retraining without each removed set (shared minibatches; `mpe.ground_truth`), plus a control
    model on all data as the last row, as jobs of the ground-truth store (resumable, local or Ray):
    warm-started from `params` with `retrain_config()`, or (`--truth scratch`) from the initialisation of
    the training seed with the training recipe. Returns (tables with train/test logits and losses, seconds)."""
    retrain_cfg = cfg.truth_config(trained)
    masks = torch.cat([leave_out_masks(data.n_train, removed), torch.ones(1, data.n_train, dtype=torch.bool)])
    init = f"warm:{params_digest(params)}" if cfg.truth == "warm" else "scratch"
    recipe = RetrainRecipe(cfg.data, cfg.model, retrain_cfg,
                           batch_plan="shared", init=init, logits=True)
    start = time.perf_counter()
    tables = retrain(recipe, jobs_from(masks.numpy(), [retrain_cfg.seed] * len(masks)), cfg.retrain, run.path,
                     data=data, init_params=params if cfg.truth == "warm" else None, progress=progress, log=run.log)
    return tables, time.perf_counter() - start


def _final_posterior(cfg, module, result: Fit, data):
    return posterior_at(cfg, module, data, optimizer=result.optimizer, n_train=result.n_train)


def _train_metrics(result: Fit) -> dict[str, float]:
    f = result.final
    return {
        "train_accuracy": f["train_accuracy"],
        "test_accuracy": f["test_accuracy"],
        "train_nll": f["train_loss"],
        "test_nll": f["test_loss"],
    }


# --- 1. LOO-CV during training ---------------------------------------------------------------
def run_loo_iterations(cfg: MPEExperimentConfig, data: Dataset, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train; at the checkpoint epochs (and the last) estimate the LOO-CV NLL with the MPE.

    metrics: `checkpoint_epochs`, `estimated_nll` and `test_nll` at them, `final_abs_gap` =
    |estimated − test| at the last checkpoint, `test_nll_per_epoch`.
    """
    from modelsense.mpe import plots

    marks = sorted({e for e in cfg.checkpoint_epochs if 1 <= e <= cfg.train.epochs} | {cfg.train.epochs})
    est: dict[int, float] = {}
    est_by_variant: dict[int, dict[str, float]] = {}
    train_cfg = replace(cfg.train, eval_every=1)

    def on_epoch(epoch, row, module, recorder):
        if epoch not in marks:
            return
        module.eval()
        post = posterior_at(cfg, module, data, optimizer=recorder.optimizer, n_train=data.n_train)
        logits, V = predictive_covariances(post, data.x_train, cfg.bs_jacs)
        by_variant = {v: r.estimated_loo_nll for v, r in all_variants(logits, data.y_train, V, cfg.loo_damping).items()}
        est[epoch] = by_variant[cfg.mpe_variant]
        est_by_variant[epoch] = by_variant
        module.train()
        run.log(f"epoch {epoch}: estimated LOO NLL {est[epoch]:.4f}, test NLL {row['test_loss']:.4f}")

    start = time.perf_counter()
    _, result, _ = _train(cfg, data, progress, train_cfg, on_epoch)
    hist = result.history
    test_by_epoch = dict(zip(hist["epoch"], hist["test_loss"]))
    estimated = [est[e] for e in marks]
    test = [test_by_epoch[e] for e in marks]
    metrics = {
        "checkpoint_epochs": marks, "estimated_nll": estimated, "test_nll": test,
        "final_abs_gap": abs(estimated[-1] - test[-1]), "posterior": cfg.posterior_name, "mpe_variant": cfg.mpe_variant,
        "estimated_nll_by_variant": {v: [est_by_variant[e][v] for e in marks] for v in VARIANTS},
        "test_nll_per_epoch": hist["test_loss"], **{f"final_{k}": v for k, v in _train_metrics(result).items()},
        "seconds": time.perf_counter() - start,
    }
    run.save_arrays(
        "loo_iterations",
        epochs=np.array(hist["epoch"]),
        test_nll=np.array(hist["test_loss"]),
        train_nll=np.array(hist["train_loss"]),
        checkpoint_epochs=np.array(marks),
        estimated_nll=np.array(estimated),
    )
    run.save_figure(plots.plot_loo_iterations(hist["epoch"], hist["test_loss"], marks, estimated,
                                        f"{cfg.model.name} on {data.name}, {cfg.posterior_name}"), "loo_iterations")
    run.write_metrics(metrics)
    return metrics


# --- 2. LOO-CV over the prior precision ------------------------------------------------------
def run_loo_l2reg(cfg: MPEExperimentConfig, data: Dataset, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """For δ in logspace(deltas_start, deltas_stop, n_exp): train from the same init, estimate the
    LOO-CV NLL (posterior with prior precision δ) and measure the test NLL.

    All δ are trained at once by the retraining engine: model m gets uniform example weights
    s_m = δ_max/δ_m, which leave its mean minibatch loss unchanged and turn the engine's prior term
    δ_max/(2 Σ_i w_mi)‖θ‖² into δ_m/(2N)‖θ‖² (same init seed and batch order for every δ).
    metrics: `deltas`, `estimated_nll`, `test_nll`, `best_delta_estimated`, `best_delta_test`; with
    `--smooth w` > 1 also both curves after a moving average of window w (`smoothed`: `deltas` the
    geometric mean of each window's δ, `estimated_nll`, `test_nll`, `best_delta_estimated`,
    `best_delta_test`), which the figure draws (Nickl et al. 2023's code: w = 4).
    """
    from modelsense.mpe import plots

    deltas = np.logspace(cfg.deltas_start, cfg.deltas_stop, cfg.n_exp)
    d_max = float(deltas.max())
    weights = (
        torch.tensor(d_max / deltas, dtype=torch.float32).unsqueeze(1).expand(len(deltas), data.n_train).contiguous()
    )
    model_fn = _model_fn(cfg, data)
    _check_head(model_fn(cfg.train.seed), data)
    tcfg = replace(cfg.train, delta=d_max, eval_every=0)
    start = time.perf_counter()
    res = train_ensemble(model_fn, data.x_train, data.y_train, weights, tcfg,
                         seeds=torch.full((len(deltas),), cfg.train.seed, dtype=torch.long),
                         queries={"test": (data.x_test, data.y_test)}, return_params=True, progress=progress)
    test_nll = res.outputs["test"]["loss"].mean(1).tolist()
    test_acc = res.outputs["test"]["correct"].float().mean(1).tolist()
    estimated = []
    est_by_variant: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with progress_bar(len(deltas), "posteriors over δ", enabled=progress) as bar:
        for m, delta in enumerate(deltas):
            module = _module_with(model_fn, cfg.train.seed, {k: v[m] for k, v in res.params.items()}, cfg.train.device)
            mcfg = replace(cfg, train=replace(cfg.train, delta=float(delta)))
            post = posterior_at(mcfg, module, data)
            logits, V = predictive_covariances(post, data.x_train, cfg.bs_jacs)
            by_variant = {
                v: r.estimated_loo_nll for v, r in all_variants(logits, data.y_train, V, mcfg.loo_damping).items()
            }
            estimated.append(by_variant[cfg.mpe_variant])
            for v in VARIANTS:
                est_by_variant[v].append(by_variant[v])
            run.log(f"delta {delta:.4g}: estimated LOO NLL {estimated[-1]:.4f}, test NLL {test_nll[m]:.4f}")
            bar.advance(1)
    metrics = {
        "deltas": deltas.tolist(),
        "estimated_nll": estimated,
        "test_nll": test_nll,
        "test_accuracy": test_acc,
        "best_delta_estimated": float(deltas[int(np.argmin(estimated))]),
        "best_delta_test": float(deltas[int(np.argmin(test_nll))]),
        "spearman": correlations(np.array(estimated), np.array(test_nll))["spearman"],
        "estimated_nll_by_variant": est_by_variant,
        "best_delta_estimated_by_variant": {v: float(deltas[int(np.argmin(e))]) for v, e in est_by_variant.items()},
        "posterior": cfg.posterior_name,
        "mpe_variant": cfg.mpe_variant,
        "smooth": cfg.smooth,
        "seconds": time.perf_counter() - start,
    }
    arrays = {"deltas": deltas, "estimated_nll": np.array(estimated), "test_nll": np.array(test_nll)}
    if cfg.smooth > 1:
        smoothed = smoothed_curves(deltas, estimated, test_nll, cfg.smooth)
        metrics["smoothed"] = {k: v.tolist() for k, v in smoothed.items()} | {
            "best_delta_estimated": float(smoothed["deltas"][int(np.argmin(smoothed["estimated_nll"]))]),
            "best_delta_test": float(smoothed["deltas"][int(np.argmin(smoothed["test_nll"]))])}
        arrays.update({f"smoothed_{k}": v for k, v in smoothed.items()})
    run.save_arrays("loo_l2reg", **arrays)
    run.save_figure(plots.plot_loo_l2reg(deltas, estimated, test_nll, f"{cfg.model.name} on {data.name}",
                                         window=cfg.smooth), "loo_l2reg")
    run.write_metrics(metrics)
    return metrics


# --- 3. validation: estimated vs true deviation ----------------------------------------------
def run_validation(cfg: MPEExperimentConfig, data: Dataset, run: RunDir, progress: bool = True,
                   trained: TrainedRun | None = None) -> dict[str, Any]:
    """Estimated (MPE sensitivity) vs true softmax deviation ‖softmax(f_i^{\\i}) − softmax(f_i)‖₁ for
    n_retrain examples, the truth from warm-started retraining without each (all at once; `--truth
    scratch`: each trained from the initialisation with the training recipe, `truth_config`).

    metrics: `pearson`, `spearman`, `slope` (least squares est ≈ slope · true through the origin: 1
    for the right scale), `n_retrain` for `--mpe-variant`, `by_variant` for all three (with
    `loo_nll`, the mean estimated LOO NLL of the retrained examples), `estimated_loo_nll` and
    `true_loo_nll` on the retrained examples (`estimated_loo_nll_all`: over all N), and
    `by_loo_damping` for the `loo` variant at α in LOO_DAMPING_SWEEP (α = 0: `full` shift through the
    exact softmax). `retrain_relaxation` R (`retraining_relaxation`) says how far the retraining
    converged: below MIN_RELAXATION (`ground_truth_converged` false) the true deviations are too
    small, and so is everything measured against them. Arrays: validation.npz also holds V of the
    retrained examples (`covariances`).
    """
    from modelsense.mpe import plots

    start = time.perf_counter()
    module, result, _ = _train(cfg, data, progress, trained=trained)
    t_train = time.perf_counter() - start
    t0 = time.perf_counter()
    post = _final_posterior(cfg, module, result, data)
    logits, V = predictive_covariances(post, data.x_train, cfg.bs_jacs)
    variants = all_variants(logits, data.y_train, V, cfg.loo_damping)
    t_mpe = time.perf_counter() - t0
    idx = torch.as_tensor(retrain_indices(data.n_train, cfg.n_retrain))
    params = {k: v.detach().cpu() for k, v in module.named_parameters()}
    truth_cfg = cfg.truth_config(trained)
    relaxation = retraining_relaxation(truth_cfg, data.n_train - 1) if truth_cfg.optimizer == "sgd" else None
    if relaxation is not None and relaxation < MIN_RELAXATION:
        raise_ = "--epochs-retrain or --lr-retrain" if cfg.truth == "warm" else "--epochs or --lr"
        run.log(
            f"warning: the retraining relaxes the slowest directions by only R = {relaxation:.2f} e-folds (< "
            f"{MIN_RELAXATION}): "
            f"the true deviations are underestimated; raise {raise_}"
        )
    tables, t_retrain = _retrain_without(cfg, data, run, params, idx, progress, trained)
    logits_all = torch.from_numpy(tables["train_logits"])
    loo_logits, control_logits = logits_all[torch.arange(len(idx)), idx], logits_all[-1, idx]
    reference = control_logits if cfg.reference == "control" else logits[idx]
    true = softmax_deviation(reference, loo_logits).numpy()
    by_variant = {v: {**correlations(r.sensitivity[idx].numpy(), true), "loo_nll": float(r.loo_nll[idx].mean())}
                  for v, r in variants.items()}
    by_loo_damping = {
        str(a): correlations(
            memory_perturbation(logits[idx], data.y_train[idx], V[idx], MPESettings("loo", a)).sensitivity.numpy(), true
        )
        for a in LOO_DAMPING_SWEEP
    }
    chosen = variants[cfg.mpe_variant]
    est = chosen.sensitivity[idx].numpy()
    metrics = {
        **{k: by_variant[cfg.mpe_variant][k] for k in ("pearson", "spearman", "slope")},
        "n_retrain": len(idx),
        "mpe_variant": cfg.mpe_variant,
        "posterior": cfg.posterior_name,
        "by_variant": by_variant,
        "by_loo_damping": by_loo_damping,
        "reference": cfg.reference,
        "truth": cfg.truth,
        "mean_true_deviation": float(true.mean()),
        "mean_estimated_deviation": float(est.mean()),
        "true_loo_nll": float(per_example_nll(loo_logits, data.y_train[idx]).mean()),
        "estimated_loo_nll": by_variant[cfg.mpe_variant]["loo_nll"],
        "estimated_loo_nll_all": chosen.estimated_loo_nll,
        "retrain_relaxation": relaxation,
        "ground_truth_converged": None if relaxation is None else relaxation >= MIN_RELAXATION,
        "mean_control_drift": float(softmax_deviation(logits[idx], control_logits).mean()),
        **_train_metrics(result),
        "seconds_train": t_train,
        "seconds_mpe": t_mpe,
        "seconds_retrain": t_retrain,
        "seconds": time.perf_counter() - start,
    }
    run.save_array("sensitivities", chosen.sensitivity)
    run.save_arrays("validation", indices=idx, true_deviation=true, estimated_deviation=est, loo_logits=loo_logits,
                    control_logits=control_logits, logits=logits, covariances=V[idx],
                    **{f"sensitivity_{v}": r.sensitivity for v, r in variants.items()})
    truth = "from scratch" if cfg.truth == "scratch" else "warm"
    converged = "" if relaxation is None else f" R = {relaxation:.1f}"
    run.save_figure(
        plots.plot_validation(
            true,
            est,
            f"{cfg.posterior_name}, {cfg.mpe_variant}, retraining {truth}{converged}",
            slope=metrics["slope"],
            pearson=metrics["pearson"],
        ),
        "validation",
    )
    if len(data.input_shape) == 3:
        run.save_figure(plots.plot_most_sensitive(data, chosen, cfg.n_show), "most_sensitive")
    run.write_metrics(metrics)
    return metrics


# --- 4. sensitivities during IVON training ---------------------------------------------------
def run_evolving(cfg: MPEExperimentConfig, data: Dataset, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Sensitivities at several iterations of training (IVON in the original), with the Monte-Carlo
    residual ē_i = mean_s softmax(f̃_s) − y_i, f̃_s ~ N(f_i, diag V_i) (`--mc-samples`), ranked by the
    last checkpoint and averaged in `--n-bins` bins.

    metrics: `iterations`, `spearman_to_last` (Spearman between each checkpoint's sensitivities and
    the last one's), `top_decile_overlap_to_last`.
    """
    from modelsense.mpe import plots

    its = _evolving_iterations(cfg, data)
    start = time.perf_counter()
    _, result, recorder = _train(cfg, data, progress, iterations=its)
    model_fn = _model_fn(cfg, data)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    sens = []
    with progress_bar(len(its), "sensitivities", enabled=progress) as bar:
        for it in its:
            snap = recorder.snapshots[f"iteration_{it}"]
            m = _module_with(model_fn, cfg.train.seed, snap["params"], cfg.train.device)
            opt = stand_in_optimizer(m, snap) if cfg.optim_var else None
            post = posterior_at(cfg, m, data, optimizer=opt)
            logits, V = predictive_covariances(post, data.x_train, cfg.bs_jacs)
            err = mc_prediction_error(
                logits, data.y_train, V, cfg.mc_samples, diagonal=cfg.mpe_variant == "diag", generator=gen
            )
            sens.append(memory_perturbation(logits, data.y_train, V, cfg.settings, error=err).sensitivity.numpy())
            bar.advance(1)
    sens = np.stack(sens)  # (K, N)
    order, binned = binned_by_rank(sens, cfg.n_bins)  # (N,), (K, n_bins)
    metrics = {
        "iterations": list(its),
        "total_iterations": math.ceil(data.n_train / cfg.train.bs) * cfg.train.epochs,
        "posterior": cfg.posterior_name,
        "mpe_variant": cfg.mpe_variant,
        **{k: dict(zip(map(str, its), v)) for k, v in agreement_with_last(sens).items()},
        **_train_metrics(result),
        "seconds": time.perf_counter() - start,
    }
    run.save_arrays("evolving", iterations=np.array(its), sensitivities=sens, binned=binned, order=order)
    run.save_figure(
        plots.plot_evolving(binned, its, f"{cfg.model.name} on {data.name}, {cfg.posterior_name}"), "evolving"
    )
    run.write_metrics(metrics)
    return metrics


# --- 5. leave one class out -------------------------------------------------------------------
def run_loco(cfg: MPEExperimentConfig, data: Dataset, run: RunDir, progress: bool = True,
             trained: TrainedRun | None = None) -> dict[str, Any]:
    """Leave-one-class-out: for each class c, the estimated NLL (mean MPE LOO NLL of the training
    examples of c, as the original; and `estimated_nll_joint`, the whole class removed at once:
    Δθ = Σ Σ_{j∈c} J_jᵀ e_j) against the true test NLL on the whole test set after warm-started
    retraining without c (all classes at once).

    metrics: `spearman` (per-example estimate vs true test NLL over classes), `spearman_joint`,
    `classes`, `estimated_nll`, `estimated_nll_joint`, `true_test_nll`, `accuracy_drop`, and the NLL
    of the removed training examples under the retrained models (`true_removed_train_nll`, what the
    estimates predict directly) with `spearman_removed`, `spearman_joint_removed`.
    """
    from modelsense.mpe import plots

    start = time.perf_counter()
    module, result, _ = _train(cfg, data, progress, trained=trained)
    post = _final_posterior(cfg, module, result, data)
    logits, V = predictive_covariances(post, data.x_train, cfg.bs_jacs)
    mpe = memory_perturbation(logits, data.y_train, V, cfg.settings)
    classes = torch.arange(data.num_classes)
    present = [int(c) for c in classes if bool((data.y_train == c).any())]
    estimated = group_loo_nll(mpe.loo_nll, data.y_train, data.num_classes)[present]
    removed = [(data.y_train == c).nonzero().flatten() for c in present]
    joint = group_removal_nll(post, data.x_train, logits, data.y_train, mpe.error, removed, cfg.bs_jacs)
    params = {k: v.detach().cpu() for k, v in module.named_parameters()}
    relaxation = retraining_relaxation(cfg.retrain_config(), data.n_train - max(len(r) for r in removed))
    if relaxation < MIN_RELAXATION:
        run.log(f"warning: the retraining relaxes the slowest directions by only R = {relaxation:.2f} e-folds (< "
                f"{MIN_RELAXATION}): the true NLLs are not converged; raise --epochs-retrain or --lr-retrain")
    tables, seconds_retrain = _retrain_without(cfg, data, run, params, removed, progress)
    true_nll = tables["test_loss"][:-1].mean(1).astype(np.float64)
    train_loss = tables["train_loss"][:-1]  # (classes, N)
    removed_nll = np.array([float(train_loss[m, r.numpy()].mean()) for m, r in enumerate(removed)])
    true_acc = tables["test_correct"][:-1].astype(np.float64).mean(1)
    control_acc = float(tables["test_correct"][-1].mean())
    acc_drop = control_acc - true_acc
    metrics = {
        "classes": present,
        "estimated_nll": estimated.tolist(),
        "estimated_nll_joint": joint,
        "true_test_nll": true_nll.tolist(),
        "true_test_accuracy": true_acc.tolist(),
        "accuracy_drop": acc_drop.tolist(),
        "control_test_nll": float(tables["test_loss"][-1].mean()),
        "control_test_accuracy": control_acc,
        "retrain_relaxation": relaxation,
        "ground_truth_converged": relaxation >= MIN_RELAXATION,
        "spearman": correlations(estimated.numpy(), true_nll)["spearman"],
        "pearson": correlations(estimated.numpy(), true_nll)["pearson"],
        "spearman_joint": correlations(np.array(joint), true_nll)["spearman"],
        "true_removed_train_nll": removed_nll.tolist(),
        "spearman_removed": correlations(estimated.numpy(), removed_nll)["spearman"],
        "spearman_joint_removed": correlations(np.array(joint), removed_nll)["spearman"],
        "posterior": cfg.posterior_name,
        "mpe_variant": cfg.mpe_variant,
        **_train_metrics(result),
        "seconds_retrain": seconds_retrain,
        "seconds": time.perf_counter() - start,
    }
    run.save_arrays("loco", classes=np.array(present), estimated_nll=estimated, estimated_nll_joint=np.array(joint),
                    true_test_nll=true_nll, true_test_accuracy=true_acc)
    points = {
        "true_test_nll": true_nll,
        "estimated_nll": estimated.numpy(),
        "accuracy_drop": acc_drop,
        "classes": present,
    }
    run.save_figure(plots.plot_loco([points], f"{cfg.model.name} on {data.name}"), "loco")
    run.write_metrics(metrics)
    return metrics


RUNNERS = {"loo-iterations": run_loo_iterations, "loo-l2reg": run_loo_l2reg, "validation": run_validation,
           "evolving": run_evolving, "loco": run_loco}


def run_experiment(experiment: str, cfg: MPEExperimentConfig, out: str | Path, progress: bool = True,
                   overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Check `cfg`, then run `experiment` into the run directory `out` (`execute` of its command)."""
    from modelsense.experiments.command import execute

    if experiment not in RUNNERS:
        raise ConfigError(f"unknown MPE experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
    return execute(COMMANDS[experiment], cfg, out, overwrite=overwrite, resume=resume, progress=progress)


def _check(experiment: str):
    def check(cfg: MPEExperimentConfig) -> Prepared:
        data = load_dataset_from_config(cfg.data)  # validates before anything is written
        check_experiment(experiment, cfg, data)
        trained = None
        if cfg.checkpoint is not None:
            if experiment not in CHECKPOINT_EXPERIMENTS:
                raise ConfigError(f"mpe {experiment} follows the training itself; --checkpoint is for "
                                  f"{' and '.join(CHECKPOINT_EXPERIMENTS)}")
            if cfg.optim_var:
                raise ConfigError(
                    "--optim-var reads the optimizer state, which a model.pt does not hold; use a Laplace "
                    "posterior (drop --optim-var) or train here"
                )
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
        if experiment in CHECKPOINT_EXPERIMENTS:
            return RUNNERS[experiment](cfg, prepared.data, run, progress, trained=prepared.extra["trained"])
        return RUNNERS[experiment](cfg, prepared.data, run, progress)

    return run


def spec_class(experiment: str) -> type:
    """The spec of `mpe <experiment>`: MPEExperimentConfig with the experiment's defaults (`DEFAULTS`)."""
    import dataclasses

    defaults = DEFAULTS[experiment]
    fields_ = []
    for f in dataclasses.fields(MPEExperimentConfig):
        if f.name not in defaults:
            continue
        if f.name == "train":
            train = dict(defaults["train"])
            fields_.append(("train", TrainConfig, field(default_factory=lambda t=train: TrainConfig(**t))))
        else:
            fields_.append((f.name, f.type, field(default=defaults[f.name], metadata=f.metadata)))
    name = "".join(w.capitalize() for w in experiment.split("-")) + "Spec"
    return dataclasses.make_dataclass(name, fields_, bases=(MPEExperimentConfig,))


#: experiments that can study a model trained elsewhere (they need no training trajectory)
CHECKPOINT_EXPERIMENTS = ("validation", "loco")
_POSTERIOR = {"optim_var", "var_version", "bs_jacs", "mpe_variant", "loo_damping"}
_RETRAIN = {"epochs_retrain", "lr_retrain", "lrmin_retrain", "bs_retrain", "retrain", "checkpoint"}
#: the options of each experiment beside data / model / training (the rest are hidden)
_OPTIONS = {"validation": _POSTERIOR | _RETRAIN | {"n_retrain", "reference", "truth"},
            "loo-iterations": _POSTERIOR | {"checkpoint_epochs"},
            "loo-l2reg": (_POSTERIOR - {"optim_var"}) | {"n_exp", "deltas_start", "deltas_stop", "smooth"},
            "evolving": _POSTERIOR | {"checkpoint_iterations", "mc_samples", "n_bins"},
            "loco": _POSTERIOR | _RETRAIN}
_HIDDEN_ALWAYS = {"data.corruption_ratio", "data.drop_classes", "model.width", "model.depth", "model.norm",
                  "train.checkpoint_epochs", "train.checkpoint_iterations"}


def _hidden(experiment: str) -> frozenset[str]:
    import dataclasses

    own = {f.name for f in dataclasses.fields(MPEExperimentConfig)} - {"data", "model", "train", "n_show"}
    hidden = set(_HIDDEN_ALWAYS) | {n for n in own - _OPTIONS[experiment]}
    if "retrain" in own - _OPTIONS[experiment]:
        hidden |= {f"retrain.{f.name}" for f in dataclasses.fields(RetrainOptions)}
    return frozenset(hidden)


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
                 f"(R >= {MIN_RELAXATION:g})")
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
    metrics = (resume and finished_metrics(run)) or run_experiment("validation", cfg, run, progress=progress,
                                                                   overwrite=True)
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
    for k, path in enumerate(spec.runs):
        path = Path(path)
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

