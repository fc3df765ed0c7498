"""`modelsense mpe ...`: the five memory-perturbation experiments of Nickl et al. 2023
(flags of their scripts).

    modelsense mpe validation --n-retrain 200 --var-version kfac --out runs/mpe_val
    modelsense mpe loo-iterations --optimizer ivon --optim-var
    modelsense mpe loo-l2reg --n-exp 9 --deltas-start -1 --deltas-stop 3
    modelsense mpe evolving
    modelsense mpe loco

Defaults are the CPU settings on digits (`modelsense.experiments.mpe.DEFAULTS`); the MPE code's
`--optimizer iblr` is accepted as `ivon`; `--name-exp NAME` writes to runs/mpe/NAME unless `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.data import DataConfig
from modelsense.experiments.mpe import DEFAULTS, MPEExperimentConfig, run_experiment
from modelsense.models import ModelConfig
from modelsense.mpe.ground_truth import MIN_RELAXATION
from modelsense.progress import set_quiet
from modelsense.training.config import TrainConfig

mpe_app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="Memory-perturbation equation: LOO estimates, sensitivities, the five experiments of Nickl et al. 2023.")
app.add_typer(mpe_app, name="mpe")


def _defaults(experiment: str) -> dict:
    d = DEFAULTS[experiment]
    flat = {**{k: getattr(MPEExperimentConfig().train, k) for k in ("optimizer", "lr", "lrmin", "epochs", "bs", "delta", "hess_init")}, **d["train"]}
    flat.update({k: v for k, v in d.items() if k != "train"})
    return flat


def _d(experiment: str, key: str):
    table = _defaults(experiment)
    return table[key] if key in table else getattr(MPEExperimentConfig(), key)


OptimVar = Annotated[bool, typer.Option("--optim-var/--no-optim-var", help="posterior from the optimizer state (IVON: 1/(N h + δ), Adam: 1/(N sqrt(v) + δ)) instead of Laplace")]
VarVersion = Annotated[str, typer.Option("--var-version", help="Laplace GGN structure: kfac, diag, full (small models), ekfac")]
BsJacs = Annotated[int, typer.Option("--bs-jacs", help="examples per chunk of predictive covariances (memory bound)")]
Variant = Annotated[str, typer.Option("--mpe-variant", help="full (C x C, default), diag (Nickl et al. 2023's code), loo (Sherman-Morrison; for exact posteriors)")]
LooDamping = Annotated[float, typer.Option("--loo-damping", help="α of the loo variant: Δf = (I − α V Λ)^-1 V e (1 plain, 0 = full)")]
NRetrain = Annotated[int, typer.Option("--n-retrain", help="examples to retrain without")]
EpochsRetrain = Annotated[int, typer.Option("--epochs-retrain")]
LrRetrain = Annotated[float, typer.Option("--lr-retrain")]
LrMinRetrain = Annotated[float, typer.Option("--lrmin-retrain")]
BsRetrain = Annotated[Optional[int], typer.Option("--bs-retrain", help="batch size of retraining (default: --bs)")]
Reference = Annotated[str, typer.Option("--reference", help="true deviation against the control model retrained on all data (control) or against the trained model (trained, as Nickl et al. 2023's code)")]
NameExp = Annotated[Optional[str], typer.Option("--name-exp", help="run name: writes to runs/mpe/NAME unless --out is given")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="run directory to write")]


# The options every MPE command shares beside data / model / training: the posterior and, for the
# experiments that retrain (validation, loco), the retraining. Each group hands the command a dict
# of MPEExperimentConfig fields; defaults are the fields' (an experiment's DEFAULTS override them).
_BASE = MPEExperimentConfig()
_GROUPS: dict[str, o.Group] = {
    group: (dict, [(name, annotation, getattr(_BASE, name)) for name, annotation in options])
    for group, options in {
        "posterior": [("optim_var", OptimVar), ("var_version", VarVersion), ("bs_jacs", BsJacs),
                      ("mpe_variant", Variant), ("loo_damping", LooDamping)],
        "retrain": [("epochs_retrain", EpochsRetrain), ("lr_retrain", LrRetrain), ("lrmin_retrain", LrMinRetrain),
                    ("bs_retrain", BsRetrain)],
    }.items()
}
#: options of the shared groups the MPE scripts do not have
_OMIT = ("corruption_ratio", "drop_classes", "width", "depth", "norm", "checkpoint_epochs", "checkpoint_iterations")
_GROUP_OPTIONS = {name for _, opts in (o.GROUPS["train_cfg"], *_GROUPS.values()) for name, _, _ in opts}


def _options(experiment: str, omit: tuple[str, ...] = ()):
    """`options.with_configs` for one experiment: its defaults (`DEFAULTS`) on the shared options."""
    defaults = {k: v for k, v in _defaults(experiment).items() if k in _GROUP_OPTIONS}
    return o.with_configs(groups=_GROUPS, omit=_OMIT + omit, **defaults)


def _run(experiment: str, data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: Path | None,
         name_exp: str | None, quiet: bool, overwrite: bool, **fields: Any) -> dict:
    set_quiet(quiet)
    cfg = MPEExperimentConfig(data=data_cfg, model=model_cfg, train=train_cfg, **fields)
    target = out if out is not None else Path("runs/mpe") / (name_exp or experiment)
    metrics = run_experiment(experiment, cfg, target, progress=not quiet, overwrite=overwrite)
    metrics["out"] = str(target)
    return metrics


@mpe_app.command("validation")
@_options("validation")
def validation(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, posterior: dict[str, Any], retrain: dict[str, Any],
    n_retrain: NRetrain = _d("validation", "n_retrain"), reference: Reference = "control",
    name_exp: NameExp = None, out: OutOpt = None, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Estimated vs true softmax deviation under removal of --n-retrain examples (Nickl et al. 2023, Fig. 2); metrics pearson, spearman, n_retrain."""
    m = _run("validation", data_cfg, model_cfg, train_cfg, out, name_exp, quiet, overwrite, **posterior, **retrain,
             n_retrain=n_retrain, reference=reference)
    by = "  ".join(f"{v}: P {r['pearson']:.3f} S {r['spearman']:.3f} slope {r['slope']:.3g}" for v, r in m["by_variant"].items())
    console.print(f"{m['posterior']}, {m['n_retrain']} retrained: Pearson {m['pearson']:.3f}, Spearman {m['spearman']:.3f}, "
                  f"slope {m['slope']:.3g} ({m['mpe_variant']}; mean deviation estimated {m['mean_estimated_deviation']:.4g} vs true "
                  f"{m['mean_true_deviation']:.4g}, LOO NLL {m['estimated_loo_nll']:.4f} vs {m['true_loo_nll']:.4f}) | {by}  -> {m['out']}")
    if not m["ground_truth_converged"]:
        console.print(f"warning: the retraining relaxed the slowest directions by only R = {m['retrain_relaxation']:.2f} e-folds: "
                      f"the true deviations are underestimated; raise --epochs-retrain or --lr-retrain (R >= {MIN_RELAXATION:g})")


@mpe_app.command("loo-iterations")
@_options("loo-iterations")
def loo_iterations(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, posterior: dict[str, Any],
    checkpoint_epochs: Annotated[str, typer.Option("--checkpoint-epochs", help="comma-separated epochs (default: the MPE code's 1,2,5,10,20,30,... up to --epochs)")] = "",
    name_exp: NameExp = None, out: OutOpt = None, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """LOO-CV estimate at checkpoints during training vs test NLL per epoch (Nickl et al. 2023, Fig. 1b/5); metrics estimated_nll, test_nll, final_abs_gap."""
    extra = {"checkpoint_epochs": o.int_list(checkpoint_epochs, "--checkpoint-epochs")} if checkpoint_epochs else {}
    m = _run("loo-iterations", data_cfg, model_cfg, train_cfg, out, name_exp, quiet, overwrite, **posterior, **extra)
    console.print(f"{m['posterior']}: estimated LOO NLL {m['estimated_nll'][-1]:.4f} vs test NLL {m['test_nll'][-1]:.4f} "
                  f"(|gap| {m['final_abs_gap']:.4f}) at epoch {m['checkpoint_epochs'][-1]}  -> {m['out']}")


@mpe_app.command("loo-l2reg")
@_options("loo-l2reg", omit=("optim_var",))
def loo_l2reg(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, posterior: dict[str, Any],
    n_exp: Annotated[int, typer.Option("--n-exp", help="number of δ values")] = _d("loo-l2reg", "n_exp"),
    deltas_start: Annotated[float, typer.Option("--deltas-start", help="δ = logspace(start, stop, n_exp)")] = _d("loo-l2reg", "deltas_start"),
    deltas_stop: Annotated[float, typer.Option("--deltas-stop")] = _d("loo-l2reg", "deltas_stop"),
    name_exp: NameExp = None, out: OutOpt = None, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """LOO-CV estimate and test NLL over a grid of δ (Nickl et al. 2023, Fig. 4); metrics best_delta_estimated, best_delta_test. (--delta is unused.)"""
    m = _run("loo-l2reg", data_cfg, model_cfg, train_cfg, out, name_exp, quiet, overwrite, **posterior, n_exp=n_exp,
             deltas_start=deltas_start, deltas_stop=deltas_stop)
    console.print(f"best δ by LOO estimate {m['best_delta_estimated']:.4g}, by test NLL {m['best_delta_test']:.4g}  -> {m['out']}")


@mpe_app.command("evolving")
@_options("evolving")
def evolving(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, posterior: dict[str, Any],
    checkpoint_iterations: Annotated[str, typer.Option("--checkpoint-iterations", help="comma-separated optimizer steps (default: 10, 10%, 40%, 100% of training)")] = "",
    mc_samples: Annotated[int, typer.Option("--mc-samples", help="Monte-Carlo samples of the residual")] = 150,
    n_bins: Annotated[int, typer.Option("--n-bins", help="bins of the ranking")] = 100,
    name_exp: NameExp = None, out: OutOpt = None, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Sensitivities at several iterations of IVON training, ranked by the last (Nickl et al. 2023, Fig. 3b/11); metrics spearman_to_last."""
    m = _run("evolving", data_cfg, model_cfg, train_cfg, out, name_exp, quiet, overwrite, **posterior,
             checkpoint_iterations=o.int_list(checkpoint_iterations, "--checkpoint-iterations"), mc_samples=mc_samples,
             n_bins=n_bins)
    rho = "  ".join(f"{k}: {v:.3f}" for k, v in m["spearman_to_last"].items())
    console.print(f"Spearman to the last checkpoint by iteration: {rho}  -> {m['out']}")


@mpe_app.command("loco")
@_options("loco")
def loco(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, posterior: dict[str, Any], retrain: dict[str, Any],
    name_exp: NameExp = None, out: OutOpt = None, overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Leave one class out: estimated vs true test NLL after retraining without each class (Nickl et al. 2023, Fig. 3a); metrics spearman."""
    m = _run("loco", data_cfg, model_cfg, train_cfg, out, name_exp, quiet, overwrite, **posterior, **retrain)
    console.print(f"Spearman over classes: {m['spearman']:.3f} (per-example estimate), {m['spearman_joint']:.3f} (joint)  -> {m['out']}")
