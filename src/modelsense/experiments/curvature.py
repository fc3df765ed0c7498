"""`modelsense spectrum`, `modelsense effdim width-sweep`, `modelsense effdim blr`.

Maddox, Benton & Wilson (2020), "Rethinking parameter counting": the effective dimensionality

    N_eff(H, s) = Σ_i λ_i / (λ_i + s)

of the Hessian H of the training loss at the trained parameters tracks generalisation better than
the parameter count. This module composes `modelsense.curvature` into runs.

Matrix, reduction and s (the conventions of every command here):
  - the matrix is the Hessian (or GGN / empirical Fisher, `matrix`) of the training loss SUMMED over
    the N training examples, L(θ) = Σ_i -log p(y_i | x_i, θ), at the trained parameters, with the
    model in eval mode (batch norm uses its running statistics). `reduction="mean"` divides it by N.
  - its eigenvalues grow with N, and so must s: N_eff(H_sum, s) = N_eff(H_mean, s / N). With s = 1
    on the summed-loss Hessian every top eigenvalue of a digits MLP is far above s and N_eff
    saturates at k. The default s = 100 (`DEFAULT_S_SUM` of `modelsense.curvature.spectrum`, ≈ 0.08 N
    on digits) is the value at which the prototype saw the double-descent behaviour; with
    `reduction="mean"` the default is 100 / N, the same regularisation. Several s may be given; the
    first is the headline value.
  - `spectrum` computes the top-k eigenvalues only unless asked for more: the Hutchinson trace
    (`trace_samples` products) and the SLQ density (`density_probes` x `density_steps` products)
    cost far more (with 100 probes and 5 x 60 steps, 400 products against about 50 for k = 20).
    metrics.json's `cost` gives the products and seconds of each part (training, eigenvalues,
    trace, density).
  - N_eff is computed from the top-k Lanczos Ritz values (a lower bound of the full N_eff for a PSD
    matrix); Ritz values that did not converge are dropped and negative ones count 0
    (`modelsense.curvature.effective_dimension`).
  - `weights_only=True` restricts the parameters to tensors with >= 2 dimensions (linear and conv
    weights), as the original did; biases and normalisation parameters are then held fixed.

Run directories:
    spectrum:     config.json, metrics.json (eigenvalues (descending), eigenvalues_converged, trace,
                  trace_standard_error (None unless asked), effective_dimension (first s),
                  effective_dimension_by_s, s, n_params, matrix, reduction, train/test loss and
                  accuracy, cost {part: {matvecs, seconds}}, num_matvecs), spectrum.npz
                  (eigenvalues, converged, residuals, density_grid, density, slq_nodes, slq_weights),
                  model.pt (when trained here), figures/spectrum.png
    width-sweep:  config.json, widths/width_<w>.json (one per finished model: losses, eigenvalues,
                  history), metrics.json, width_sweep.npz, figures/width_sweep.png,
                  widths/model_<w>.pt with `save_models`. `resume` skips widths whose json exists,
                  so a crash loses at most the model in flight; N_eff is recomputed from the saved
                  eigenvalues, so a resumed run may change s, the widths and the threshold.
    blr:          config.json, metrics.json, blr.npz, figures/blr_effective_dimension.png
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import (
    DEFAULT_S_SUM,
    BLRContraction,
    Spectrum,
    SpectrumConfig,
    blr_posterior_contraction,
    compute_spectrum,
    effective_dimension,
    resolve_s,
)
from modelsense.curvature.operators import MATRICES, REDUCTIONS
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments import plots  # noqa: F401  (selects the Agg backend before pyplot)
from modelsense.experiments.source import check_checkpoint_data, check_recipe, checkpoint_recipe
from modelsense.models.checkpoint import save_model
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.progress import progress_bar
from modelsense.runs import RunDir, finished_metrics, read_json, write_json
from modelsense.training import evaluate, fit
from modelsense.training.config import TrainConfig

#: Models with a width the sweep varies: mlp (every hidden layer), cnn and resnet18 (`width`).
SWEEP_MODELS = ("mlp", "cnn", "resnet18")
#: The prototype's sweep: one-hidden-layer ReLU MLPs on digits with 20% label noise.
PROTOTYPE_WIDTHS = (2, 4, 8, 12, 16, 24, 32, 64, 128, 256, 512)
PROTOTYPE_DATA = DataConfig("digits", corruption_ratio=0.2, standardize=True)
PROTOTYPE_TRAIN = TrainConfig(optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=400, bs=128, delta=0.0)


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def weight_names(module: nn.Module) -> set[str]:
    """Names of the parameters with >= 2 dimensions (linear / conv weights)."""
    return {n for n, p in module.named_parameters() if p.ndim >= 2}


def curvature_model(module: nn.Module, weights_only: bool = False) -> FunctionalModel:
    """The categorical FunctionalModel of `module`, over all parameters or the weights only."""
    if not weights_only:
        return FunctionalModel(module)
    names = weight_names(module)
    if not names:
        raise ConfigError("--weights-only: the model has no parameter with >= 2 dimensions")
    return FunctionalModel(module, trainable=names.__contains__)


def count_params(module: nn.Module, weights_only: bool = False) -> int:
    names = weight_names(module) if weights_only else None
    return sum(p.numel() for n, p in module.named_parameters() if names is None or n in names)


def check_choices(matrix: str, reduction: str) -> None:
    if matrix not in MATRICES:
        raise ConfigError(f"unknown matrix {matrix!r}; expected one of {', '.join(MATRICES)} (--matrix)")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)} (--reduction)")


def model_losses(module: nn.Module, data: Dataset, device: str | torch.device) -> dict[str, float]:
    """Mean NLL and accuracy of `module` on the training and test sets."""
    tr = evaluate(module, data.x_train.to(device), data.y_train.to(device))
    te = evaluate(module, data.x_test.to(device), data.y_test.to(device)) if data.n_test else {}
    return {"train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
            "test_loss": te.get("loss", float("nan")), "test_accuracy": te.get("accuracy", float("nan"))}


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation of a and b; None for fewer than 2 points or a constant input."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(a, b)[0])
    return None if not math.isfinite(rho) else rho


# ----------------------------------------------------------------------------------------------
# modelsense spectrum
# ----------------------------------------------------------------------------------------------


def density_on_grid(spectrum: Spectrum, points: int = 800) -> tuple[np.ndarray, np.ndarray]:
    """The SLQ density on a grid spanning its nodes (5% margin each side): (grid, density)."""
    nodes = spectrum.density.nodes.double()
    weighted = nodes[spectrum.density.weights > 0]
    lo, hi = float(weighted.min()), float(weighted.max())
    margin = 0.05 * max(hi - lo, 1e-12)
    grid = torch.linspace(lo - margin, hi + margin, points, dtype=torch.float64)
    return grid.numpy(), spectrum.density.evaluate(grid).numpy()


def spectrum_figure(spectrum: Spectrum, grid: np.ndarray | None, density: np.ndarray | None, title: str = ""):
    """Top-k eigenvalues (converged filled, unconverged open) and the SLQ density (log scale)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2 if grid is not None else 1, figsize=(10 if grid is not None else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    lam = spectrum.eigenvalues.double().cpu().numpy()
    conv = spectrum.converged.cpu().numpy().astype(bool)
    idx = np.arange(1, len(lam) + 1)
    positive = bool((lam > 0).all())
    ax.plot(idx[conv], lam[conv], "o", ms=4, label="converged")
    if (~conv).any():
        ax.plot(idx[~conv], lam[~conv], "o", ms=4, mfc="none", color="grey", label="not converged")
    for s in spectrum.config.s:
        ax.axhline(s, ls="--", lw=0.8, color="tab:red")
        ax.annotate(f"s = {s:g}", (idx[-1], s), ha="right", va="bottom", fontsize=8, color="tab:red")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"eigenvalue λ_i ({spectrum.config.matrix}, {spectrum.config.reduction} loss)")
    ax.set_title(f"top {len(lam)} eigenvalues, N_eff = {spectrum.effective_dimension[spectrum.config.s[0]]:.3g}")
    ax.legend(fontsize=8)
    if grid is not None:
        ax = axes[0, 1]
        ax.semilogy(grid, np.maximum(density, 1e-300))
        ax.set_ylim(bottom=max(float(density.max()) * 1e-8, 1e-300))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title("spectral density (stochastic Lanczos quadrature)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def run_spectrum(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out: str | Path,
    *,
    k: int = 20,
    matrix: str = "hessian",
    reduction: str = "sum",
    s: Sequence[float] | None = None,
    weights_only: bool = False,
    checkpoint: str | Path | None = None,
    trace_samples: int = SpectrumConfig.trace_samples,
    density_probes: int = SpectrumConfig.density_probes,
    density_steps: int = SpectrumConfig.density_steps,
    lanczos_tol: float = SpectrumConfig.lanczos_tol,
    chunk_size: int = SpectrumConfig.chunk_size,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or load `checkpoint`) and write the spectrum of `matrix` over the training set.

    The matrix, reduction and s follow the module docstring; trace by Hutchinson with
    `trace_samples` Rademacher probes (default 0: skipped), density by SLQ with `density_probes`
    probes (default 0: skipped) of `density_steps` Lanczos steps. Progress per Lanczos step / probe.
    Returns metrics.json's content, with `cost`: {"training": {"seconds"}, "eigenvalues" / "trace" /
    "density": {"matvecs", "seconds"}} (the parts computed).
    """
    check_choices(matrix, reduction)
    if k < 1:
        raise ConfigError(f"--k must be >= 1, received {k}")
    data = load_dataset_from_config(data_cfg)
    s_values = resolve_s(s, reduction, data.n_train)
    device = train_cfg.device
    if checkpoint is not None:
        recipe, module, info = checkpoint_recipe(checkpoint)
        check_recipe(checkpoint, recipe, data_cfg)
        check_checkpoint_data(info, data, f"checkpoint {checkpoint}")
        model_info = {"checkpoint": str(checkpoint), **info.get("model", {})}
    else:
        module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
        model_info = asdict(model_cfg)
    n_curv = count_params(module, weights_only)
    if k > n_curv:
        raise ConfigError(
            f"--k {k} is larger than the number of parameters the matrix acts on ({n_curv}"
            f"{', weights only' if weights_only else ''}); pass --k <= {n_curv}"
        )
    spec_cfg = SpectrumConfig(k=k, matrix=matrix, reduction=reduction, s=s_values, trace_samples=trace_samples,
                              density_probes=density_probes, density_steps=density_steps, lanczos_tol=lanczos_tol,
                              chunk_size=chunk_size, seed=train_cfg.seed)
    config = {"data": data_cfg.to_dict(), "model": model_info, "train": train_cfg.to_dict(), "dataset": data.summary(),
              "seed": train_cfg.seed, "weights_only": weights_only, "spectrum": {**asdict(spec_cfg), "s": list(s_values)}}
    with RunDir.open(out, "spectrum", config, overwrite=overwrite) as run:
        start = time.perf_counter()
        if checkpoint is None:
            run.log(f"training {model_cfg.name} on {data.name}")
            fit(module, data, train_cfg, progress=progress)
            save_model(run.path / "model.pt", module, model_cfg, data, train_cfg.seed)
        module = module.to(device).eval()
        train_seconds = time.perf_counter() - start
        run.log(f"spectrum: top {k} eigenvalues of the {matrix} ({reduction} loss) over {data.n_train} examples")
        start = time.perf_counter()
        spectrum = compute_spectrum(curvature_model(module, weights_only), data.x_train, data.y_train, spec_cfg,
                                    progress=progress)
        spectrum_seconds = time.perf_counter() - start
        grid = dens = None
        if spectrum.density is not None:
            grid, dens = density_on_grid(spectrum)
        arrays = {"eigenvalues": spectrum.eigenvalues, "converged": spectrum.converged, "residuals": spectrum.residuals}
        if spectrum.density is not None:
            arrays.update(density_grid=grid, density=dens, slq_nodes=spectrum.density.nodes,
                          slq_weights=spectrum.density.weights)
        run.save_arrays("spectrum", **arrays)
        summary = spectrum.to_metrics()
        cost = {"training": {"seconds": train_seconds}, **summary.pop("cost")} if checkpoint is None else summary.pop("cost")
        metrics = {
            **summary,
            "cost": cost,
            "s": list(s_values),
            "n_train": data.n_train,
            "weights_only": weights_only,
            "n_params_total": count_params(module),
            **model_losses(module, data, device),
            "train_seconds": train_seconds,
            "spectrum_seconds": spectrum_seconds,
        }
        run.save_figure(spectrum_figure(spectrum, grid, dens, f"{model_info.get('name', 'model')} on {data.name}"), "spectrum")
        run.write_metrics(metrics)
        run.log(f"done: N_eff(s={s_values[0]:g}) = {metrics['effective_dimension']:.4g}, trace = {metrics['trace']}; "
                f"cost: {describe_cost(cost)}")
        return metrics


def describe_cost(cost: dict[str, dict[str, float]]) -> str:
    """One line: what each part of a spectrum run cost, e.g. "training 9.1 s, eigenvalues 50 products 4.2 s"."""
    parts = []
    for part, values in cost.items():
        products = f" {int(values['matvecs'])} products" if "matvecs" in values else ""
        parts.append(f"{part}{products} {values['seconds']:.1f} s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# modelsense effdim width-sweep
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WidthSweepConfig:
    """A family of models that differ only in width, and what is measured on each.

    widths: hidden width of every hidden layer (`mlp`, `hidden_layers` of them) or `width` (cnn,
        resnet18). k, matrix, reduction, s, weights_only, lanczos_tol, chunk_size: the spectrum
        (see the module docstring; empty s: `DEFAULT_S_SUM`, divided by N for the mean loss). train_loss_threshold: models whose final mean training NLL is
        below it count as interpolating. save_models: keep widths/model_<w>.pt.
    """

    widths: tuple[int, ...] = PROTOTYPE_WIDTHS
    model: str = "mlp"
    hidden_layers: int = 1
    activation: str | None = None
    depth: int | None = None
    norm: str | None = None
    k: int = 50
    matrix: str = "hessian"
    reduction: str = "sum"
    s: tuple[float, ...] = ()
    weights_only: bool = False
    train_loss_threshold: float = 0.01
    lanczos_tol: float = 1e-5
    chunk_size: int = 2048
    save_models: bool = False

    def __post_init__(self) -> None:
        widths = tuple(self.widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in widths):
            raise ConfigError(f"--widths must be positive integers, e.g. 2,4,8; received {list(widths)}")
        if len(set(widths)) != len(widths):
            raise ConfigError(f"--widths must be distinct, received {list(widths)}")
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))
        if self.model not in SWEEP_MODELS:
            raise ConfigError(f"width-sweep varies the width of {', '.join(SWEEP_MODELS)}; received --model {self.model!r}")
        if self.hidden_layers < 1:
            raise ConfigError(f"--hidden-layers must be >= 1, received {self.hidden_layers}")
        check_choices(self.matrix, self.reduction)
        if self.k < 1:
            raise ConfigError(f"--k must be >= 1, received {self.k}")
        if self.s:
            object.__setattr__(self, "s", resolve_s(self.s, self.reduction, 1))
        if not self.train_loss_threshold > 0:
            raise ConfigError(f"--train-loss-threshold must be > 0, received {self.train_loss_threshold}")

    def model_config(self, width: int) -> ModelConfig:
        if self.model == "mlp":
            return ModelConfig("mlp", widths=(width,) * self.hidden_layers, activation=self.activation,
                               depth=self.depth, norm=self.norm)
        return ModelConfig(self.model, width=width, activation=self.activation, depth=self.depth, norm=self.norm)

    def resume_key(self) -> dict[str, Any]:
        """The settings every finished width must share (not widths, s, threshold, save_models)."""
        return {k: v for k, v in asdict(self).items() if k not in ("widths", "s", "train_loss_threshold", "save_models")}


def width_result_path(root: str | Path, width: int) -> Path:
    return Path(root) / "widths" / f"width_{int(width)}.json"


def train_and_measure(
    data: Dataset, train_cfg: TrainConfig, sweep: WidthSweepConfig, width: int, on_epoch=None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the model of `width` and measure losses and the top-k spectrum; returns (module, result)."""
    model_cfg = sweep.model_config(width)
    module = build_model_from_config(model_cfg, data.input_shape, data.num_classes, seed=train_cfg.seed)
    n_curv = count_params(module, sweep.weights_only)
    start = time.perf_counter()
    result = fit(module, data, train_cfg, progress=False, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - start
    module = module.eval()
    final = result.final
    start = time.perf_counter()
    k = min(sweep.k, n_curv)  # a model with fewer parameters than k: all its eigenvalues (exact N_eff)
    spectrum = compute_spectrum(
        curvature_model(module, sweep.weights_only), data.x_train, data.y_train,
        SpectrumConfig(k=k, matrix=sweep.matrix, reduction=sweep.reduction, s=sweep.s, trace_samples=0,
                       density_probes=0, lanczos_tol=sweep.lanczos_tol, chunk_size=sweep.chunk_size,
                       seed=train_cfg.seed),
    )
    return module, {
        "width": width,
        "model": asdict(model_cfg),
        "n_params": count_params(module),
        "n_params_curvature": n_curv,
        "train_loss": final["train_loss"],
        "train_accuracy": final["train_accuracy"],
        "test_loss": final["test_loss"],
        "test_accuracy": final["test_accuracy"],
        "test_error": 1.0 - final["test_accuracy"],
        "k": k,
        "eigenvalues": [float(v) for v in spectrum.eigenvalues],
        "eigenvalues_converged": [bool(c) for c in spectrum.converged],
        "num_matvecs": spectrum.num_matvecs,
        "history": {key: list(v) for key, v in result.history.items()},
        "train_seconds": train_seconds,
        "spectrum_seconds": time.perf_counter() - start,
    }


def summarize_width_sweep(results: Sequence[dict[str, Any]], s: Sequence[float], threshold: float) -> dict[str, Any]:
    """Per-model arrays, N_eff for every s (from the saved eigenvalues) and the Spearman correlations.

    spearman_effdim_test_loss / spearman_params_test_loss: over the models whose train loss is below
    `threshold` (None with fewer than two); the `_all` variants over every model.
    """
    results = sorted(results, key=lambda r: r["width"])
    neff = {float(v): [effective_dimension(torch.tensor(r["eigenvalues"]), float(v),
                                           converged=torch.tensor(r["eigenvalues_converged"])) for r in results]
            for v in s}
    head = neff[float(s[0])]
    test_loss = [r["test_loss"] for r in results]
    params = [r["n_params"] for r in results]
    interp = [r["train_loss"] < threshold for r in results]
    sel = [i for i, ok in enumerate(interp) if ok]
    pick = lambda values: [values[i] for i in sel]  # noqa: E731
    return {
        "widths": [r["width"] for r in results],
        "n_params": params,
        "train_loss": [r["train_loss"] for r in results],
        "train_accuracy": [r["train_accuracy"] for r in results],
        "test_loss": test_loss,
        "test_error": [r["test_error"] for r in results],
        "effective_dimension": head,
        "effective_dimension_by_s": {str(v): vals for v, vals in neff.items()},
        "s": [float(v) for v in s],
        "k": [r["k"] for r in results],
        "n_converged": [int(sum(r["eigenvalues_converged"])) for r in results],
        "interpolating": interp,
        "train_loss_threshold": threshold,
        "n_interpolating": len(sel),
        "spearman_effdim_test_loss": spearman(pick(head), pick(test_loss)),
        "spearman_params_test_loss": spearman(pick(params), pick(test_loss)),
        "spearman_effdim_test_loss_all": spearman(head, test_loss),
        "spearman_params_test_loss_all": spearman(params, test_loss),
    }


def width_sweep_figure(summary: dict[str, Any], title: str = ""):
    """Test/train loss, N_eff and parameter count against width (log x); filled = interpolating."""
    import matplotlib.pyplot as plt

    w = np.asarray(summary["widths"], dtype=float)
    interp = np.asarray(summary["interpolating"], dtype=bool)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))

    def mark(ax, y, color, label):
        ax.plot(w, y, "-", color=color, lw=1.2, label=label)
        ax.plot(w[interp], np.asarray(y)[interp], "o", color=color, ms=5)
        ax.plot(w[~interp], np.asarray(y)[~interp], "o", color=color, mfc="white", ms=5)

    ax = axes[0]
    mark(ax, summary["test_loss"], "tab:blue", "test loss")
    ax.set_ylabel("test loss (mean NLL)", color="tab:blue")
    twin = ax.twinx()
    mark(twin, summary["effective_dimension"], "tab:red", "N_eff")
    twin.set_ylabel(f"N_eff (s = {summary['s'][0]:g})", color="tab:red")
    rho = summary["spearman_effdim_test_loss"]
    ax.set_title(f"Spearman(N_eff, test loss) = {'n/a' if rho is None else f'{rho:.2f}'} (interpolating)", fontsize=9)
    ax = axes[1]
    for key, vals in summary["effective_dimension_by_s"].items():
        ax.plot(w, vals, "o-", ms=4, label=f"s = {float(key):g}")
    ax.set_ylabel("effective dimension N_eff")
    ax.legend(fontsize=8)
    ax.set_title("N_eff for each s", fontsize=9)
    ax = axes[2]
    mark(ax, summary["n_params"], "tab:green", "parameters")
    ax.set_yscale("log")
    ax.set_ylabel("number of parameters", color="tab:green")
    twin = ax.twinx()
    twin.plot(w, summary["train_loss"], "s--", color="tab:grey", ms=3, lw=0.8)
    twin.axhline(summary["train_loss_threshold"], color="tab:grey", lw=0.6, ls=":")
    twin.set_yscale("log")
    twin.set_ylabel("train loss", color="tab:grey")
    rho = summary["spearman_params_test_loss"]
    ax.set_title(f"Spearman(params, test loss) = {'n/a' if rho is None else f'{rho:.2f}'}", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
    fig.suptitle(f"{title + ': ' if title else ''}filled markers = train loss < {summary['train_loss_threshold']:g}")
    fig.tight_layout()
    return fig


def run_width_sweep(
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    sweep: WidthSweepConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train every width of `sweep` not finished in `out`, then summarise all of them (see module docstring)."""
    data = load_dataset_from_config(data_cfg)
    sweep = dataclasses.replace(sweep, s=resolve_s(sweep.s, sweep.reduction, data.n_train))
    for width in sweep.widths:  # validates the model options of every width before anything is written
        build_model_from_config(sweep.model_config(width), data.input_shape, data.num_classes, seed=train_cfg.seed)
    train_key = {k: v for k, v in train_cfg.to_dict().items() if k != "device"}  # a crashed run may resume elsewhere
    config = {"data": data_cfg.to_dict(), "train": train_key, "sweep": sweep.resume_key(), "dataset": data.summary(),
              "device": train_cfg.device, "widths": list(sweep.widths), "s": list(sweep.s),
              "train_loss_threshold": sweep.train_loss_threshold, "seed": train_cfg.seed}
    with RunDir.open(out, "effdim width-sweep", config, resume=resume, overwrite=overwrite, keep=("widths",),
                     resume_keys=["data", "train", "sweep"]) as run:
        (run.path / "widths").mkdir(exist_ok=True)
        for width in sweep.widths:  # stored state is checked first: a damaged width is trained again
            path = width_result_path(out, width)
            if path.exists():
                try:
                    read_json(path)
                except ConfigError as err:
                    path.unlink()
                    run.log(f"width {width}: its stored result was damaged ({err}); training it again")
        todo = [w for w in sweep.widths if not width_result_path(out, w).exists()]
        if len(todo) < len(sweep.widths):
            run.log(f"resume: {len(sweep.widths) - len(todo)} widths finished, {len(todo)} to train")
        # a few evaluations per model (progress and learning curves) instead of one per epoch
        cfg = dataclasses.replace(train_cfg, eval_every=max(1, train_cfg.epochs // 20))
        start = time.perf_counter()
        with progress_bar(len(todo) * cfg.epochs, "width sweep", enabled=progress) as bar:
            for width in todo:
                done = [0]

                def on_epoch(epoch: int, row: dict[str, float], width: int = width) -> None:
                    bar.advance(epoch - done[0], description=f"width {width}", loss=row["train_loss"])
                    done[0] = epoch

                module, result = train_and_measure(data, cfg, sweep, width, on_epoch)
                bar.advance(cfg.epochs - done[0])
                if sweep.save_models:
                    save_model(width_result_path(out, width).with_name(f"model_{width}.pt"), module,
                               ModelConfig(**result["model"]), data, cfg.seed)
                write_json(width_result_path(out, width), result)
                neff = effective_dimension(torch.tensor(result["eigenvalues"]), sweep.s[0],
                                           converged=torch.tensor(result["eigenvalues_converged"]))
                run.log(f"width {width}: {result['n_params']} params, train loss {result['train_loss']:.4g}, "
                        f"test loss {result['test_loss']:.4g}, N_eff {neff:.4g}")
                bar.set_info(width=width, test_loss=result["test_loss"], N_eff=neff)
        results = [read_json(width_result_path(out, w)) for w in sweep.widths]
        summary = summarize_width_sweep(results, sweep.s, sweep.train_loss_threshold)
        run.save_arrays("width_sweep", **{k: np.asarray(summary[k], dtype=float) for k in
                                          ("widths", "n_params", "train_loss", "test_loss", "test_error",
                                           "effective_dimension")})
        name = sweep.model if sweep.model != "mlp" else f"{sweep.hidden_layers}-hidden-layer MLP"
        run.save_figure(width_sweep_figure(summary, f"{name} on {data.name} (label noise {data_cfg.corruption_ratio:g})"),
                        "width_sweep")
        metrics = {**summary, "matrix": sweep.matrix, "reduction": sweep.reduction, "n_train": data.n_train,
                   "weights_only": sweep.weights_only, "n_trained": len(todo), "seconds": time.perf_counter() - start}
        run.write_metrics(metrics)
        return metrics


# ----------------------------------------------------------------------------------------------
# modelsense effdim blr
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BLRConfig:
    """The original notebook's Bayesian linear regression (see `blr_posterior_contraction`)."""

    n_points: int = 300
    n_frequencies: int = 100
    x_max: float = 50.0
    noise_variance: float = 0.1
    prior_variance: float = 3.0
    s_parameter: float = 5.0
    s_function: float = 5.0
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.n_points < 1 or self.n_frequencies < 1:
            raise ConfigError(f"need --n-points >= 1 and --n-frequencies >= 1, received {self.n_points}, {self.n_frequencies}")
        if not self.x_max > 0:
            raise ConfigError(f"--x-max must be > 0, received {self.x_max}")


def blr_regions(n_params: int) -> tuple[float, float]:
    """Boundaries of the shaded regions: P ∓ P/8 (the original's 175 and 225 for P = 200)."""
    return n_params - n_params / 8, n_params + n_params / 8


def blr_figure(result: BLRContraction, cfg: BLRConfig):
    """N_eff of the posterior, of the function-space covariance and of the data precision against n,
    shaded red (n < P - P/8), yellow (around P) and green (n > P + P/8)."""
    import matplotlib.pyplot as plt

    n = result.n.numpy()
    lo, hi = blr_regions(result.n_params)
    panels = [
        (result.effdim_posterior, f"posterior covariance Σ_n (s = {cfg.s_parameter:g})"),
        (result.effdim_function, f"function space Φ_n Σ_n Φ_nᵀ (s = {cfg.s_function:g})"),
        (result.effdim_hessian, f"data precision Φ_nᵀΦ_n/σ² (s = 1/τ² = {1 / cfg.prior_variance:.3g})"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (values, label) in zip(axes, panels):
        ax.axvspan(0, lo, color="tab:red", alpha=0.12, lw=0)
        ax.axvspan(lo, hi, color="gold", alpha=0.2, lw=0)
        ax.axvspan(hi, max(n[-1], hi), color="tab:green", alpha=0.12, lw=0)
        ax.plot(n, values.numpy(), color="k", lw=1.4)
        ax.axvline(result.n_params, color="grey", ls=":", lw=0.8)
        ax.set_xlim(0, max(n[-1], hi))
        ax.set_xlabel("number of data points n")
        ax.set_ylabel("N_eff")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"Bayesian linear regression, P = {result.n_params} Fourier features: posterior contraction")
    fig.tight_layout()
    return fig


def run_blr(cfg: BLRConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Closed-form BLR contraction; writes blr.npz, the figure and metrics.json (returned)."""
    result = blr_posterior_contraction(
        n_points=cfg.n_points, n_frequencies=cfg.n_frequencies, x_max=cfg.x_max, noise_variance=cfg.noise_variance,
        prior_variance=cfg.prior_variance, s_parameter=cfg.s_parameter, s_function=cfg.s_function, seed=cfg.seed,
        shuffle=cfg.shuffle,
    )
    with RunDir.open(out, "effdim blr", {"blr": asdict(cfg), "seed": cfg.seed}, overwrite=overwrite) as run:
        return _write_blr(run, result, cfg)


def _write_blr(run: RunDir, result: BLRContraction, cfg: BLRConfig) -> dict[str, Any]:
    run.log(f"BLR contraction of {result.n_params} features over {len(result.n)} points")
    run.save_arrays("blr", n=result.n, effdim_posterior=result.effdim_posterior, effdim_function=result.effdim_function,
                    effdim_hessian=result.effdim_hessian)
    run.save_figure(blr_figure(result, cfg), "blr_effective_dimension")
    P, N = result.n_params, len(result.n)
    lo, hi = blr_regions(P)
    at = {f"n={m}": m for m in (int(lo), P, int(hi)) if 1 <= m <= N}
    metrics = {
        "n_params": P,
        "n_points": N,
        "effdim_posterior_first": float(result.effdim_posterior[0]),
        "effdim_posterior_last": float(result.effdim_posterior[-1]),
        "effdim_posterior_at": {k: float(result.effdim_posterior[m - 1]) for k, m in at.items()},
        "effdim_function_last": float(result.effdim_function[-1]),
        "effdim_function_at": {k: float(result.effdim_function[m - 1]) for k, m in at.items()},
        "effdim_hessian_last": float(result.effdim_hessian[-1]),
        "effdim_hessian_at": {k: float(result.effdim_hessian[m - 1]) for k, m in at.items()},
        "s_parameter": cfg.s_parameter,
        "s_function": cfg.s_function,
        "noise_variance": cfg.noise_variance,
        "prior_variance": cfg.prior_variance,
    }
    run.write_metrics(metrics)
    return metrics


# ----------------------------------------------------------------------------------------------
# demo section
# ----------------------------------------------------------------------------------------------


def curvature_section(out: Path, progress: bool, resume: bool = False) -> "Section":  # noqa: F821
    """Demo: top-20 Hessian spectrum, trace, density and N_eff of a digits MLP; the BLR contraction."""
    from modelsense.experiments.report import Section

    root = Path(out) / "curvature"
    spec = (resume and finished_metrics(root / "spectrum")) or run_spectrum(
        DataConfig("digits"), ModelConfig("mlp"), TrainConfig(epochs=20), root / "spectrum", k=20,
        s=(DEFAULT_S_SUM, 1297.0), trace_samples=30, density_probes=3, density_steps=40, lanczos_tol=1e-4,
        progress=progress, overwrite=True)
    blr = (resume and finished_metrics(root / "blr")) or run_blr(BLRConfig(), root / "blr", overwrite=True)
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


__all__ = [
    "DEFAULT_S_SUM",
    "PROTOTYPE_DATA",
    "PROTOTYPE_TRAIN",
    "PROTOTYPE_WIDTHS",
    "SWEEP_MODELS",
    "BLRConfig",
    "WidthSweepConfig",
    "blr_figure",
    "count_params",
    "curvature_model",
    "curvature_section",
    "describe_cost",
    "resolve_s",
    "run_blr",
    "run_spectrum",
    "run_width_sweep",
    "spearman",
    "spectrum_figure",
    "summarize_width_sweep",
    "train_and_measure",
    "width_result_path",
    "width_sweep_figure",
]
