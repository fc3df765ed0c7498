"""`modelsense spectrum`, `modelsense effdim width-sweep`, `modelsense effdim blr`.

Maddox, Benton & Wilson (2020), "Rethinking parameter counting": the effective dimensionality
N_eff(H, s) = Σ_i λ_i / (λ_i + s) of the Hessian H of the training loss at the trained parameters
tracks generalisation better than the parameter count. The numbers come from `modelsense.curvature`
(`compute_spectrum`, `width_sweep_summary`, `blr_posterior_contraction`), the figures from
`modelsense.curvature.plots`; this module runs them.

Conventions (`modelsense.curvature.spectrum`): the matrix is of the training loss SUMMED over the N
examples (`--reduction mean` divides it by N), at the trained parameters, in eval mode; s is on the
scale of that matrix (default 100 for the sum, 100 / N for the mean); N_eff counts the converged
top-k Ritz values (a lower bound of the full N_eff); the trace and the density are computed only on
request (they cost far more products than the eigenvalues; metrics.json's `cost` says what each part
cost); `weights_only` restricts the matrix to the parameters with >= 2 dimensions.

Run directories:
    spectrum:     config.json, metrics.json (eigenvalues, eigenvalues_converged, trace and its
                  standard error (None unless asked), effective_dimension (first s), effective_dimension_by_s,
                  s, n_params, matrix, reduction, train/test loss and accuracy, cost {part: {matvecs,
                  seconds}}, num_matvecs, seconds (the spectrum)), spectrum.npz, model.pt (trained here),
                  figures/spectrum.png
    width-sweep:  config.json, widths/width_<w>.json (one per finished model: losses, eigenvalues, history;
                  the resumable state: `--resume` trains only the widths without one, and may change the
                  widths, s and the threshold, since N_eff is recomputed from the saved eigenvalues),
                  widths/model_<w>.pt (`save_models`), metrics.json, width_sweep.npz, figures/width_sweep.png
    blr:          config.json, metrics.json, blr.npz, figures/blr_effective_dimension.png
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelsense.curvature.effdim import blr_posterior_contraction, blr_regions, effective_dimension
from modelsense.curvature.spectrum import (
    DEFAULT_S_SUM,
    S_HELP,
    SpectrumConfig,
    compute_spectrum,
    count_params,
    curvature_model,
    density_on_grid,
    resolve_s,
)
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute
from modelsense.experiments.source import check_checkpoint, check_model, obtain_model
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import save_model
from modelsense.options import floats, ints, joined, option
from modelsense.progress import progress_bar
from modelsense.runs import RunDir, finished_metrics, read_json, write_json
from modelsense.training import fit
from modelsense.training.config import TrainConfig

CHECKPOINT_HELP = ("model.pt of `modelsense train` to use instead of training one (the data, model and training "
                   "settings then come from the run that made it; --device aside)")
WEIGHTS_ONLY_HELP = "only parameters with >= 2 dims (weights; no biases / norm parameters), as Maddox et al. 2020"


# -- modelsense spectrum -------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectrumSpec:
    """`modelsense spectrum`: a model (trained here, or `checkpoint`) and what of its curvature to compute."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)


def check_spectrum(spec: SpectrumSpec) -> Prepared:
    data = load_dataset_from_config(spec.data)
    trained = None if spec.checkpoint is None else check_checkpoint(spec.checkpoint, spec.data, data)
    module = check_model(data, spec.model) if trained is None else trained.module
    n_curv = count_params(module, spec.weights_only)
    if spec.spectrum.k > n_curv:
        raise ConfigError(f"--k {spec.spectrum.k} is larger than the number of parameters the matrix acts on ({n_curv}"
                          f"{', weights only' if spec.weights_only else ''}); pass --k <= {n_curv}")
    # the settings used: s resolved for this dataset, the seed of the run
    used = replace(spec.spectrum, s=resolve_s(spec.spectrum.s, spec.spectrum.reduction, data.n_train),
                   seed=spec.train.seed)
    return Prepared(data, {"dataset": data.summary(), "spectrum": asdict(used)},
                    {"trained": trained, "spectrum": used})


def run_spectrum(spec: SpectrumSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train (or load the checkpoint) and write the spectrum (see the module docstring)."""
    from modelsense.curvature import plots

    data, used, trained = prepared.data, prepared.extra["spectrum"], prepared.extra["trained"]
    if trained is None:
        run.log(f"training {spec.model.name} on {data.name}")
    start = time.perf_counter()
    got = obtain_model(data, spec.model, spec.train, trained=trained, run=run, progress=progress)
    train_seconds = time.perf_counter() - start
    module = got.module.eval()
    run.log(f"spectrum: top {used.k} eigenvalues of the {used.matrix} ({used.reduction} loss) over {data.n_train} "
            "examples")
    start = time.perf_counter()
    spectrum = compute_spectrum(curvature_model(module, spec.weights_only), data.x_train, data.y_train, used,
                                progress=progress)
    seconds = time.perf_counter() - start
    arrays = {"eigenvalues": spectrum.eigenvalues, "converged": spectrum.converged, "residuals": spectrum.residuals}
    grid = dens = None
    if spectrum.density is not None:
        grid, dens = density_on_grid(spectrum.density)
        arrays.update(density_grid=grid, density=dens, slq_nodes=spectrum.density.nodes,
                      slq_weights=spectrum.density.weights)
    run.save_arrays("spectrum", **arrays)
    summary = spectrum.to_metrics()
    cost = summary.pop("cost")
    if trained is None:
        cost = {"training": {"seconds": train_seconds}, **cost}
    final = got.fit.final
    metrics = {**summary, "cost": cost, "s": list(used.s), "n_train": data.n_train, "weights_only": spec.weights_only,
               "n_params_total": count_params(module),
               **{k: final[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
               "seconds": seconds}
    run.save_figure(plots.spectrum_figure(spectrum, grid, dens, f"{got.model.name} on {data.name}"), "spectrum")
    run.log(f"done: N_eff(s={used.s[0]:g}) = {metrics['effective_dimension']:.4g}, trace = {metrics['trace']}; "
            f"cost: {describe_cost(cost)}")
    return metrics


def describe_cost(cost: dict[str, dict[str, float]]) -> str:
    """One line: what each part of a spectrum run cost, e.g. "training 9.1 s, eigenvalues 50 products 4.2 s"."""
    parts = []
    for part, values in cost.items():
        products = f" {int(values['matvecs'])} products" if "matvecs" in values else ""
        parts.append(f"{part}{products} {values['seconds']:.1f} s")
    return ", ".join(parts)


def spectrum_summary(m: dict[str, Any]) -> str:
    lam = m["eigenvalues"]
    trace = "" if m["trace"] is None else f"  trace {m['trace']:.4g} ± {m['trace_standard_error']:.2g}"
    skipped = [f"{what} (--{flag} N)" for what, flag in (("trace", "trace-samples"), ("density", "density-probes"))
               if what not in m["cost"]]
    return (f"{m['matrix']} ({m['reduction']} loss), {m['n_params']} parameters: λ_1 {lam[0]:.4g} … "
            f"λ_{len(lam)} {lam[-1]:.4g}{trace}\n"
            + "N_eff " + "  ".join(f"(s={float(v):g}) {n:.4g}" for v, n in m["effective_dimension_by_s"].items())
            + f"\ncost: {describe_cost(m['cost'])}" + (f"; not computed: {', '.join(skipped)}" if skipped else ""))


SPECTRUM = Command("spectrum", SpectrumSpec, check_spectrum, run_spectrum, summary=spectrum_summary,
                   help="Train (or load --checkpoint) and compute the top-k eigenvalues and N_eff of the loss curvature "
                        "(the trace and spectral density on request: they cost far more products than the eigenvalues).")


# -- modelsense effdim width-sweep ---------------------------------------------------------------
#: Models with a width the sweep varies: mlp (every hidden layer), cnn and resnet18 (`width`).
SWEEP_MODELS = ("mlp", "cnn", "resnet18")
PROTOTYPE_WIDTHS = (2, 4, 8, 12, 16, 24, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class WidthSweepSpec:
    """`modelsense effdim width-sweep`: models that differ only in width (`widths`: every hidden layer of an
    mlp, `hidden_layers` of them, or the `width` of cnn / resnet18), the top-k spectrum of each, and N_eff
    against the test loss. The defaults are the prototype's sweep: one-hidden-layer ReLU MLPs on
    standardised digits with 20% label noise, Adam at a constant 3e-3, 400 epochs, batch 128, no weight decay.

    What every width shares (data, model, train but the device, hidden_layers, spectrum, weights_only:
    config.json's `sweep`) a resumed sweep must keep; widths, s, the threshold and save_models may
    change (N_eff is recomputed from the saved eigenvalues). `spectrum` gives k and how the eigenvalues are computed; its s, trace and density are unused.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", corruption_ratio=0.2, standardize=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=400,
                                                                   bs=128, delta=0.0))
    widths: tuple[int, ...] = option(PROTOTYPE_WIDTHS, "comma-separated widths to train", parse=ints, show=joined)
    hidden_layers: int = option(1, "mlp: number of hidden layers, all of the width")
    spectrum: SpectrumConfig = field(default_factory=lambda: SpectrumConfig(k=50))
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)
    s: tuple[float, ...] = option((), S_HELP, parse=floats, show=joined)
    train_loss_threshold: float = option(0.01, "models with a final mean train NLL below it count as interpolating "
                                               "(the Spearman correlations)")
    save_models: bool = option(False, "keep each trained model as widths/model_<w>.pt")

    def model_config(self, width: int) -> ModelConfig:
        if self.model.name == "mlp":
            return replace(self.model, widths=(width,) * self.hidden_layers)
        return replace(self.model, width=width)


def check_width_sweep(spec: WidthSweepSpec) -> Prepared:
    widths = tuple(spec.widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in widths):
        raise ConfigError(f"--widths must be positive integers, e.g. 2,4,8; received {list(widths)}")
    if len(set(widths)) != len(widths):
        raise ConfigError(f"--widths must be distinct, received {list(widths)}")
    if spec.model.name not in SWEEP_MODELS:
        raise ConfigError(f"width-sweep varies the width of {', '.join(SWEEP_MODELS)}; received --model {spec.model.name!r}")
    if spec.hidden_layers < 1:
        raise ConfigError(f"--hidden-layers must be >= 1, received {spec.hidden_layers}")
    if spec.spectrum.s or spec.spectrum.trace_samples or spec.spectrum.density_probes:
        raise ConfigError("width-sweep computes the top-k eigenvalues only: give s as WidthSweepSpec.s, and no trace "
                          "or density")
    if not spec.train_loss_threshold > 0:
        raise ConfigError(f"--train-loss-threshold must be > 0, received {spec.train_loss_threshold}")
    data = load_dataset_from_config(spec.data)
    for width in widths:  # the model options of every width
        check_model(data, spec.model_config(width))
    s = resolve_s(spec.s, spec.spectrum.reduction, data.n_train)
    # what every width shares, which a resumed sweep must keep (the device aside: a crashed run may resume elsewhere)
    sweep = {"data": asdict(spec.data), "model": asdict(spec.model),
             "train": {k: v for k, v in asdict(spec.train).items() if k != "device"}, "hidden_layers": spec.hidden_layers,
             "spectrum": asdict(spec.spectrum), "weights_only": spec.weights_only}
    return Prepared(data, {"dataset": data.summary(), "s": list(s), "sweep": sweep}, {"s": s})


def width_result_path(root: str | Path, width: int) -> Path:
    return Path(root) / "widths" / f"width_{int(width)}.json"


def train_and_measure(data: Dataset, train_cfg: TrainConfig, spec: WidthSweepSpec, width: int,
                      on_epoch=None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the model of `width` and measure its losses and top-k spectrum; returns (module, result)."""
    model_cfg = spec.model_config(width)
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    n_curv = count_params(module, spec.weights_only)
    start = time.perf_counter()
    result = fit(module, data, train_cfg, progress=False, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - start
    module = module.eval()
    start = time.perf_counter()
    # a model with fewer parameters than k: all its eigenvalues (the exact N_eff)
    cfg = replace(spec.spectrum, k=min(spec.spectrum.k, n_curv), seed=train_cfg.seed)
    spectrum = compute_spectrum(curvature_model(module, spec.weights_only), data.x_train, data.y_train, cfg)
    final = result.final
    return module, {
        "width": width, "model": asdict(model_cfg), "n_params": count_params(module),
        "n_params_curvature": n_curv,
        **{k: final[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
        "test_error": 1.0 - final["test_accuracy"], "k": cfg.k,
        "eigenvalues": [float(v) for v in spectrum.eigenvalues],
        "eigenvalues_converged": [bool(c) for c in spectrum.converged], "num_matvecs": spectrum.num_matvecs,
        "history": {key: list(v) for key, v in result.history.items()},
        "train_seconds": train_seconds, "spectrum_seconds": time.perf_counter() - start,
    }


def run_width_sweep(spec: WidthSweepSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train every width not finished in the run, then summarise all of them (see the module docstring)."""
    from modelsense.curvature import plots
    from modelsense.curvature.effdim import width_sweep_summary

    data, s = prepared.data, prepared.extra["s"]
    (run.path / "widths").mkdir(exist_ok=True)
    for width in spec.widths:  # stored state is checked first: a damaged width is trained again
        path = width_result_path(run.path, width)
        if path.exists():
            try:
                read_json(path)
            except ConfigError as err:
                path.unlink()
                run.log(f"width {width}: its stored result was damaged ({err}); training it again")
    todo = [w for w in spec.widths if not width_result_path(run.path, w).exists()]
    if len(todo) < len(spec.widths):
        run.log(f"resume: {len(spec.widths) - len(todo)} widths finished, {len(todo)} to train")
    # a few evaluations per model (progress and learning curves) instead of one per epoch
    cfg = replace(spec.train, eval_every=max(1, spec.train.epochs // 20))
    start = time.perf_counter()
    with progress_bar(len(todo) * cfg.epochs, "width sweep", enabled=progress) as bar:
        for width in todo:
            done = [0]

            def on_epoch(epoch: int, row: dict[str, float], width: int = width, done: list[int] = done) -> None:
                bar.advance(epoch - done[0], description=f"width {width}", loss=row["train_loss"])
                done[0] = epoch

            module, result = train_and_measure(data, cfg, spec, width, on_epoch)
            bar.advance(cfg.epochs - done[0])
            path = width_result_path(run.path, width)
            if spec.save_models:
                save_model(path.with_name(f"model_{width}.pt"), module, ModelConfig(**result["model"]), data, cfg.seed)
            write_json(path, result)
            neff = effective_dimension(torch.tensor(result["eigenvalues"]), s[0],
                                       converged=torch.tensor(result["eigenvalues_converged"]))
            run.log(f"width {width}: {result['n_params']} params, train loss {result['train_loss']:.4g}, "
                    f"test loss {result['test_loss']:.4g}, N_eff {neff:.4g}")
            bar.set_info(width=width, test_loss=result["test_loss"], N_eff=neff)
    summary = width_sweep_summary([read_json(width_result_path(run.path, w)) for w in spec.widths], s,
                                  spec.train_loss_threshold)
    run.save_arrays("width_sweep", **{k: np.asarray(summary[k], dtype=float) for k in
                                      ("widths", "n_params", "train_loss", "test_loss", "test_error",
                                       "effective_dimension")})
    name = spec.model.name if spec.model.name != "mlp" else f"{spec.hidden_layers}-hidden-layer MLP"
    run.save_figure(plots.width_sweep_figure(summary, f"{name} on {data.name} (label noise "
                                                      f"{spec.data.corruption_ratio:g})"), "width_sweep")
    return {**summary, "matrix": spec.spectrum.matrix, "reduction": spec.spectrum.reduction, "n_train": data.n_train,
            "weights_only": spec.weights_only, "n_trained": len(todo), "seconds": time.perf_counter() - start}


def width_sweep_summary_lines(m: dict[str, Any]) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    lines = [f"{'width':>6} {'params':>8} {'train loss':>10} {'test loss':>9} {'test err':>8} {'N_eff':>7}"]
    lines += [f"{w:>6} {m['n_params'][i]:>8} {m['train_loss'][i]:>10.4g} {m['test_loss'][i]:>9.4g} "
              f"{m['test_error'][i]:>8.3f} {m['effective_dimension'][i]:>7.3g}" for i, w in enumerate(m["widths"])]
    lines.append(f"Spearman with test loss, {m['n_interpolating']} models with train loss < {m['train_loss_threshold']:g}: "
                 f"N_eff {fmt(m['spearman_effdim_test_loss'])}, params {fmt(m['spearman_params_test_loss'])}; "
                 f"all {len(m['widths'])}: N_eff {fmt(m['spearman_effdim_test_loss_all'])}, "
                 f"params {fmt(m['spearman_params_test_loss_all'])}")
    return "\n".join(lines)


WIDTH_SWEEP = Command(
    "effdim width-sweep", WidthSweepSpec, check_width_sweep, run_width_sweep, summary=width_sweep_summary_lines,
    keep=("widths",), resume_keys=("sweep",),
    hide=frozenset({"model.widths", "model.width", "spectrum.s", "spectrum.trace_samples", "spectrum.density_probes",
                    "spectrum.density_steps"}),
    help="Models from narrow to wide: test loss, parameter count and N_eff against width (double descent). The "
         "default is the prototype: one-hidden-layer ReLU MLPs on standardised digits with 20% label noise, Adam at "
         "a constant rate 3e-3 (--lrmin = --lr; set both to change it), 400 epochs, batch 128, no weight decay; "
         "top-50 Hessian eigenvalues of the summed training loss, s = 100.")


# -- modelsense effdim blr -----------------------------------------------------------------------
@dataclass(frozen=True)
class BLRSpec:
    """`modelsense effdim blr`: Bayesian linear regression on Fourier features (`blr_posterior_contraction`,
    the notebook of Maddox et al. 2020)."""

    n_points: int = option(300, "inputs x = linspace(0, x-max, n-points), added one at a time")
    n_frequencies: int = option(100, "F: features cos((f+1)πx), sin((f+1)πx), P = 2F")
    x_max: float = option(50.0, "largest input x")
    noise_variance: float = option(0.1, "σ² of the likelihood")
    prior_variance: float = option(3.0, "τ² of the prior N(0, τ² I)")
    s_parameter: float = option(5.0, "s of the posterior-covariance N_eff", flag="--s")
    s_function: float = option(5.0, "s of the function-space-covariance N_eff")
    seed: int = option(0, "seed of the order in which the points are added")
    shuffle: bool = option(True, "add the points in a random order", flag="--shuffle/--no-shuffle")


def check_blr(spec: BLRSpec) -> Prepared:
    if spec.n_points < 1 or spec.n_frequencies < 1:
        raise ConfigError(f"need --n-points >= 1 and --n-frequencies >= 1, received {spec.n_points}, {spec.n_frequencies}")
    if not spec.x_max > 0:
        raise ConfigError(f"--x-max must be > 0, received {spec.x_max}")
    values = (spec.noise_variance, spec.prior_variance, spec.s_parameter, spec.s_function)
    if not all(v > 0 for v in values):
        raise ConfigError(f"--noise-variance, --prior-variance, --s and --s-function must all be > 0, received "
                          f"{', '.join(f'{v:g}' for v in values)}")
    return Prepared()


def run_blr(spec: BLRSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """The closed-form contraction; writes blr.npz and the figure."""
    from modelsense.curvature import plots

    start = time.perf_counter()
    result = blr_posterior_contraction(**asdict(spec))
    seconds = time.perf_counter() - start
    run.log(f"BLR contraction of {result.n_params} features over {len(result.n)} points")
    run.save_arrays("blr", n=result.n, effdim_posterior=result.effdim_posterior, effdim_function=result.effdim_function,
                    effdim_hessian=result.effdim_hessian)
    run.save_figure(plots.blr_figure(result, spec.s_parameter, spec.s_function, spec.prior_variance),
                    "blr_effective_dimension")
    P, N = result.n_params, len(result.n)
    lo, hi = blr_regions(P)
    at = {f"n={m}": m for m in (int(lo), P, int(hi)) if 1 <= m <= N}
    return {
        "n_params": P,
        "n_points": N,
        "effdim_posterior_first": float(result.effdim_posterior[0]),
        "effdim_posterior_last": float(result.effdim_posterior[-1]),
        "effdim_posterior_at": {k: float(result.effdim_posterior[m - 1]) for k, m in at.items()},
        "effdim_function_last": float(result.effdim_function[-1]),
        "effdim_function_at": {k: float(result.effdim_function[m - 1]) for k, m in at.items()},
        "effdim_hessian_last": float(result.effdim_hessian[-1]),
        "effdim_hessian_at": {k: float(result.effdim_hessian[m - 1]) for k, m in at.items()},
        "s_parameter": spec.s_parameter,
        "s_function": spec.s_function,
        "noise_variance": spec.noise_variance,
        "prior_variance": spec.prior_variance,
        "seconds": seconds,
    }


BLR = Command("effdim blr", BLRSpec, check_blr, run_blr,
              summary=lambda m: f"P = {m['n_params']}: posterior N_eff {m['effdim_posterior_first']:.4g} (n=1) -> "
                                f"{m['effdim_posterior_last']:.4g} (n={m['n_points']}); function-space N_eff "
                                f"{m['effdim_function_last']:.4g}; well-determined parameters "
                                f"{m['effdim_hessian_last']:.4g}",
              help="Bayesian linear regression (closed form): N_eff of the posterior contracts once n passes P.")


# -- demo section --------------------------------------------------------------------------------
def curvature_section(out: Path, progress: bool, resume: bool = False) -> Section:  # noqa: F821
    """Demo: top-20 Hessian spectrum, trace, density and N_eff of a digits MLP; the BLR contraction."""
    from modelsense.experiments.report import Section

    root = Path(out) / "curvature"
    spectrum = SpectrumSpec(train=TrainConfig(epochs=20), spectrum=SpectrumConfig(
        k=20, s=(DEFAULT_S_SUM, 1297.0), trace_samples=30, density_probes=3, density_steps=40, lanczos_tol=1e-4))
    spec = (resume and finished_metrics(root / "spectrum")) or execute(SPECTRUM, spectrum, root / "spectrum",
                                                                        overwrite=True, progress=progress)
    blr = (resume and finished_metrics(root / "blr")) or execute(BLR, BLRSpec(), root / "blr", overwrite=True,
                                                                 progress=progress)
    metrics = {
        "n_params": spec["n_params"],
        "top eigenvalue": spec["eigenvalues"][0],
        "20th eigenvalue": spec["eigenvalues"][-1],
        "trace (Hutchinson, 30 probes)": spec["trace"],
        "trace standard error": spec["trace_standard_error"],
        f"N_eff (s = {DEFAULT_S_SUM:g})": spec["effective_dimension_by_s"][str(DEFAULT_S_SUM)],
        "N_eff (s = N = 1297)": spec["effective_dimension_by_s"]["1297.0"],
        "test_accuracy": spec["test_accuracy"],
        "BLR posterior N_eff at n = 1 / P / 300": f"{blr['effdim_posterior_first']:.3g} / "
                                                 f"{blr['effdim_posterior_at']['n=200']:.3g} / {blr['effdim_posterior_last']:.3g}",
    }
    return Section(
        "Curvature: Hessian spectrum and effective dimensionality",
        "Top-20 eigenvalues (Lanczos with full reorthogonalisation) of the Hessian of the training loss summed over "
        "the 1297 digits examples, at an MLP 64-128-128-10 trained for 20 epochs, its trace (Hutchinson) and "
        "spectral density (stochastic Lanczos quadrature). N_eff = Σ λ_i/(λ_i + s) over the converged top 20 "
        "(Maddox et al. 2020); s scales with the loss reduction: s = N on the summed loss equals "
        "s = 1 on the mean loss of Maddox et al.'s code. Bayesian linear regression on 200 Fourier features: the posterior covariance's "
        "N_eff contracts as the number of points n passes the number of parameters (shaded: n < 175, 175-225, > 225).",
        metrics,
        [root / "spectrum" / "figures" / "spectrum.png", root / "blr" / "figures" / "blr_effective_dimension.png"],
        str(root),
    )


__all__ = ["BLR", "SPECTRUM", "SWEEP_MODELS", "WIDTH_SWEEP", "BLRSpec", "SpectrumSpec", "WidthSweepSpec",
           "curvature_section", "describe_cost", "train_and_measure", "width_result_path"]
