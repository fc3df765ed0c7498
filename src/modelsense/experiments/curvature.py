"""`modelsense spectrum`, `modelsense perturb`, `modelsense effdim width-sweep | grid | blr`.

Maddox, Benton & Wilson (2020), "Rethinking parameter counting": the effective dimensionality
N_eff(H, s) = Σ_i λ_i / (λ_i + s) of the Hessian H of the training loss at the trained parameters
tracks generalisation better than the parameter count. The numbers come from `modelsense.curvature`
(`compute_spectrum`, `perturbation_study`, `train_sweep`, `width_sweep_summary`, `grid_summary`,
`blr_posterior_contraction`), the figures from `modelsense.curvature.plots`; this module runs them.

Conventions (`modelsense.curvature.spectrum`): the matrix is of the training loss SUMMED over the N
examples (`--reduction mean` divides it by N), at the trained parameters, in eval mode; s is on its
scale (default 100 for the sum, 100 / N for the mean); N_eff counts the converged top-k Ritz values.
What each command writes into its run directory, and the paper's two-spirals grid: docs/tutorials/curvature.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from modelsense.curvature.effdim import blr_posterior_contraction, describe_grid, describe_width_sweep
from modelsense.curvature.perturbation import describe_perturbation
from modelsense.curvature.spectrum import (
    DEFAULT_S_SUM,
    S_HELP,
    SpectrumConfig,
    check_k,
    compute_spectrum,
    count_params,
    curvature_model,
    describe_cost,
    describe_spectrum,
    module_arrays,
    module_metrics,
    module_spectra,
    resolve_s,
)
from modelsense.curvature.sweep import SweepModel, curvature_data, sweep_recipe, train_sweep
from modelsense.curvature.vectors import VECTORS_FILE, check_vectors, vector_arrays, vectors_key
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute_or_reuse
from modelsense.experiments.source import CHECKPOINT_HELP, TrainedRun, check_checkpoint, check_model, obtain_model
from modelsense.models import ModelConfig
from modelsense.options import check_fields, floats, ints, joined, option
from modelsense.retraining.store import STORE_DIR, RetrainOptions
from modelsense.runs import RunDir
from modelsense.training.config import TrainConfig

USE_TEST_HELP = (
    "the matrix of the loss over the test set instead of the training set (--use_test of the effective-dimensionality "
    "code of Maddox, Benton & Wilson 2020)"
)
WEIGHTS_ONLY_HELP = "only parameters with >= 2 dims (weights; no biases / norm parameters), as Maddox et al. 2020"
#: spectrum settings the commands that need the top-k eigenvectors only do not offer
ONLY_TOP_K = frozenset({"spectrum.s", "spectrum.trace_samples", "spectrum.density_probes", "spectrum.density_steps"})


def _top_k_only(spec: Any, what: str) -> None:
    if spec.spectrum.s or spec.spectrum.trace_samples or spec.spectrum.density_probes:
        raise ConfigError(what)


@dataclass(frozen=True)
class ModelCurvatureSpec:
    """What `spectrum` and `perturb` share: the model (trained here from `data`, `model` and `train`, or
    `checkpoint`) and its matrix (`spectrum`) over the training set or, with `use_test`, the test set,
    of all its parameters or, with `weights_only`, its weights only."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)
    use_test: bool = option(False, USE_TEST_HELP)

    def source(self) -> tuple[Dataset, TrainedRun | None, nn.Module]:
        """(data, the checked `checkpoint` or None, the module: the checkpoint's, or a fresh one of `model`)."""
        data = load_dataset_from_config(self.data)
        trained = None if self.checkpoint is None else check_checkpoint(self.checkpoint, self.data, data)
        return data, trained, check_model(data, self.model) if trained is None else trained.module


# -- modelsense spectrum -------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectrumSpec(ModelCurvatureSpec):
    """`modelsense spectrum`: a model (trained here, or `checkpoint`) and what of its curvature to compute."""

    save_vectors: bool = option(False, "keep the top-k eigenvectors in eigenvectors.npz (P x k float32, for "
                                       "`modelsense perturb --vectors`)")
    by_module: bool = option(False, "also the spectrum of each module's diagonal block of the matrix (its "
                                    "parameters alone, the others fixed): top min(k, P_m) eigenvalues, N_eff (and "
                                    "trace / density when asked) per module", flag="--by-module")


def check_spectrum(spec: SpectrumSpec) -> Prepared:
    data, trained, module = spec.source()
    check_k(spec.spectrum.k, module, spec.weights_only)
    # the settings used: s resolved for the examples the matrix is over, the seed of the run
    n = len(curvature_data(data, spec.use_test)[1])
    used = replace(spec.spectrum, s=resolve_s(spec.spectrum.s, spec.spectrum.reduction, n), seed=spec.train.seed)
    return Prepared(data, {"dataset": data.summary(), "spectrum": asdict(used)}, {"trained": trained, "spectrum": used})


def run_spectrum(spec: SpectrumSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train (or load the checkpoint) and write the spectrum (see the module docstring)."""
    from modelsense.curvature import plots

    data, used, trained = prepared.data, prepared.extra["spectrum"], prepared.extra["trained"]
    if trained is None:
        run.log(f"training {spec.model.name} on {data.name}")
    start = time.perf_counter()
    got = obtain_model(data, spec.model, spec.train, trained=trained, run=run, progress=progress)
    cost = {} if trained is not None else {"training": {"seconds": time.perf_counter() - start}}
    x, y = curvature_data(data, spec.use_test)
    run.log(f"spectrum: top {used.k} eigenvalues of the {used.matrix} ({used.reduction} loss) over {len(x)} "
            f"{'test' if spec.use_test else 'training'} examples")
    start = time.perf_counter()
    model = curvature_model(got.module.eval(), spec.weights_only)
    spectrum = compute_spectrum(model, x, y, used, progress=progress)
    seconds = time.perf_counter() - start
    if spec.save_vectors:
        key = vectors_key(model, spectrum, spec.weights_only, spec.use_test, len(x))
        run.save_arrays(VECTORS_FILE, **vector_arrays(spectrum, key))
    arrays = spectrum.arrays()
    run.save_arrays("spectrum", **arrays)
    summary = spectrum.to_metrics()
    final, title = got.fit.final, f"{got.model.name} on {data.name}"
    metrics = {**summary, "cost": {**cost, **summary["cost"]}, "s": list(used.s), "n_train": data.n_train,
               "use_test": spec.use_test, "n_examples": len(x), "weights_only": spec.weights_only,
               "n_params_total": count_params(got.module), **{k: final[k] for k in FINAL}, "seconds": seconds}
    run.save_figure(plots.spectrum_figure(spectrum, arrays.get("density_grid"), arrays.get("density"), title),
                    "spectrum")
    if spec.by_module:
        start = time.perf_counter()
        spectra = module_spectra(model, x, y, used, progress=progress)
        run.save_arrays("spectrum_by_module", **module_arrays(spectra))
        metrics["by_module"] = module_metrics(spectra)
        metrics["cost"]["by_module"] = {"matvecs": sum(sp.num_matvecs for sp in spectra.values()),
                                        "seconds": time.perf_counter() - start}
        run.save_figure(plots.module_spectra_figure(spectrum, spectra, title), "spectrum_by_module")
    run.log(f"done: N_eff(s={used.s[0]:g}) = {metrics['effective_dimension']:.4g}, trace = {metrics['trace']}; "
            f"cost: {describe_cost(metrics['cost'])}")
    return metrics


FINAL = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


SPECTRUM = Command(
    "spectrum", SpectrumSpec, check_spectrum, run_spectrum, summary=describe_spectrum,
    help="Train (or load --checkpoint) and compute the top-k eigenvalues and N_eff of the loss curvature "
    "(the trace and spectral density on request: they cost far more products than the eigenvalues).",
)


# -- modelsense perturb --------------------------------------------------------------------------
@dataclass(frozen=True)
class PerturbSpec(ModelCurvatureSpec):
    """`modelsense perturb`: the loss along θ + t·d through a model's parameters θ, for its top
    eigenvectors, low-curvature directions and random directions (`modelsense.curvature.perturbation`).

    The model: trained here, or `checkpoint`; the eigenvectors: computed here (top `spectrum.k`), or
    read from `vectors`, a `spectrum --save-vectors` run computed at that checkpoint (its matrix,
    reduction, weights_only and use_test must be this run's). t runs over `n_points` values evenly
    spaced in [−t_max, t_max] (an odd number: t = 0 is one of them).
    """

    spectrum: SpectrumConfig = field(default_factory=lambda: SpectrumConfig(k=10))
    vectors: str | None = option(None, "a `modelsense spectrum --save-vectors` run (its folder or eigenvectors.npz) "
                                       "made at --checkpoint: its top eigenvectors instead of computing them")
    n_top: int = option(3, "top eigenvectors v_1 ... v_n to move along", low=0)
    n_bottom: int = option(3, "low-curvature directions: unit Gaussian directions projected off the top-k "
                              "eigenvectors (as in Maddox, Benton & Wilson 2020)", low=0)
    n_random: int = option(3, "unit Gaussian directions in parameter space", low=0)
    t_max: float = option(1.0, "largest |t| (directions have unit length)", above=0, below=float("inf"))
    n_points: int = option(21, "values of t, evenly spaced in [-t_max, t_max]; odd, so that t = 0 is one", low=3)
    direction_seed: int = option(0, "seed of the random and low-curvature directions")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.n_top + self.n_bottom + self.n_random:
            raise ConfigError(f"--n-top, --n-bottom, --n-random must be >= 0 and not all 0; received {self.n_top}, "
                              f"{self.n_bottom}, {self.n_random}")
        if self.n_points % 2 == 0:
            raise ConfigError(f"--n-points must be odd (t = 0 is the middle one), received {self.n_points}")
        _top_k_only(self, "perturb uses the top-k eigenvectors only: no s, trace or density")


def check_perturb(spec: PerturbSpec) -> Prepared:
    from modelsense.curvature.vectors import read_vectors

    data, trained, module = spec.source()
    n_curv = count_params(module, spec.weights_only)
    used = replace(spec.spectrum, seed=spec.train.seed)
    extra: dict[str, Any] = {"trained": trained, "spectrum": used, "vectors": None}
    config: dict[str, Any] = {"dataset": data.summary()}
    if spec.vectors is not None:
        if trained is None:
            raise ConfigError("--vectors needs the --checkpoint of the model they were computed at")
        file, key, extra["vectors"] = read_vectors(spec.vectors)
        check_vectors(file, key, curvature_model(module, spec.weights_only), spec.checkpoint,
                      weights_only=spec.weights_only, use_test=spec.use_test, matrix=spec.spectrum.matrix,
                      reduction=spec.spectrum.reduction)
        k = extra["vectors"]["eigenvectors"].shape[1]
        config["vectors"] = {"file": str(file.resolve()), "k": k, **key}
    else:
        k = spec.spectrum.k
        check_k(k, module, spec.weights_only)
        config["spectrum"] = asdict(used)
    if spec.n_top > k:
        raise ConfigError(f"--n-top {spec.n_top} is more than the {k} eigenvectors "
                          f"{'in --vectors' if spec.vectors else 'computed (--k)'}")
    if spec.n_bottom and k >= n_curv:
        raise ConfigError(f"the {k} top eigenvectors span all {n_curv} parameters: no low-curvature direction is "
                          "left; lower --k or pass --n-bottom 0")
    return Prepared(data, config, extra)


def run_perturb(spec: PerturbSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Directions, the loss along each on the train and test sets, the curvature along each; writes
    perturb.npz and figures/perturb.png."""
    from modelsense.curvature import plots
    from modelsense.curvature.perturbation import perturbation_study

    data, used, stored = prepared.data, prepared.extra["spectrum"], prepared.extra["vectors"]
    got = obtain_model(data, spec.model, spec.train, trained=prepared.extra["trained"], run=run, progress=progress)
    model = curvature_model(got.module.eval(), spec.weights_only)
    x, y = curvature_data(data, spec.use_test)
    if stored is None:
        run.log(f"top {used.k} eigenvectors of the {used.matrix} ({used.reduction} loss) over {len(x)} examples")
    run.log(f"loss along {spec.n_top + spec.n_bottom + spec.n_random} directions at {spec.n_points} values of t in "
            f"[-{spec.t_max:g}, {spec.t_max:g}]")
    t = torch.linspace(-spec.t_max, spec.t_max, spec.n_points, dtype=torch.float64)
    study = perturbation_study(model, x, y, used, {"train": (data.x_train, data.y_train),
                                                   "test": (data.x_test, data.y_test)}, t, spec.n_top, spec.n_bottom,
                               spec.n_random, spec.direction_seed,
                               None if stored is None else (stored["eigenvectors"], stored["eigenvalues"]), progress)
    run.save_arrays("perturb", **study.arrays())
    title = (f"{got.model.name} on {data.name}: loss along θ + t·d ({used.matrix} eigenvectors v_i warm colours, "
             "low-curvature blue/purple, random grey/green)")
    run.save_figure(plots.perturbation_figure(t.numpy(), study.names, study.kinds, study.curves("train"),
                                              study.curves("test"), title), "perturb")
    return {**study.metrics(), "t_max": spec.t_max, "n_points": spec.n_points, "n_params": model.n_params,
            "matrix": used.matrix, "reduction": used.reduction, "use_test": spec.use_test,
            "weights_only": spec.weights_only, "vectors": "computed" if stored is None else "read",
            **{k: got.fit.final[k] for k in FINAL}, "seconds": study.seconds}


PERTURB = Command("perturb", PerturbSpec, check_perturb, run_perturb, summary=describe_perturbation, hide=ONLY_TOP_K,
                  help="The loss along θ + t·d for the top Hessian eigenvectors, low-curvature and random directions "
                       "(train/test loss, accuracy, prediction agreement against t): the loss-surface perturbations "
                       "of Maddox et al. 2020. Eigenvectors computed here or read from `spectrum --save-vectors` "
                       "(--vectors, with its --checkpoint).")


# -- modelsense effdim width-sweep | grid ----------------------------------------------------------
@dataclass(frozen=True)
class SweepSpec:
    """What `effdim width-sweep` and `effdim grid` share: the data and training of every model (default:
    the prototype's sweep: standardised digits with 20% label noise, Adam at a constant 3e-3, 400 epochs,
    batch 128, no weight decay), the top-k spectrum of each (`spectrum` gives k and how the eigenvalues
    are computed; its s, trace and density are unused: s is the sweep's own), and the threshold of the
    interpolating models. The models are trained and kept on the ground-truth store (`retrain`: where,
    and which store); each model's measurements are one JSON file (`train_sweep`): a resumed sweep must
    keep what every model shares (config.json's `sweep` / `grid`, the device aside)."""

    NAME: ClassVar[str] = ""
    VARIES: ClassVar[str] = "the width"
    MODELS: ClassVar[tuple[str, ...]] = ()
    #: training options each model may set for itself (left out of what a resumed run must keep)
    OWN: ClassVar[tuple[str, ...]] = ("device",)

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", corruption_ratio=0.2, standardize=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=400,
                                                                   bs=128, delta=0.0))
    spectrum: SpectrumConfig = field(default_factory=lambda: SpectrumConfig(k=50))
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)
    use_test: bool = option(False, USE_TEST_HELP)
    s: tuple[float, ...] = option((), S_HELP, parse=floats, show=joined)
    #: where the models are trained and stored (--backend, --address, --store; --chunk-size is the spectrum's)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model.name not in self.MODELS:
            raise ConfigError(f"{self.NAME} varies {self.VARIES} of {', '.join(self.MODELS)}; received --model "
                              f"{self.model.name!r}")
        _distinct("--widths", self.widths)
        _top_k_only(self, f"{self.NAME} computes the top-k eigenvalues only: give s as {type(self).__name__}.s, and "
                          "no trace or density")

    def models(self, root: Path) -> list[SweepModel]:
        raise NotImplementedError

    def sized(self, width: int, depth: int | None) -> ModelConfig:
        """`model` with `width` and `depth` (mlp: `depth` hidden layers of the width; others: their `width`
        and, unless None, `depth`)."""
        if self.model.name == "mlp":
            return replace(self.model, widths=(width,) * depth)
        return replace(self.model, width=width, **({} if depth is None else {"depth": depth}))

    def shared(self) -> dict[str, Any]:
        return {"data": asdict(self.data), "model": asdict(self.model),
                "train": {k: v for k, v in asdict(self.train).items() if k not in self.OWN},
                "spectrum": asdict(self.spectrum), "weights_only": self.weights_only, "use_test": self.use_test}


def _distinct(flag: str, values: tuple[int, ...]) -> None:
    if not values or len(set(values)) != len(values) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{flag} must be distinct integers, received {list(values)}")


def check_sweep(spec: SweepSpec) -> Prepared:
    """The dataset, the model options of every model, s; config.json's `sweep` / `grid` (`SweepSpec.shared`)."""
    data = load_dataset_from_config(spec.data)
    for config in {repr(m.config): m.config for m in spec.models(Path())}.values():  # each architecture once
        check_model(data, config)
        sweep_recipe(spec.data, config, spec.train)  # trained by the engine (sgd, adam or adamw)
    s = resolve_s(spec.s, spec.spectrum.reduction, len(curvature_data(data, spec.use_test)[1]))
    return Prepared(data, {"dataset": data.summary(), "s": list(s), spec.KEY: spec.shared()}, {"s": s})


def _train(spec: SweepSpec, prepared: Prepared, run: RunDir, progress: bool) -> tuple[list, dict]:
    """Train (or find on the store) and measure the models not finished in the run: (every model's result,
    the metrics beside the summary)."""
    start, models = time.perf_counter(), spec.models(run.path)
    models[0].path.parent.mkdir(exist_ok=True)
    results, n_trained = train_sweep(prepared.data, spec.data, models, spec.train, spec.spectrum, spec.weights_only,
                                     spec.use_test, prepared.extra["s"][0], spec.retrain, run.path, spec.save_models,
                                     progress, run.log)
    return results, {"matrix": spec.spectrum.matrix, "reduction": spec.spectrum.reduction,
                     "n_train": prepared.data.n_train, "use_test": spec.use_test, "weights_only": spec.weights_only,
                     "n_trained": n_trained, "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class WidthSweepSpec(SweepSpec):
    """`modelsense effdim width-sweep`: models that differ only in width (`widths`: every hidden layer of an
    mlp, `hidden_layers` of them, or the `width` of cnn / resnet18), the top-k spectrum of each, and N_eff
    against the test loss. The defaults are the prototype's sweep (`SweepSpec`): one-hidden-layer ReLU MLPs.
    widths, s, the threshold and save_models may change on `--resume` (N_eff is recomputed from the saved
    eigenvalues); the rest (config.json's `sweep`) must not.
    """

    NAME: ClassVar[str] = "width-sweep"
    MODELS: ClassVar[tuple[str, ...]] = ("mlp", "cnn", "resnet18")
    KEY: ClassVar[str] = "sweep"

    widths: tuple[int, ...] = option((2, 4, 8, 12, 16, 24, 32, 64, 128, 256, 512), "comma-separated widths to train",
                                     parse=ints, show=joined, low=1)
    hidden_layers: int = option(1, "mlp: number of hidden layers, all of the width", low=1)
    train_loss_threshold: float = option(0.01, "models with a final mean train NLL below it count as interpolating "
                                               "(the Spearman correlations)", above=0)
    save_models: bool = option(False, "keep each trained model as widths/model_<w>.pt")

    def models(self, root: Path) -> list[SweepModel]:
        depth = self.hidden_layers if self.model.name == "mlp" else None
        return [SweepModel(Path(root) / "widths" / f"width_{w}.json", self.sized(w, depth), self.train.seed,
                           {"width": w}, Path(root) / "widths" / f"model_{w}.pt") for w in self.widths]

    def shared(self) -> dict[str, Any]:
        return {**super().shared(), "hidden_layers": self.hidden_layers}


def run_width_sweep(spec: WidthSweepSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train every width not finished in the run, then summarise all of them (see the module docstring)."""
    from modelsense.curvature import plots
    from modelsense.curvature.effdim import width_sweep_summary

    results, extra = _train(spec, prepared, run, progress)
    summary = width_sweep_summary(results, prepared.extra["s"], spec.train_loss_threshold)
    run.save_arrays("width_sweep", **{k: np.asarray(summary[k], dtype=float) for k in
                                      ("widths", "n_params", "train_loss", "test_loss", "test_error",
                                       "effective_dimension")})
    name = spec.model.name if spec.model.name != "mlp" else f"{spec.hidden_layers}-hidden-layer MLP"
    run.save_figure(plots.width_sweep_figure(summary, f"{name} on {prepared.data.name} (label noise "
                                                      f"{spec.data.corruption_ratio:g})"), "width_sweep")
    return {**summary, **extra}


WIDTH_SWEEP = Command(
    "effdim width-sweep", WidthSweepSpec, check_sweep, run_width_sweep, summary=describe_width_sweep,
    keep=("widths", STORE_DIR), resume_keys=("sweep",),
    hide=ONLY_TOP_K | {"model.widths", "model.width", "retrain.chunk_size"},
    help="Models from narrow to wide: test loss, parameter count and N_eff against width (double descent). The "
         "default is the prototype: one-hidden-layer ReLU MLPs on standardised digits with 20% label noise, Adam at "
         "a constant rate 3e-3 (--lrmin = --lr; set both to change it), 400 epochs, batch 128, no weight decay; "
         "top-50 Hessian eigenvalues of the summed training loss, s = 100. The models are trained by the retraining "
         "engine and kept on the ground-truth store (--store shares them between runs; --backend ray).")


@dataclass(frozen=True)
class GridSpec(SweepSpec):
    """`modelsense effdim grid`: models over a width x depth grid (mlp: `depth` hidden layers of the
    width, depth >= 1; cnn: its `width` c and `depth`, depth >= 0), `repeats` seeds per cell, the top-k
    spectrum of each; heatmaps of N_eff, test and train loss (Maddox et al. 2020, Fig. 2: ConvNetDepth on
    CIFAR-100, depths 0..8, widths 4..64) and their profiles along width and depth (the two-spirals
    figure). Defaults as `effdim width-sweep` (`SweepSpec`). Resumable per model
    (cells/depth_<d>_width_<w>_seed_<s>.json): widths, depths, repeats, s, the threshold and save_models
    may change; the rest (config.json's `grid`, the seed aside) must not.
    """

    NAME: ClassVar[str] = "effdim grid"
    VARIES: ClassVar[str] = "the width and depth"
    MODELS: ClassVar[tuple[str, ...]] = ("mlp", "cnn")
    KEY: ClassVar[str] = "grid"
    OWN: ClassVar[tuple[str, ...]] = ("device", "seed")

    widths: tuple[int, ...] = option((4, 8, 16, 32, 64), "comma-separated widths", parse=ints, show=joined, low=1)
    depths: tuple[int, ...] = option((1, 2, 3), "comma-separated depths (mlp: hidden layers >= 1; cnn: blocks "
                                                "after the stem >= 0)", parse=ints, show=joined, low=0)
    repeats: int = option(1, "models per cell, seeds --seed, --seed + 1, ...: the figures show mean ± 2 std", low=1)
    train_loss_threshold: float = option(0.01, "cells with a mean final train NLL below it count as interpolating "
                                               "(the Spearman correlations)", above=0)
    save_models: bool = option(False, "keep each trained model as cells/model_depth_<d>_width_<w>_seed_<s>.pt")

    def __post_init__(self) -> None:
        super().__post_init__()
        _distinct("--depths", self.depths)
        if self.model.name == "mlp" and min(self.depths) < 1:
            raise ConfigError(f"--depths of an mlp (hidden layers) must be >= 1, received {list(self.depths)}")

    def models(self, root: Path) -> list[SweepModel]:
        out = []
        for d, w, r in ((d, w, r) for d in self.depths for w in self.widths for r in range(self.repeats)):
            seed, stem = self.train.seed + r, f"depth_{d}_width_{w}_seed_{self.train.seed + r}"
            out.append(SweepModel(Path(root) / "cells" / f"{stem}.json", self.sized(w, d), seed,
                                  {"depth": d, "width": w, "seed": seed}, Path(root) / "cells" / f"model_{stem}.pt"))
        return out


def run_grid(spec: GridSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train every cell (and seed) not finished in the run, then summarise the grid (see GridSpec)."""
    from modelsense.curvature import plots
    from modelsense.curvature.effdim import grid_summary

    results, extra = _train(spec, prepared, run, progress)
    summary = grid_summary(results, spec.widths, spec.depths, prepared.extra["s"], spec.train_loss_threshold)
    run.save_arrays("grid", **{k: np.asarray(summary[k], dtype=float) for k in
                               ("widths", "depths", "n_params", "train_loss", "test_loss", "test_error",
                                "effective_dimension", "train_loss_std", "test_loss_std", "effective_dimension_std")})
    name = "MLP" if spec.model.name == "mlp" else spec.model.name
    title = (f"{name} on {prepared.data.name} (label noise {spec.data.corruption_ratio:g}, {spec.repeats} seed(s) "
             "per cell)")
    run.save_figure(plots.grid_figure(summary, title), "grid")
    run.save_figure(plots.grid_profiles_figure(summary, title), "grid_profiles")
    return {**summary, "model": spec.model.name, **extra}


GRID = Command(
    "effdim grid", GridSpec, check_sweep, run_grid, summary=describe_grid, keep=("cells", STORE_DIR),
    resume_keys=("grid",), hide=ONLY_TOP_K | {"model.widths", "model.width", "model.depth", "retrain.chunk_size"},
    help="Models over a width x depth grid (mlp: depth hidden layers of the width; cnn: width and depth), "
         "--repeats seeds per cell: heatmaps of N_eff, test and train loss, and their profiles along width and depth. "
         "Defaults as width-sweep (digits with 20% label noise, Adam at 3e-3, 400 epochs); resumable per model; "
         "the models on the ground-truth store as width-sweep's.")


# -- modelsense effdim blr -----------------------------------------------------------------------
@dataclass(frozen=True)
class BLRSpec:
    """`modelsense effdim blr`: Bayesian linear regression on Fourier features (`blr_posterior_contraction`,
    the notebook of Maddox et al. 2020)."""

    n_points: int = option(300, "inputs x = linspace(0, x-max, n-points), added one at a time", low=1)
    n_frequencies: int = option(100, "F: features cos((f+1)πx), sin((f+1)πx), P = 2F", low=1)
    x_max: float = option(50.0, "largest input x", above=0)
    noise_variance: float = option(0.1, "σ² of the likelihood", above=0)
    prior_variance: float = option(3.0, "τ² of the prior N(0, τ² I)", above=0)
    s_parameter: float = option(5.0, "s of the posterior-covariance N_eff", flag="--s", above=0)
    s_function: float = option(5.0, "s of the function-space-covariance N_eff", above=0)
    seed: int = option(0, "seed of the order in which the points are added")
    shuffle: bool = option(True, "add the points in a random order", flag="--shuffle/--no-shuffle")

    def __post_init__(self) -> None:
        check_fields(self)


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
    return {**result.summary(), **{k: getattr(spec, k) for k in ("s_parameter", "s_function", "noise_variance",
                                                                 "prior_variance")}, "seconds": seconds}


BLR = Command("effdim blr", BLRSpec, lambda spec: Prepared(), run_blr,
              summary=lambda m: f"P = {m['n_params']}: posterior N_eff {m['effdim_posterior_first']:.4g} (n=1) -> "
                                f"{m['effdim_posterior_last']:.4g} (n={m['n_points']}); function-space N_eff "
                                f"{m['effdim_function_last']:.4g}; well-determined parameters "
                                f"{m['effdim_hessian_last']:.4g}",
              help="Bayesian linear regression (closed form): N_eff of the posterior contracts once n passes P.")
# -- demo section --------------------------------------------------------------------------------
def curvature_section(out: Path, progress: bool, resume: bool = False) -> Section:  # noqa: F821
    """Demo: top-20 Hessian spectrum, trace, density and N_eff of a digits MLP; the loss along its top
    eigenvectors against random directions; the BLR contraction."""
    from modelsense.report import Section

    root = Path(out) / "curvature"
    spectrum = SpectrumSpec(train=TrainConfig(epochs=20), save_vectors=True, spectrum=SpectrumConfig(
        k=20, s=(DEFAULT_S_SUM, 1297.0), trace_samples=30, density_probes=3, density_steps=40, lanczos_tol=1e-4))
    perturb = PerturbSpec(train=spectrum.train, checkpoint=str(root / "spectrum" / "model.pt"),
                          vectors=str(root / "spectrum"))
    runs = {"spectrum": (SPECTRUM, spectrum), "perturb": (PERTURB, perturb), "blr": (BLR, BLRSpec())}
    spec, pert, blr = (execute_or_reuse(command, args, root / name, resume=resume, progress=progress)
                       for name, (command, args) in runs.items())  # in order: perturb reads the spectrum run
    rises = pert["rise_at_t_double"]
    metrics = {
        "n_params": spec["n_params"],
        "top eigenvalue": spec["eigenvalues"][0],
        "20th eigenvalue": spec["eigenvalues"][-1],
        "trace (Hutchinson, 30 probes)": spec["trace"],
        "trace standard error": spec["trace_standard_error"],
        f"N_eff (s = {DEFAULT_S_SUM:g})": spec["effective_dimension_by_s"][str(DEFAULT_S_SUM)],
        "N_eff (s = N = 1297)": spec["effective_dimension_by_s"]["1297.0"],
        "test_accuracy": spec["test_accuracy"],
        "t at which v_1 doubles the train loss": pert["t_double"],
        "train-loss rise there: v_1 / low-curvature / random": "n/a"
        if rises is None
        else (f"{100 * rises['top'][0]:.3g}% / {100 * rises['bottom']:.3g}% / {100 * rises['random']:.3g}%"),
        "BLR posterior N_eff at n = 1 / P / 300": f"{blr['effdim_posterior_first']:.3g} / "
        f"{blr['effdim_posterior_at']['n=200']:.3g} / {blr['effdim_posterior_last']:.3g}",
    }
    return Section(
        "Curvature: Hessian spectrum and effective dimensionality",
        "Top-20 eigenvalues (Lanczos with full reorthogonalisation) of the Hessian of the training loss summed over "
        "the 1297 digits examples, at an MLP 64-128-128-10 trained for 20 epochs, its trace (Hutchinson) and "
        "spectral density (stochastic Lanczos quadrature). N_eff = Σ λ_i/(λ_i + s) over the converged top 20 "
        "(Maddox et al. 2020); s scales with the loss reduction: s = N on the summed loss equals "
        "s = 1 on the mean loss of Maddox et al.'s code. The loss along θ + t·d (Maddox et al. 2020, Section 5): "
        "it rises steeply along the top eigenvectors and hardly at all along random or low-curvature directions "
        "(random directions projected off the top 20), which also leave the predictions unchanged. "
        "Bayesian linear regression on 200 Fourier features: the posterior covariance's "
        "N_eff contracts as the number of points n passes the number of parameters (shaded: n < 175, 175-225, > 225).",
        metrics,
        [root / "spectrum" / "figures" / "spectrum.png", root / "perturb" / "figures" / "perturb.png",
         root / "blr" / "figures" / "blr_effective_dimension.png"],
        str(root),
    )


__all__ = ["BLR", "GRID", "PERTURB", "SPECTRUM", "WIDTH_SWEEP", "BLRSpec", "GridSpec", "PerturbSpec", "SpectrumSpec",
           "SweepSpec", "WidthSweepSpec", "curvature_section"]
