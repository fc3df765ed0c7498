"""`modelsense mpe ...`: the five memory-perturbation experiments (flags of the original scripts).

    modelsense mpe validation --n-retrain 200 --var-version kfac --out runs/mpe_val
    modelsense mpe loo-iterations --optimizer ivon --optim-var
    modelsense mpe loo-l2reg --n-exp 9 --deltas-start -1 --deltas-stop 3
    modelsense mpe evolving
    modelsense mpe loco

Defaults are the CPU settings on digits (`modelsense.experiments.mpe.DEFAULTS`); the original's
`--optimizer iblr` is accepted as `ivon`; `--name-exp NAME` writes to runs/mpe/NAME unless `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.errors import ConfigError
from modelsense.progress import set_quiet

mpe_app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="Memory-perturbation equation: LOO estimates, sensitivities, the five experiments of the paper.")
app.add_typer(mpe_app, name="mpe")



def _defaults(experiment: str) -> dict:
    from modelsense.experiments.mpe import DEFAULTS, MPEExperimentConfig

    base = MPEExperimentConfig()
    d = DEFAULTS[experiment]
    flat = {**{k: getattr(base.train, k) for k in ("optimizer", "lr", "lrmin", "epochs", "bs", "delta", "hess_init")}, **d["train"]}
    flat.update({k: v for k, v in d.items() if k != "train"})
    return flat


def _d(experiment: str, key: str):
    from modelsense.experiments.mpe import MPEExperimentConfig

    table = _defaults(experiment)
    return table[key] if key in table else getattr(MPEExperimentConfig(), key)


OptimVar = Annotated[bool, typer.Option("--optim-var/--no-optim-var", help="posterior from the optimizer state (IVON: 1/(N h + δ), Adam: 1/(N sqrt(v) + δ)) instead of Laplace")]
VarVersion = Annotated[str, typer.Option("--var-version", help="Laplace GGN structure: kfac, diag, full (small models), ekfac")]
BsJacs = Annotated[int, typer.Option("--bs-jacs", help="examples per chunk of predictive covariances (memory bound)")]
Variant = Annotated[str, typer.Option("--mpe-variant", help="full (C x C, default), diag (the paper's code), loo (Sherman-Morrison; for exact posteriors)")]
LooDamping = Annotated[float, typer.Option("--loo-damping", help="α of the loo variant: Δf = (I − α V Λ)^-1 V e (1 plain, 0 = full)")]
NRetrain = Annotated[int, typer.Option("--n-retrain", help="examples to retrain without")]
EpochsRetrain = Annotated[int, typer.Option("--epochs-retrain")]
LrRetrain = Annotated[float, typer.Option("--lr-retrain")]
LrMinRetrain = Annotated[float, typer.Option("--lrmin-retrain")]
BsRetrain = Annotated[Optional[int], typer.Option("--bs-retrain", help="batch size of retraining (default: --bs)")]
Reference = Annotated[str, typer.Option("--reference", help="true deviation against the control model retrained on all data (control) or against the trained model (trained, the original)")]
NameExp = Annotated[Optional[str], typer.Option("--name-exp", help="run name: writes to runs/mpe/NAME unless --out is given")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="run directory to write")]


def _run(experiment: str, out: Path | None, name_exp: str | None, quiet: bool, *, dataset, data_dir, n_train, standardize,
         data_seed, model, widths, activation, optimizer, lr, lrmin, epochs, bs, delta, hess_init, seed, device,
         fixed_batches, **fields) -> dict:
    from modelsense.experiments.mpe import MPEExperimentConfig, run_experiment

    set_quiet(quiet)
    optimizer = optimizer.lower()
    if optimizer == "iblr":
        optimizer = "ivon"
    if optimizer == "adamw":
        raise ConfigError("--optimizer adamw is not offered: the original's AdamW added weight decay 0.01 on top of the "
                          "L2 term (SEEDS 0.7); use --optimizer adam (L2 = δ/(2N)·||θ||² in the loss)")
    cfg = MPEExperimentConfig(
        data=o.data_config(dataset, data_dir, n_train, 0.0, "", standardize, data_seed),
        model=o.model_config(model, widths, activation, None, None, None),
        train=o.train_config(optimizer, lr, lrmin, epochs, bs, delta, hess_init, seed, device, fixed_batches),
        **fields,
    )
    target = out if out is not None else Path("runs/mpe") / (name_exp or experiment)
    metrics = run_experiment(experiment, cfg, target, progress=not quiet)
    metrics["out"] = str(target)
    return metrics


def _common_defaults(experiment: str) -> dict:
    return {k: _d(experiment, k) for k in ("optimizer", "lr", "lrmin", "epochs", "bs", "delta", "hess_init")}


# Every command repeats the shared flags explicitly (typer reads them from the signature).
_V = _common_defaults("validation")


@mpe_app.command("validation")
def validation(
    dataset: o.Dataset = "digits", data_dir: o.DataDir = None, n_train: o.NTrain = None, standardize: o.Standardize = False,
    data_seed: o.DataSeed = 0, model: o.Model = "mlp", widths: o.Widths = None, activation: o.Activation = None,
    optimizer: o.Optimizer = _V["optimizer"], lr: o.Lr = _V["lr"], lrmin: o.LrMin = _V["lrmin"], epochs: o.Epochs = _V["epochs"],
    bs: o.Bs = _V["bs"], delta: o.Delta = _V["delta"], hess_init: o.HessInit = _V["hess_init"], seed: o.Seed = 0,
    device: o.Device = "cpu", fixed_batches: o.FixedBatches = False,
    optim_var: OptimVar = False, var_version: VarVersion = "kfac", bs_jacs: BsJacs = 500, mpe_variant: Variant = "full",
    loo_damping: LooDamping = 1.0, n_retrain: NRetrain = _d("validation", "n_retrain"),
    epochs_retrain: EpochsRetrain = _d("validation", "epochs_retrain"), lr_retrain: LrRetrain = _d("validation", "lr_retrain"),
    lrmin_retrain: LrMinRetrain = _d("validation", "lrmin_retrain"), bs_retrain: BsRetrain = _d("validation", "bs_retrain"),
    reference: Reference = "control", name_exp: NameExp = None, out: OutOpt = None, quiet: o.Quiet = False,
) -> None:
    """Estimated vs true softmax deviation under removal of --n-retrain examples (Fig. 2); metrics pearson, spearman, n_retrain."""
    m = _run("validation", out, name_exp, quiet, dataset=dataset, data_dir=data_dir, n_train=n_train, standardize=standardize,
             data_seed=data_seed, model=model, widths=widths, activation=activation, optimizer=optimizer, lr=lr, lrmin=lrmin,
             epochs=epochs, bs=bs, delta=delta, hess_init=hess_init, seed=seed, device=device, fixed_batches=fixed_batches,
             optim_var=optim_var, var_version=var_version, bs_jacs=bs_jacs, mpe_variant=mpe_variant, loo_damping=loo_damping,
             n_retrain=n_retrain, epochs_retrain=epochs_retrain, lr_retrain=lr_retrain, lrmin_retrain=lrmin_retrain,
             bs_retrain=bs_retrain, reference=reference)
    by = "  ".join(f"{v}: P {r['pearson']:.3f} S {r['spearman']:.3f}" for v, r in m["by_variant"].items())
    console.print(f"{m['posterior']}, {m['n_retrain']} retrained: Pearson {m['pearson']:.3f}, Spearman {m['spearman']:.3f} "
                  f"({m['mpe_variant']}) | {by}  -> {m['out']}")


_I = _common_defaults("loo-iterations")


@mpe_app.command("loo-iterations")
def loo_iterations(
    dataset: o.Dataset = "digits", data_dir: o.DataDir = None, n_train: o.NTrain = None, standardize: o.Standardize = False,
    data_seed: o.DataSeed = 0, model: o.Model = "mlp", widths: o.Widths = None, activation: o.Activation = None,
    optimizer: o.Optimizer = _I["optimizer"], lr: o.Lr = _I["lr"], lrmin: o.LrMin = _I["lrmin"], epochs: o.Epochs = _I["epochs"],
    bs: o.Bs = _I["bs"], delta: o.Delta = _I["delta"], hess_init: o.HessInit = _I["hess_init"], seed: o.Seed = 0,
    device: o.Device = "cpu", fixed_batches: o.FixedBatches = False,
    optim_var: OptimVar = False, var_version: VarVersion = "kfac", bs_jacs: BsJacs = 500, mpe_variant: Variant = "full",
    loo_damping: LooDamping = 1.0,
    checkpoint_epochs: Annotated[str, typer.Option("--checkpoint-epochs", help="comma-separated epochs (default: the original's 1,2,5,10,20,30,... up to --epochs)")] = "",
    name_exp: NameExp = None, out: OutOpt = None, quiet: o.Quiet = False,
) -> None:
    """LOO-CV estimate at checkpoints during training vs test NLL per epoch (Fig. 1b/5); metrics estimated_nll, test_nll, final_abs_gap."""
    extra = {"checkpoint_epochs": o.int_list(checkpoint_epochs, "--checkpoint-epochs")} if checkpoint_epochs else {}
    m = _run("loo-iterations", out, name_exp, quiet, dataset=dataset, data_dir=data_dir, n_train=n_train, standardize=standardize,
             data_seed=data_seed, model=model, widths=widths, activation=activation, optimizer=optimizer, lr=lr, lrmin=lrmin,
             epochs=epochs, bs=bs, delta=delta, hess_init=hess_init, seed=seed, device=device, fixed_batches=fixed_batches,
             optim_var=optim_var, var_version=var_version, bs_jacs=bs_jacs, mpe_variant=mpe_variant, loo_damping=loo_damping, **extra)
    console.print(f"{m['posterior']}: estimated LOO NLL {m['estimated_nll'][-1]:.4f} vs test NLL {m['test_nll'][-1]:.4f} "
                  f"(|gap| {m['final_abs_gap']:.4f}) at epoch {m['checkpoint_epochs'][-1]}  -> {m['out']}")


_L = _common_defaults("loo-l2reg")


@mpe_app.command("loo-l2reg")
def loo_l2reg(
    dataset: o.Dataset = "digits", data_dir: o.DataDir = None, n_train: o.NTrain = None, standardize: o.Standardize = False,
    data_seed: o.DataSeed = 0, model: o.Model = "mlp", widths: o.Widths = None, activation: o.Activation = None,
    optimizer: o.Optimizer = _L["optimizer"], lr: o.Lr = _L["lr"], lrmin: o.LrMin = _L["lrmin"], epochs: o.Epochs = _L["epochs"],
    bs: o.Bs = _L["bs"], delta: o.Delta = _L["delta"], hess_init: o.HessInit = _L["hess_init"], seed: o.Seed = 0,
    device: o.Device = "cpu", fixed_batches: o.FixedBatches = False,
    var_version: VarVersion = "kfac", bs_jacs: BsJacs = 500, mpe_variant: Variant = "full", loo_damping: LooDamping = 1.0,
    n_exp: Annotated[int, typer.Option("--n-exp", help="number of δ values")] = _d("loo-l2reg", "n_exp"),
    deltas_start: Annotated[float, typer.Option("--deltas-start", help="δ = logspace(start, stop, n_exp)")] = _d("loo-l2reg", "deltas_start"),
    deltas_stop: Annotated[float, typer.Option("--deltas-stop")] = _d("loo-l2reg", "deltas_stop"),
    name_exp: NameExp = None, out: OutOpt = None, quiet: o.Quiet = False,
) -> None:
    """LOO-CV estimate and test NLL over a grid of δ (Fig. 4); metrics best_delta_estimated, best_delta_test. (--delta is unused.)"""
    m = _run("loo-l2reg", out, name_exp, quiet, dataset=dataset, data_dir=data_dir, n_train=n_train, standardize=standardize,
             data_seed=data_seed, model=model, widths=widths, activation=activation, optimizer=optimizer, lr=lr, lrmin=lrmin,
             epochs=epochs, bs=bs, delta=delta, hess_init=hess_init, seed=seed, device=device, fixed_batches=fixed_batches,
             var_version=var_version, bs_jacs=bs_jacs, mpe_variant=mpe_variant, loo_damping=loo_damping, n_exp=n_exp,
             deltas_start=deltas_start, deltas_stop=deltas_stop)
    console.print(f"best δ by LOO estimate {m['best_delta_estimated']:.4g}, by test NLL {m['best_delta_test']:.4g}  -> {m['out']}")


_E = _common_defaults("evolving")


@mpe_app.command("evolving")
def evolving(
    dataset: o.Dataset = "digits", data_dir: o.DataDir = None, n_train: o.NTrain = None, standardize: o.Standardize = False,
    data_seed: o.DataSeed = 0, model: o.Model = "mlp", widths: o.Widths = None, activation: o.Activation = None,
    optimizer: o.Optimizer = _E["optimizer"], lr: o.Lr = _E["lr"], lrmin: o.LrMin = _E["lrmin"], epochs: o.Epochs = _E["epochs"],
    bs: o.Bs = _E["bs"], delta: o.Delta = _E["delta"], hess_init: o.HessInit = _E["hess_init"], seed: o.Seed = 0,
    device: o.Device = "cpu", fixed_batches: o.FixedBatches = False,
    optim_var: OptimVar = True, var_version: VarVersion = "kfac", bs_jacs: BsJacs = 500, mpe_variant: Variant = "full",
    loo_damping: LooDamping = 1.0,
    checkpoint_iterations: Annotated[str, typer.Option("--checkpoint-iterations", help="comma-separated optimizer steps (default: 10, 10%, 40%, 100% of training)")] = "",
    mc_samples: Annotated[int, typer.Option("--mc-samples", help="Monte-Carlo samples of the residual")] = 150,
    n_bins: Annotated[int, typer.Option("--n-bins", help="bins of the ranking")] = 100,
    name_exp: NameExp = None, out: OutOpt = None, quiet: o.Quiet = False,
) -> None:
    """Sensitivities at several iterations of IVON training, ranked by the last (Fig. 3b/11); metrics spearman_to_last."""
    m = _run("evolving", out, name_exp, quiet, dataset=dataset, data_dir=data_dir, n_train=n_train, standardize=standardize,
             data_seed=data_seed, model=model, widths=widths, activation=activation, optimizer=optimizer, lr=lr, lrmin=lrmin,
             epochs=epochs, bs=bs, delta=delta, hess_init=hess_init, seed=seed, device=device, fixed_batches=fixed_batches,
             optim_var=optim_var, var_version=var_version, bs_jacs=bs_jacs, mpe_variant=mpe_variant, loo_damping=loo_damping,
             checkpoint_iterations=o.int_list(checkpoint_iterations, "--checkpoint-iterations"), mc_samples=mc_samples, n_bins=n_bins)
    rho = "  ".join(f"{k}: {v:.3f}" for k, v in m["spearman_to_last"].items())
    console.print(f"Spearman to the last checkpoint by iteration: {rho}  -> {m['out']}")


_C = _common_defaults("loco")


@mpe_app.command("loco")
def loco(
    dataset: o.Dataset = "digits", data_dir: o.DataDir = None, n_train: o.NTrain = None, standardize: o.Standardize = False,
    data_seed: o.DataSeed = 0, model: o.Model = "mlp", widths: o.Widths = None, activation: o.Activation = None,
    optimizer: o.Optimizer = _C["optimizer"], lr: o.Lr = _C["lr"], lrmin: o.LrMin = _C["lrmin"], epochs: o.Epochs = _C["epochs"],
    bs: o.Bs = _C["bs"], delta: o.Delta = _C["delta"], hess_init: o.HessInit = _C["hess_init"], seed: o.Seed = 0,
    device: o.Device = "cpu", fixed_batches: o.FixedBatches = False,
    optim_var: OptimVar = False, var_version: VarVersion = "kfac", bs_jacs: BsJacs = 500, mpe_variant: Variant = "full",
    loo_damping: LooDamping = 1.0, epochs_retrain: EpochsRetrain = _d("loco", "epochs_retrain"),
    lr_retrain: LrRetrain = _d("loco", "lr_retrain"), lrmin_retrain: LrMinRetrain = _d("loco", "lrmin_retrain"),
    bs_retrain: BsRetrain = None, name_exp: NameExp = None, out: OutOpt = None, quiet: o.Quiet = False,
) -> None:
    """Leave one class out: estimated vs true test NLL after retraining without each class (Fig. 3a); metrics spearman."""
    m = _run("loco", out, name_exp, quiet, dataset=dataset, data_dir=data_dir, n_train=n_train, standardize=standardize,
             data_seed=data_seed, model=model, widths=widths, activation=activation, optimizer=optimizer, lr=lr, lrmin=lrmin,
             epochs=epochs, bs=bs, delta=delta, hess_init=hess_init, seed=seed, device=device, fixed_batches=fixed_batches,
             optim_var=optim_var, var_version=var_version, bs_jacs=bs_jacs, mpe_variant=mpe_variant, loo_damping=loo_damping,
             epochs_retrain=epochs_retrain, lr_retrain=lr_retrain, lrmin_retrain=lrmin_retrain, bs_retrain=bs_retrain)
    console.print(f"Spearman over classes: {m['spearman']:.3f} (per-example estimate), {m['spearman_joint']:.3f} (joint)  -> {m['out']}")
