"""`modelsense spectrum`, `modelsense effdim width-sweep`, `modelsense effdim blr`.

    modelsense spectrum --dataset digits --model mlp --k 20 --out runs/spectrum
    modelsense spectrum --dataset digits --trace-samples 100 --density-probes 5 --out runs/spectrum_full
    modelsense effdim width-sweep --out runs/width_sweep            # the prototype's sweep on digits
    modelsense effdim width-sweep --model resnet18 --widths 1,2,4,8,16,32,64 --dataset cifar10 --device cuda
    modelsense effdim blr --out runs/blr

Matrices are of the training loss summed over the examples unless `--reduction mean`; s is on the
scale of that matrix (default 100 for the summed loss, 100 / N for the mean): see
`modelsense.experiments.curvature`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from modelsense.cli import options as o
from modelsense.cli.app import app, console
from modelsense.curvature.spectrum import DEFAULT_S_SUM, SpectrumConfig
from modelsense.data import DataConfig
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig
from modelsense.progress import set_quiet
from modelsense.training.config import TrainConfig

effdim_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         help="Effective dimensionality N_eff = Σ λ/(λ + s): width sweeps and Bayesian linear regression.")
app.add_typer(effdim_app, name="effdim")

K = Annotated[int, typer.Option("--k", help="number of top eigenvalues (Lanczos with full reorthogonalisation)")]
Matrix = Annotated[str, typer.Option("--matrix", help="hessian, ggn (= Fisher for softmax) or ef (empirical Fisher)")]
Reduction = Annotated[str, typer.Option("--reduction", help="the loss the matrix is of: sum (default) or mean over the training examples")]
S = Annotated[str, typer.Option("--s", help=f"comma-separated N_eff regularisers s, on the scale of the matrix; the first is the headline (default {DEFAULT_S_SUM:g} for --reduction sum, {DEFAULT_S_SUM:g}/N for mean)")]
WeightsOnly = Annotated[bool, typer.Option("--weights-only", help="only parameters with >= 2 dims (weights; no biases / norm parameters), as Maddox et al. 2020")]
LanczosTol = Annotated[float, typer.Option("--lanczos-tol", help="relative residual below which a Ritz value counts as converged")]
ChunkSize = Annotated[int, typer.Option("--chunk-size", help="examples per chunk of the matrix-vector products (memory bound)")]


def float_list(text: str | None, what: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, e.g. 1,100; received {text!r}") from None


@app.command()
@o.with_configs()
def spectrum(
    data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
    k: K = SpectrumConfig.k, matrix: Matrix = SpectrumConfig.matrix, reduction: Reduction = SpectrumConfig.reduction,
    s: S = "", weights_only: WeightsOnly = False,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="model.pt of `modelsense train` (then the model and training options are not used)")] = None,
    trace_samples: Annotated[int, typer.Option("--trace-samples", help="Hutchinson probes for the trace, one matrix-vector product each (0: no trace; e.g. 100)")] = SpectrumConfig.trace_samples,
    density_probes: Annotated[int, typer.Option("--density-probes", help="probes of the SLQ spectral density, --density-steps products each (0: no density; e.g. 5)")] = SpectrumConfig.density_probes,
    density_steps: Annotated[int, typer.Option("--density-steps", help="Lanczos steps per SLQ probe")] = SpectrumConfig.density_steps,
    lanczos_tol: LanczosTol = SpectrumConfig.lanczos_tol, chunk_size: ChunkSize = SpectrumConfig.chunk_size,
    out: o.Out = Path("runs/spectrum"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Train (or load --checkpoint) and compute the top-k eigenvalues and N_eff of the loss curvature
    (the trace and spectral density on request: they cost far more products than the eigenvalues)."""
    from modelsense.experiments.curvature import describe_cost, run_spectrum

    set_quiet(quiet)
    metrics = run_spectrum(data_cfg, model_cfg, train_cfg, out, k=k, matrix=matrix, reduction=reduction,
                           s=float_list(s, "--s"), weights_only=weights_only, checkpoint=checkpoint,
                           trace_samples=trace_samples, density_probes=density_probes, density_steps=density_steps,
                           lanczos_tol=lanczos_tol, chunk_size=chunk_size, progress=not quiet, overwrite=overwrite)
    lam = metrics["eigenvalues"]
    trace = "" if metrics["trace"] is None else f"  trace {metrics['trace']:.4g} ± {metrics['trace_standard_error']:.2g}"
    console.print(f"{metrics['matrix']} ({metrics['reduction']} loss), {metrics['n_params']} parameters: "
                  f"λ_1 {lam[0]:.4g} … λ_{len(lam)} {lam[-1]:.4g}{trace}")
    console.print("N_eff " + "  ".join(f"(s={float(v):g}) {n:.4g}" for v, n in metrics["effective_dimension_by_s"].items())
                  + f"  -> {out}")
    skipped = [f"{what} (--{option} N)" for what, option in (("trace", "trace-samples"), ("density", "density-probes"))
               if what not in metrics["cost"]]
    console.print(f"cost: {describe_cost(metrics['cost'])}" + (f"; not computed: {', '.join(skipped)}" if skipped else ""))


@effdim_app.command("width-sweep")
@o.with_configs(corruption_ratio=0.2, standardize=True, optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=400, bs=128,
                delta=0.0)
def width_sweep(
    data_cfg: DataConfig, train_cfg: TrainConfig,
    model: Annotated[str, typer.Option("--model", "-m", help="mlp (widths of the hidden layers), cnn or resnet18 (their --width)")] = "mlp",
    widths: Annotated[str, typer.Option("--widths", help="comma-separated widths to train")] = "2,4,8,12,16,24,32,64,128,256,512",
    hidden_layers: Annotated[int, typer.Option("--hidden-layers", help="mlp: number of hidden layers, all of the width")] = 1,
    activation: o.Activation = None, depth: o.Depth = None, norm: o.Norm = None,
    k: K = 50, matrix: Matrix = "hessian", reduction: Reduction = "sum", s: S = "",
    weights_only: WeightsOnly = False,
    train_loss_threshold: Annotated[float, typer.Option("--train-loss-threshold", help="models with a final mean train NLL below it count as interpolating (the Spearman correlations)")] = 0.01,
    save_models: Annotated[bool, typer.Option("--save-models", help="keep each trained model as widths/model_<w>.pt")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue a run in --out: skip widths already finished")] = False,
    lanczos_tol: LanczosTol = 1e-5, chunk_size: ChunkSize = 2048,
    out: o.Out = Path("runs/width_sweep"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Models from narrow to wide: test loss, parameter count and N_eff against width (double descent).

    The default is the prototype: one-hidden-layer ReLU MLPs on standardised digits with 20% label
    noise, Adam at a constant rate 3e-3 (--lrmin = --lr; set both to change it), 400 epochs, batch
    128, no weight decay; top-50 Hessian eigenvalues of the summed training loss, s = 100.
    """
    from modelsense.experiments.curvature import WidthSweepConfig, run_width_sweep

    set_quiet(quiet)
    sweep = WidthSweepConfig(widths=o.int_list(widths, "--widths"), model=model, hidden_layers=hidden_layers,
                             activation=activation, depth=depth, norm=norm, k=k, matrix=matrix, reduction=reduction,
                             s=float_list(s, "--s"), weights_only=weights_only,
                             train_loss_threshold=train_loss_threshold, lanczos_tol=lanczos_tol,
                             chunk_size=chunk_size, save_models=save_models)
    m = run_width_sweep(data_cfg, train_cfg, sweep, out, resume=resume, progress=not quiet, overwrite=overwrite)
    console.print(f"{'width':>6} {'params':>8} {'train loss':>10} {'test loss':>9} {'test err':>8} {'N_eff':>7}")
    for i, w in enumerate(m["widths"]):
        console.print(f"{w:>6} {m['n_params'][i]:>8} {m['train_loss'][i]:>10.4g} {m['test_loss'][i]:>9.4g} "
                      f"{m['test_error'][i]:>8.3f} {m['effective_dimension'][i]:>7.3g}")

    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    console.print(f"Spearman with test loss, {m['n_interpolating']} models with train loss < {m['train_loss_threshold']:g}: "
                  f"N_eff {fmt(m['spearman_effdim_test_loss'])}, params {fmt(m['spearman_params_test_loss'])}; "
                  f"all {len(m['widths'])}: N_eff {fmt(m['spearman_effdim_test_loss_all'])}, "
                  f"params {fmt(m['spearman_params_test_loss_all'])}  -> {out}")


@effdim_app.command("blr")
def blr(
    n_points: Annotated[int, typer.Option("--n-points", help="inputs x = linspace(0, x-max, n-points), added one at a time")] = 300,
    n_frequencies: Annotated[int, typer.Option("--n-frequencies", help="F: features cos((f+1)πx), sin((f+1)πx), P = 2F")] = 100,
    x_max: Annotated[float, typer.Option("--x-max")] = 50.0,
    noise_variance: Annotated[float, typer.Option("--noise-variance", help="σ² of the likelihood")] = 0.1,
    prior_variance: Annotated[float, typer.Option("--prior-variance", help="τ² of the prior N(0, τ² I)")] = 3.0,
    s: Annotated[float, typer.Option("--s", help="s of the posterior-covariance N_eff")] = 5.0,
    s_function: Annotated[float, typer.Option("--s-function", help="s of the function-space-covariance N_eff")] = 5.0,
    shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle", help="add the points in a random order")] = True,
    seed: o.Seed = 0,
    out: o.Out = Path("runs/blr"), overwrite: o.Overwrite = False, quiet: o.Quiet = False,
) -> None:
    """Bayesian linear regression (closed form): N_eff of the posterior contracts once n passes P."""
    from modelsense.experiments.curvature import BLRConfig, run_blr

    set_quiet(quiet)
    m = run_blr(BLRConfig(n_points=n_points, n_frequencies=n_frequencies, x_max=x_max, noise_variance=noise_variance,
                          prior_variance=prior_variance, s_parameter=s, s_function=s_function, seed=seed,
                          shuffle=shuffle), out, overwrite=overwrite)
    console.print(f"P = {m['n_params']}: posterior N_eff {m['effdim_posterior_first']:.4g} (n=1) -> "
                  f"{m['effdim_posterior_last']:.4g} (n={m['n_points']}); function-space N_eff "
                  f"{m['effdim_function_last']:.4g}; well-determined parameters {m['effdim_hessian_last']:.4g}  -> {out}")
