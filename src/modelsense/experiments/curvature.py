"""`modelsense spectrum`, `modelsense perturb`, `modelsense effdim width-sweep | grid | blr`.

Maddox, Benton & Wilson (2020), "Rethinking parameter counting": the effective dimensionality
N_eff(H, s) = Σ_i λ_i / (λ_i + s) of the Hessian H of the training loss at the trained parameters
tracks generalisation better than the parameter count. The numbers come from `modelsense.curvature`
(`compute_spectrum`, `width_sweep_summary`, `grid_summary`, `blr_posterior_contraction`, the line
scans of `curvature.perturbation`), the figures from `modelsense.curvature.plots`; this module runs them.

Conventions (`modelsense.curvature.spectrum`): the matrix is of the training loss SUMMED over the N
examples (`--reduction mean` divides it by N), at the trained parameters, in eval mode; `use_test`
takes the loss over the test set instead (the original's --use_test; N is then the test-set size,
also for the default s); s is on the scale of that matrix (default 100 for the sum, 100 / N for the
mean); N_eff counts the converged top-k Ritz values (a lower bound of the full N_eff); the trace and
the density are computed only on request (they cost far more products than the eigenvalues;
metrics.json's `cost` says what each part cost); `weights_only` restricts the matrix to the
parameters with >= 2 dimensions.

Run directories:
    spectrum:     config.json, metrics.json (eigenvalues, eigenvalues_converged, trace and its
                  standard error (None unless asked), effective_dimension (first s), effective_dimension_by_s,
                  s, n_params, matrix, reduction, use_test, n_examples, train/test loss and accuracy, cost
                  {part: {matvecs, seconds}}, num_matvecs, seconds (the spectrum)), spectrum.npz, model.pt
                  (trained here), figures/spectrum.png; with `save_vectors` eigenvectors.npz (eigenvectors
                  (P, k) float32, eigenvalues, converged, key: the JSON of what they were computed with,
                  the sha256 of the parameters included, which `perturb --vectors` checks); with
                  `by_module` metrics.json's by_module {module: eigenvalues, N_eff, ... of its diagonal
                  block}, spectrum_by_module.npz (<module>: eigenvalues, <module>:converged) and
                  figures/spectrum_by_module.png
    perturb:      config.json, metrics.json (names and kinds of the directions, their curvature dᵀKd,
                  train/test loss at t = 0, t_double: where the symmetrised train-loss rise
                  (L(t) + L(-t))/2 - L(0) along v_1 first reaches L(0), the relative rise of every
                  direction there and at t_max), perturb.npz (t, curves (directions, t) of loss, accuracy
                  and agreement on train and test, curvature, eigenvalues), model.pt (trained here),
                  figures/perturb.png
    width-sweep:  config.json, widths/width_<w>.json (one per finished model: losses, eigenvalues, history;
                  the resumable state: `--resume` trains only the widths without one, and may change the
                  widths, s and the threshold, since N_eff is recomputed from the saved eigenvalues),
                  widths/model_<w>.pt (`save_models`), metrics.json, width_sweep.npz, figures/width_sweep.png
    grid:         config.json, cells/depth_<d>_width_<w>_seed_<s>.json (one per finished model, resumable
                  as the width sweep's; widths, depths and repeats may change), cells/model_*.pt
                  (`save_models`), metrics.json ((depths, widths) lists: means, _std, _all per seed),
                  grid.npz, figures/grid.png (heatmaps), figures/grid_profiles.png (along width and depth)
    blr:          config.json, metrics.json, blr.npz, figures/blr_effective_dimension.png

The two-spirals experiment of the paper (Section 5: small MLPs of increasing width and depth on the
generated two-spirals set, N_eff, train and test loss, mean ± 2 std over repeats) is a grid:

    modelsense effdim grid --dataset spirals --corruption-ratio 0 --widths 2,4,8,16,32 --depths 1,2,3,4 \
        --repeats 3 --optimizer adam --lr 1e-2 --lrmin 1e-2 --epochs 300 --bs 128 --reduction mean --s 1,50 \
        --out runs/spirals

(the grid's data default standardises the coordinates; s = 50 is the value of the original's plotting
notebook, on a scale it does not state; s = 1 on the mean loss is its double-descent value). The
notebook's loss surfaces along high- and low-curvature directions are `modelsense perturb --dataset
spirals ...`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature.effdim import blr_posterior_contraction, blr_regions, effective_dimension
from modelsense.curvature.spectrum import (
    DEFAULT_S_SUM,
    S_HELP,
    SpectrumConfig,
    compute_spectrum,
    count_params,
    curvature_model,
    density_on_grid,
    module_spectra,
    resolve_s,
)
from modelsense.curvature.sweep import curvature_data, train_and_measure
from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute
from modelsense.experiments.source import CHECKPOINT_HELP, check_checkpoint, check_model, obtain_model
from modelsense.models import ModelConfig
from modelsense.models.checkpoint import save_model
from modelsense.options import floats, ints, joined, option
from modelsense.progress import progress_bar
from modelsense.runs import RunDir, finished_metrics, read_json, write_json
from modelsense.training.config import TrainConfig

USE_TEST_HELP = (
    "the matrix of the loss over the test set instead of the training set (--use_test of the effective-dimensionality "
    "code of Maddox, Benton & Wilson 2020)"
)
VECTORS_FILE = "eigenvectors"
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
    use_test: bool = option(False, USE_TEST_HELP)
    save_vectors: bool = option(False, "keep the top-k eigenvectors in eigenvectors.npz (P x k float32, for "
                                       "`modelsense perturb --vectors`)")
    by_module: bool = option(False, "also the spectrum of each module's diagonal block of the matrix (its "
                                    "parameters alone, the others fixed): top min(k, P_m) eigenvalues, N_eff (and "
                                    "trace / density when asked) per module", flag="--by-module")


def check_spectrum(spec: SpectrumSpec) -> Prepared:
    data = load_dataset_from_config(spec.data)
    trained = None if spec.checkpoint is None else check_checkpoint(spec.checkpoint, spec.data, data)
    module = check_model(data, spec.model) if trained is None else trained.module
    check_k(spec.spectrum.k, module, spec.weights_only)
    # the settings used: s resolved for the examples the matrix is over, the seed of the run
    n = curvature_examples(data, spec.use_test)
    used = replace(spec.spectrum, s=resolve_s(spec.spectrum.s, spec.spectrum.reduction, n), seed=spec.train.seed)
    return Prepared(data, {"dataset": data.summary(), "spectrum": asdict(used)},
                    {"trained": trained, "spectrum": used})


def check_k(k: int, module: nn.Module, weights_only: bool) -> int:
    """The number of parameters the matrix acts on; ConfigError when `k` exceeds it."""
    n_curv = count_params(module, weights_only)
    if k > n_curv:
        raise ConfigError(f"--k {k} is larger than the number of parameters the matrix acts on ({n_curv}"
                          f"{', weights only' if weights_only else ''}); pass --k <= {n_curv}")
    return n_curv


def curvature_examples(data: Dataset, use_test: bool) -> int:
    return data.n_test if use_test else data.n_train


def parameters_fingerprint(model: FunctionalModel) -> str:
    """sha256 of the parameter names and values (float32 bytes) the matrix acts on: which model a set
    of eigenvectors belongs to."""
    h = hashlib.sha256()
    for name, p in model.params.items():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def vectors_key(model: FunctionalModel, used: SpectrumConfig, weights_only: bool, use_test: bool,
                n_examples: int) -> dict[str, Any]:
    """What eigenvectors.npz was computed with (`--vectors` refuses another model or matrix)."""
    return {"parameters_sha256": parameters_fingerprint(model), "n_params": model.n_params, "matrix": used.matrix,
            "reduction": used.reduction, "weights_only": weights_only, "use_test": use_test,
            "n_examples": n_examples}


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
    x, y = curvature_data(data, spec.use_test)
    run.log(f"spectrum: top {used.k} eigenvalues of the {used.matrix} ({used.reduction} loss) over {len(x)} "
            f"{'test' if spec.use_test else 'training'} examples")
    start = time.perf_counter()
    model = curvature_model(module, spec.weights_only)
    spectrum = compute_spectrum(model, x, y, used, progress=progress)
    seconds = time.perf_counter() - start
    if spec.save_vectors:
        key = vectors_key(model, used, spec.weights_only, spec.use_test, len(x))
        run.save_arrays(VECTORS_FILE, eigenvectors=spectrum.eigenvectors.to(torch.float32),
                        eigenvalues=spectrum.eigenvalues, converged=spectrum.converged, key=np.array(json.dumps(key)))
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
    metrics = {**summary, "cost": cost, "s": list(used.s), "n_train": data.n_train, "use_test": spec.use_test,
               "n_examples": len(x), "weights_only": spec.weights_only,
               "n_params_total": count_params(module),
               **{k: final[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
               "seconds": seconds}
    run.save_figure(plots.spectrum_figure(spectrum, grid, dens, f"{got.model.name} on {data.name}"), "spectrum")
    if spec.by_module:
        start = time.perf_counter()
        spectra = module_spectra(model, x, y, used, progress=progress)
        run.save_arrays("spectrum_by_module", **{m: sp.eigenvalues for m, sp in spectra.items()},
                        **{f"{m}:converged": sp.converged for m, sp in spectra.items()})
        keep = ("eigenvalues", "eigenvalues_converged", "trace", "trace_standard_error", "effective_dimension",
                "effective_dimension_by_s", "n_params", "num_matvecs")
        metrics["by_module"] = {m: {k: v for k, v in sp.to_metrics().items() if k in keep} for m, sp in spectra.items()}
        metrics["cost"]["by_module"] = {"matvecs": sum(sp.num_matvecs for sp in spectra.values()),
                                        "seconds": time.perf_counter() - start}
        run.save_figure(plots.module_spectra_figure(spectrum, spectra, f"{got.model.name} on {data.name}"),
                        "spectrum_by_module")
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
    over = f" over the {m['n_examples']} test examples" if m.get("use_test") else ""
    return (f"{m['matrix']} ({m['reduction']} loss{over}), {m['n_params']} parameters: λ_1 {lam[0]:.4g} … "
            f"λ_{len(lam)} {lam[-1]:.4g}{trace}\n"
            + "N_eff " + "  ".join(f"(s={float(v):g}) {n:.4g}" for v, n in m["effective_dimension_by_s"].items())
            + f"\ncost: {describe_cost(m['cost'])}" + (f"; not computed: {', '.join(skipped)}" if skipped else "")
            + "".join(f"\n  {name}: {b['n_params']} parameters, λ_1 {b['eigenvalues'][0]:.4g}, "
                      f"N_eff {b['effective_dimension']:.4g}" for name, b in m.get("by_module", {}).items()))


SPECTRUM = Command(
    "spectrum",
    SpectrumSpec,
    check_spectrum,
    run_spectrum,
    summary=spectrum_summary,
    help="Train (or load --checkpoint) and compute the top-k eigenvalues and N_eff of the loss curvature "
    "(the trace and spectral density on request: they cost far more products than the eigenvalues).",
)


# -- modelsense perturb --------------------------------------------------------------------------
@dataclass(frozen=True)
class PerturbSpec:
    """`modelsense perturb`: the loss along θ + t·d through a model's parameters θ, for its top
    eigenvectors, low-curvature directions and random directions (`modelsense.curvature.perturbation`).

    The model: trained here, or `checkpoint`; the eigenvectors: computed here (top `spectrum.k`), or
    read from `vectors`, a `spectrum --save-vectors` run computed at that checkpoint (its matrix,
    reduction, weights_only and use_test must be this run's). t runs over `n_points` values evenly
    spaced in [−t_max, t_max] (an odd number: t = 0 is one of them).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = option(None, CHECKPOINT_HELP)
    vectors: str | None = option(None, "a `modelsense spectrum --save-vectors` run (its folder or eigenvectors.npz) "
                                       "made at --checkpoint: its top eigenvectors instead of computing them")
    spectrum: SpectrumConfig = field(default_factory=lambda: SpectrumConfig(k=10))
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)
    use_test: bool = option(False, USE_TEST_HELP)
    n_top: int = option(3, "top eigenvectors v_1 ... v_n to move along")
    n_bottom: int = option(3, "low-curvature directions: unit Gaussian directions projected off the top-k "
                              "eigenvectors (as in Maddox, Benton & Wilson 2020)")
    n_random: int = option(3, "unit Gaussian directions in parameter space")
    t_max: float = option(1.0, "largest |t| (directions have unit length)")
    n_points: int = option(21, "values of t, evenly spaced in [-t_max, t_max]; odd, so that t = 0 is one")
    direction_seed: int = option(0, "seed of the random and low-curvature directions")


def read_vectors(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """(file, key, arrays) of a `spectrum --save-vectors` run (its folder or its eigenvectors.npz)."""
    from modelsense.runs import require_finished

    path = Path(path)
    file = path / f"{VECTORS_FILE}.npz" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--vectors {path}: no {VECTORS_FILE}.npz there; run `modelsense spectrum --save-vectors` "
                          "(at the model's --checkpoint) first")
    require_finished(file.parent, f"--vectors {file}")
    try:
        with np.load(file) as f:
            arrays = {k: f[k] for k in f.files}
        key = json.loads(str(arrays.pop("key")))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one message
        raise ConfigError(f"--vectors {file} is not a readable eigenvectors.npz of `modelsense spectrum` "
                          f"({exc})") from None
    return file, key, arrays


def check_perturb(spec: PerturbSpec) -> Prepared:
    counts = {"--n-top": spec.n_top, "--n-bottom": spec.n_bottom, "--n-random": spec.n_random}
    if any(c < 0 for c in counts.values()) or not sum(counts.values()):
        raise ConfigError(f"{', '.join(counts)} must be >= 0 and not all 0; received "
                          f"{', '.join(str(c) for c in counts.values())}")
    if not (0 < spec.t_max < float("inf")):
        raise ConfigError(f"--t-max must be a finite number > 0, received {spec.t_max}")
    if spec.n_points < 3 or spec.n_points % 2 == 0:
        raise ConfigError(f"--n-points must be odd and >= 3 (t = 0 is the middle one), received {spec.n_points}")
    if spec.spectrum.s or spec.spectrum.trace_samples or spec.spectrum.density_probes:
        raise ConfigError("perturb uses the top-k eigenvectors only: no s, trace or density")
    data = load_dataset_from_config(spec.data)
    trained = None if spec.checkpoint is None else check_checkpoint(spec.checkpoint, spec.data, data)
    module = check_model(data, spec.model) if trained is None else trained.module
    n_curv = count_params(module, spec.weights_only)
    used = replace(spec.spectrum, seed=spec.train.seed)
    extra: dict[str, Any] = {"trained": trained, "spectrum": used, "vectors": None}
    config: dict[str, Any] = {"dataset": data.summary()}
    if spec.vectors is not None:
        if trained is None:
            raise ConfigError("--vectors needs the --checkpoint of the model they were computed at")
        file, key, arrays = read_vectors(spec.vectors)
        mine = {"weights_only": spec.weights_only, "use_test": spec.use_test, "matrix": spec.spectrum.matrix,
                "reduction": spec.spectrum.reduction}
        differ = [f"--{k.replace('_', '-')} {v!r} (the vectors': {key.get(k)!r})" for k, v in mine.items()
                  if key.get(k) != v]
        if differ:
            raise ConfigError(f"--vectors {file} were computed with other settings: {'; '.join(differ)}; pass theirs")
        if key.get("parameters_sha256") != parameters_fingerprint(curvature_model(module, spec.weights_only)):
            raise ConfigError(f"--vectors {file} were computed at another model than --checkpoint {spec.checkpoint} "
                              "(the parameters differ); pass the checkpoint the spectrum run used")
        k = arrays["eigenvectors"].shape[1]
        extra["vectors"] = arrays
        config["vectors"] = {"file": str(file.resolve()), "k": k, **key}
    else:
        check_k(spec.spectrum.k, module, spec.weights_only)
        k = spec.spectrum.k
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
    from modelsense.curvature.operators import CurvatureConfig, build_curvature
    from modelsense.curvature.perturbation import (
        complement_directions,
        directional_curvature,
        first_crossing,
        interpolate,
        random_directions,
        scan_directions,
        symmetric_rise,
    )

    data, used, trained, stored = (prepared.data, prepared.extra["spectrum"], prepared.extra["trained"],
                                   prepared.extra["vectors"])
    got = obtain_model(data, spec.model, spec.train, trained=trained, run=run, progress=progress)
    model = curvature_model(got.module.eval(), spec.weights_only)
    x, y = curvature_data(data, spec.use_test)
    if stored is None:
        run.log(f"top {used.k} eigenvectors of the {used.matrix} ({used.reduction} loss) over {len(x)} examples")
        spectrum = compute_spectrum(model, x, y, replace(used, s=resolve_s((), used.reduction, len(x))),
                                    progress=progress)
        V, lam = spectrum.eigenvectors, spectrum.eigenvalues.double()
    else:
        V = torch.as_tensor(stored["eigenvectors"])
        lam = torch.as_tensor(stored["eigenvalues"], dtype=torch.float64)
    dtype = next(iter(model.params.values())).dtype
    V = V.to(dtype)
    gen = torch.Generator().manual_seed(spec.direction_seed)
    parts = [V[:, : spec.n_top]]
    if spec.n_bottom:
        parts.append(complement_directions(V, spec.n_bottom, gen))
    parts.append(random_directions(model.n_params, spec.n_random, gen, dtype))
    D = torch.cat(parts, dim=1)
    kinds = ["top"] * spec.n_top + ["bottom"] * spec.n_bottom + ["random"] * spec.n_random
    names = ([f"v{i + 1}" for i in range(spec.n_top)] + [f"bottom {j + 1}" for j in range(spec.n_bottom)]
             + [f"random {j + 1}" for j in range(spec.n_random)])
    K = build_curvature(model, x, y, CurvatureConfig(matrix=used.matrix, structure="implicit",
                                                     reduction=used.reduction, chunk_size=used.chunk_size))
    curvature = directional_curvature(K, D).double()
    t = torch.linspace(-spec.t_max, spec.t_max, spec.n_points, dtype=torch.float64)
    start = time.perf_counter()
    run.log(f"loss along {len(names)} directions at {spec.n_points} values of t in [-{spec.t_max:g}, {spec.t_max:g}]")
    scans = {"train": scan_directions(model, D, t, data.x_train, data.y_train),
             "test": scan_directions(model, D, t, data.x_test, data.y_test)}
    seconds = time.perf_counter() - start
    arrays = {"t": t, "names": np.array(names), "kinds": np.array(kinds), "curvature": curvature,
              "eigenvalues": lam}
    for split, scan in scans.items():
        arrays.update({f"{split}_loss": scan.loss, f"{split}_accuracy": scan.accuracy,
                       f"{split}_agreement": scan.agreement})
    run.save_arrays("perturb", **arrays)

    # the loss rise r(t) = (L(t) + L(-t))/2 - L(0), relative to L(0), on the training set
    loss0 = float(scans["train"].loss[0, spec.n_points // 2])
    pos, rise = symmetric_rise(t, scans["train"].loss)
    rise = rise / loss0
    t_double = first_crossing(pos, rise[0], 1.0) if spec.n_top else None

    def by_kind(values: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"top": [float(v) for v in values[: spec.n_top]]}
        for kind in ("bottom", "random"):
            sel = [i for i, k in enumerate(kinds) if k == kind]
            out[kind] = float(values[sel].mean()) if sel else None
        return out

    at_double = None if t_double is None else by_kind(interpolate(pos, rise, t_double))
    final = got.fit.final
    metrics = {
        "names": names, "kinds": kinds, "t_max": spec.t_max, "n_points": spec.n_points,
        "n_params": model.n_params, "matrix": used.matrix, "reduction": used.reduction, "use_test": spec.use_test,
        "weights_only": spec.weights_only, "k": int(V.shape[1]), "eigenvalues": [float(v) for v in lam],
        "curvature": [float(c) for c in curvature], "curvature_by_kind": by_kind(curvature),
        "train_loss_at_0": loss0, "test_loss_at_0": float(scans["test"].loss[0, spec.n_points // 2]),
        "t_double": t_double, "rise_at_t_double": at_double, "rise_at_t_max": by_kind(rise[:, -1]),
        "vectors": "computed" if stored is None else "read",
        **{k: final[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")},
        "seconds": seconds,
    }
    as_np = {split: {"loss": scan.loss.numpy(), "accuracy": scan.accuracy.numpy(), "agreement": scan.agreement.numpy()}
             for split, scan in scans.items()}
    title = (f"{got.model.name} on {data.name}: loss along θ + t·d ({used.matrix} eigenvectors v_i warm colours, "
             "low-curvature blue/purple, random grey/green)")
    run.save_figure(plots.perturbation_figure(t.numpy(), names, kinds, as_np["train"], as_np["test"], title), "perturb")
    return metrics


def perturb_summary(m: dict[str, Any]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.3g}%"

    def num(v):
        return "n/a" if v is None else f"{v:.3g}"

    curv = m["curvature_by_kind"]
    lines = [f"train loss at θ: {m['train_loss_at_0']:.4g}; curvature dᵀKd ({m['matrix']}, {m['reduction']} loss): "
             f"top {', '.join(num(c) for c in curv['top'])}; bottom {num(curv['bottom'])} (mean); random "
             f"{num(curv['random'])} (mean)"]
    if m["t_double"] is None:
        lines.append("the top direction does not double the train loss within --t-max")
    for label, at, rises in (("t_double", m["t_double"], m["rise_at_t_double"]),
                             ("t_max", m["t_max"], m["rise_at_t_max"])):
        if at is not None and rises is not None:
            lines.append(f"rise of the train loss ((L(t) + L(-t))/2 - L(0)) / L(0) at t = {at:.3g} ({label}): top "
                         f"{', '.join(pct(v) for v in rises['top'])}; bottom {pct(rises['bottom'])}; random "
                         f"{pct(rises['random'])} (means)")
    return "\n".join(lines)


PERTURB = Command("perturb", PerturbSpec, check_perturb, run_perturb, summary=perturb_summary,
                  hide=frozenset({"spectrum.s", "spectrum.trace_samples", "spectrum.density_probes",
                                  "spectrum.density_steps"}),
                  help="The loss along θ + t·d for the top Hessian eigenvectors, low-curvature and random directions "
                       "(train/test loss, accuracy, prediction agreement against t): the loss-surface perturbations "
                       "of Maddox et al. 2020. Eigenvectors computed here or read from `spectrum --save-vectors` "
                       "(--vectors, with its --checkpoint).")


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
    change (N_eff is recomputed from the saved eigenvalues).
    `spectrum` gives k and how the eigenvalues are computed; its s, trace and density are unused.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", corruption_ratio=0.2, standardize=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=400,
                                                                   bs=128, delta=0.0))
    widths: tuple[int, ...] = option(PROTOTYPE_WIDTHS, "comma-separated widths to train", parse=ints, show=joined)
    hidden_layers: int = option(1, "mlp: number of hidden layers, all of the width")
    spectrum: SpectrumConfig = field(default_factory=lambda: SpectrumConfig(k=50))
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)
    use_test: bool = option(False, USE_TEST_HELP)
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
        raise ConfigError(
            f"width-sweep varies the width of {', '.join(SWEEP_MODELS)}; received --model {spec.model.name!r}"
        )
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
    s = resolve_s(spec.s, spec.spectrum.reduction, curvature_examples(data, spec.use_test))
    # what every width shares, which a resumed sweep must keep (the device aside: a crashed run may resume elsewhere)
    sweep = {
        "data": asdict(spec.data),
        "model": asdict(spec.model),
        "train": {k: v for k, v in asdict(spec.train).items() if k != "device"},
        "hidden_layers": spec.hidden_layers,
        "spectrum": asdict(spec.spectrum),
        "weights_only": spec.weights_only,
        "use_test": spec.use_test,
    }
    return Prepared(data, {"dataset": data.summary(), "s": list(s), "sweep": sweep}, {"s": s})


def width_result_path(root: str | Path, width: int) -> Path:
    """The result file of width `width` in the sweep folder `root`: widths/width_<width>.json."""
    return Path(root) / "widths" / f"width_{int(width)}.json"


@dataclass(frozen=True)
class SweepModel:
    """One model of a sweep: where its result goes (a JSON file; the resumable state), its
    architecture and seed, what identifies it in the result (`labels`, e.g. {"width": 8}), and where
    its weights go when kept."""

    path: Path
    config: ModelConfig
    seed: int
    labels: dict[str, int]
    weights: Path

    @property
    def name(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.labels.items())


def train_missing(run: RunDir, data: Dataset, models: list[SweepModel], train_cfg: TrainConfig,
                  spectrum: SpectrumConfig, weights_only: bool, use_test: bool, s: float, save_models: bool, noun: str,
                  progress: bool) -> int:
    """Train and measure (`train_and_measure`) every model without a stored result, writing each result
    as soon as it is done (a damaged one is trained again); returns the number trained."""
    for m in models:  # stored state is checked first: a damaged result is trained again
        if m.path.exists():
            try:
                read_json(m.path)
            except ConfigError as err:
                m.path.unlink()
                run.log(f"{m.name}: its stored result was damaged ({err}); training it again")
    todo = [m for m in models if not m.path.exists()]
    if len(todo) < len(models):
        run.log(f"resume: {len(models) - len(todo)} {noun} finished, {len(todo)} to train")
    # a few evaluations per model (progress and learning curves) instead of one per epoch
    cfg = replace(train_cfg, eval_every=max(1, train_cfg.epochs // 20))
    with progress_bar(len(todo) * cfg.epochs, noun, enabled=progress) as bar:
        for m in todo:
            done = [0]

            def on_epoch(epoch: int, row: dict[str, float], m: SweepModel = m, done: list[int] = done) -> None:
                bar.advance(epoch - done[0], description=m.name, loss=row["train_loss"])
                done[0] = epoch

            module, result = train_and_measure(data, replace(cfg, seed=m.seed), m.config, spectrum, weights_only,
                                               use_test, on_epoch)
            result = {**m.labels, **result}
            bar.advance(cfg.epochs - done[0])
            if save_models:
                save_model(m.weights, module, m.config, data, m.seed)
            write_json(m.path, result)
            neff = effective_dimension(torch.tensor(result["eigenvalues"]), s,
                                       converged=torch.tensor(result["eigenvalues_converged"]))
            run.log(f"{m.name}: {result['n_params']} params, train loss {result['train_loss']:.4g}, "
                    f"test loss {result['test_loss']:.4g}, N_eff {neff:.4g}")
            bar.set_info(**{k: v for k, v in m.labels.items()}, test_loss=result["test_loss"], N_eff=neff)
    return len(todo)


def run_width_sweep(spec: WidthSweepSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train every width not finished in the run, then summarise all of them (see the module docstring)."""
    from modelsense.curvature import plots
    from modelsense.curvature.effdim import width_sweep_summary

    data, s = prepared.data, prepared.extra["s"]
    (run.path / "widths").mkdir(exist_ok=True)
    models = [SweepModel(width_result_path(run.path, w), spec.model_config(w), spec.train.seed, {"width": w},
                    run.path / "widths" / f"model_{w}.pt") for w in spec.widths]
    start = time.perf_counter()
    n_trained = train_missing(run, data, models, spec.train, spec.spectrum, spec.weights_only, spec.use_test, s[0],
                              spec.save_models, "widths", progress)
    summary = width_sweep_summary([read_json(m.path) for m in models], s, spec.train_loss_threshold)
    run.save_arrays("width_sweep", **{k: np.asarray(summary[k], dtype=float) for k in
                                      ("widths", "n_params", "train_loss", "test_loss", "test_error",
                                       "effective_dimension")})
    name = spec.model.name if spec.model.name != "mlp" else f"{spec.hidden_layers}-hidden-layer MLP"
    run.save_figure(plots.width_sweep_figure(summary, f"{name} on {data.name} (label noise "
                                                      f"{spec.data.corruption_ratio:g})"), "width_sweep")
    return {**summary, "matrix": spec.spectrum.matrix, "reduction": spec.spectrum.reduction, "n_train": data.n_train,
            "use_test": spec.use_test, "weights_only": spec.weights_only, "n_trained": n_trained,
            "seconds": time.perf_counter() - start}


def width_sweep_summary_lines(m: dict[str, Any]) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    lines = [f"{'width':>6} {'params':>8} {'train loss':>10} {'test loss':>9} {'test err':>8} {'N_eff':>7}"]
    lines += [f"{w:>6} {m['n_params'][i]:>8} {m['train_loss'][i]:>10.4g} {m['test_loss'][i]:>9.4g} "
              f"{m['test_error'][i]:>8.3f} {m['effective_dimension'][i]:>7.3g}" for i, w in enumerate(m["widths"])]
    lines.append(
        f"Spearman with test loss, {m['n_interpolating']} models with train loss < {m['train_loss_threshold']:g}: "
        f"N_eff {fmt(m['spearman_effdim_test_loss'])}, params {fmt(m['spearman_params_test_loss'])}; "
        f"all {len(m['widths'])}: N_eff {fmt(m['spearman_effdim_test_loss_all'])}, "
        f"params {fmt(m['spearman_params_test_loss_all'])}"
    )
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


# -- modelsense effdim grid ----------------------------------------------------------------------
#: Models with a width and a depth: mlp (depth hidden layers of the width) and cnn (`width`, `depth`).
GRID_MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class GridSpec:
    """`modelsense effdim grid`: models over a width x depth grid (mlp: `depth` hidden layers of the
    width, depth >= 1; cnn: its `width` c and `depth`, depth >= 0), `repeats` seeds per cell, the top-k
    spectrum of each; heatmaps of N_eff, test and train loss (Maddox et al. 2020, Fig. 2: ConvNetDepth on
    CIFAR-100, depths 0..8, widths 4..64) and their profiles along width and depth (the two-spirals
    figure). Defaults as `effdim width-sweep`: the prototype's data and training on digits.

    Resumable per model (cells/depth_<d>_width_<w>_seed_<s>.json): what every model shares (config.json's
    `grid`: data, model, train but the device and seed, spectrum, weights_only, use_test) a resumed grid
    must keep; widths, depths, repeats, s, the threshold and save_models may change.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", corruption_ratio=0.2, standardize=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adam", lr=3e-3, lrmin=3e-3, epochs=400,
                                                                   bs=128, delta=0.0))
    widths: tuple[int, ...] = option((4, 8, 16, 32, 64), "comma-separated widths", parse=ints, show=joined)
    depths: tuple[int, ...] = option((1, 2, 3), "comma-separated depths (mlp: hidden layers >= 1; cnn: blocks "
                                                "after the stem >= 0)", parse=ints, show=joined)
    repeats: int = option(1, "models per cell, seeds --seed, --seed + 1, ...: the figures show mean ± 2 std")
    spectrum: SpectrumConfig = field(default_factory=lambda: SpectrumConfig(k=50))
    weights_only: bool = option(False, WEIGHTS_ONLY_HELP)
    use_test: bool = option(False, USE_TEST_HELP)
    s: tuple[float, ...] = option((), S_HELP, parse=floats, show=joined)
    train_loss_threshold: float = option(0.01, "cells with a mean final train NLL below it count as interpolating "
                                               "(the Spearman correlations)")
    save_models: bool = option(False, "keep each trained model as cells/model_depth_<d>_width_<w>_seed_<s>.pt")

    def model_config(self, width: int, depth: int) -> ModelConfig:
        if self.model.name == "mlp":
            return replace(self.model, widths=(width,) * depth)
        return replace(self.model, width=width, depth=depth)

    def models(self, root: Path) -> list[SweepModel]:
        out = []
        for d in self.depths:
            for w in self.widths:
                for r in range(self.repeats):
                    seed = self.train.seed + r
                    stem = f"depth_{d}_width_{w}_seed_{seed}"
                    out.append(SweepModel(root / "cells" / f"{stem}.json", self.model_config(w, d), seed,
                                     {"depth": d, "width": w, "seed": seed}, root / "cells" / f"model_{stem}.pt"))
        return out


def _check_values(values: tuple[int, ...], flag: str, minimum: int, example: str) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in values):
        raise ConfigError(f"{flag} must be integers >= {minimum}, e.g. {example}; received {list(values)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} must be distinct, received {list(values)}")


def check_grid(spec: GridSpec) -> Prepared:
    if spec.model.name not in GRID_MODELS:
        raise ConfigError(f"effdim grid varies the width and depth of {', '.join(GRID_MODELS)}; received --model "
                          f"{spec.model.name!r}")
    _check_values(tuple(spec.widths), "--widths", 1, "4,8,16")
    _check_values(tuple(spec.depths), "--depths", 1 if spec.model.name == "mlp" else 0,
                  "1,2,3" if spec.model.name == "mlp" else "0,1,2")
    if spec.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, received {spec.repeats}")
    if spec.spectrum.s or spec.spectrum.trace_samples or spec.spectrum.density_probes:
        raise ConfigError("effdim grid computes the top-k eigenvalues only: give s as GridSpec.s, and no trace or "
                          "density")
    if not spec.train_loss_threshold > 0:
        raise ConfigError(f"--train-loss-threshold must be > 0, received {spec.train_loss_threshold}")
    data = load_dataset_from_config(spec.data)
    for d in spec.depths:  # the model options of every cell
        for w in spec.widths:
            check_model(data, spec.model_config(w, d))
    s = resolve_s(spec.s, spec.spectrum.reduction, curvature_examples(data, spec.use_test))
    grid = {"data": asdict(spec.data), "model": asdict(spec.model),
            "train": {k: v for k, v in asdict(spec.train).items() if k not in ("device", "seed")},
            "spectrum": asdict(spec.spectrum), "weights_only": spec.weights_only, "use_test": spec.use_test}
    return Prepared(data, {"dataset": data.summary(), "s": list(s), "grid": grid}, {"s": s})


def run_grid(spec: GridSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train every cell (and seed) not finished in the run, then summarise the grid (see GridSpec)."""
    from modelsense.curvature import plots
    from modelsense.curvature.effdim import grid_summary

    data, s = prepared.data, prepared.extra["s"]
    (run.path / "cells").mkdir(exist_ok=True)
    models = spec.models(run.path)
    start = time.perf_counter()
    n_trained = train_missing(run, data, models, spec.train, spec.spectrum, spec.weights_only, spec.use_test, s[0],
                              spec.save_models, "grid models", progress)
    summary = grid_summary([read_json(m.path) for m in models], spec.widths, spec.depths, s, spec.train_loss_threshold)
    run.save_arrays("grid", **{k: np.asarray(summary[k], dtype=float) for k in
                               ("widths", "depths", "n_params", "train_loss", "test_loss", "test_error",
                                "effective_dimension", "train_loss_std", "test_loss_std", "effective_dimension_std")})
    name = "MLP" if spec.model.name == "mlp" else spec.model.name
    title = f"{name} on {data.name} (label noise {spec.data.corruption_ratio:g}, {spec.repeats} seed(s) per cell)"
    run.save_figure(plots.grid_figure(summary, title), "grid")
    run.save_figure(plots.grid_profiles_figure(summary, title), "grid_profiles")
    return {**summary, "model": spec.model.name, "matrix": spec.spectrum.matrix, "reduction": spec.spectrum.reduction,
            "n_train": data.n_train, "use_test": spec.use_test, "weights_only": spec.weights_only,
            "n_trained": n_trained, "seconds": time.perf_counter() - start}


def grid_summary_lines(m: dict[str, Any]) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    lines = [f"{'depth':>5} {'width':>6} {'params':>8} {'train loss':>10} {'test loss':>9} {'N_eff':>7}"]
    for i, d in enumerate(m["depths"]):
        for j, w in enumerate(m["widths"]):
            lines.append(f"{d:>5} {w:>6} {m['n_params'][i][j]:>8} {m['train_loss'][i][j]:>10.4g} "
                         f"{m['test_loss'][i][j]:>9.4g} {m['effective_dimension'][i][j]:>7.3g}")
    lines.append(f"Spearman with test loss, {m['n_interpolating']} cells with train loss < "
                 f"{m['train_loss_threshold']:g}: "
                 f"N_eff {fmt(m['spearman_effdim_test_loss'])}, params {fmt(m['spearman_params_test_loss'])}; "
                 f"all {len(m['depths']) * len(m['widths'])}: N_eff {fmt(m['spearman_effdim_test_loss_all'])}, "
                 f"params {fmt(m['spearman_params_test_loss_all'])}")
    return "\n".join(lines)


GRID = Command(
    "effdim grid", GridSpec, check_grid, run_grid, summary=grid_summary_lines, keep=("cells",), resume_keys=("grid",),
    hide=frozenset({"model.widths", "model.width", "model.depth", "spectrum.s", "spectrum.trace_samples",
                    "spectrum.density_probes", "spectrum.density_steps"}),
    help="Models over a width x depth grid (mlp: depth hidden layers of the width; cnn: width and depth), "
         "--repeats seeds per cell: heatmaps of N_eff, test and train loss, and their profiles along width and depth. "
         "Defaults as width-sweep (digits with 20% label noise, Adam at 3e-3, 400 epochs); resumable per model.")


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
        raise ConfigError(
            f"need --n-points >= 1 and --n-frequencies >= 1, received {spec.n_points}, {spec.n_frequencies}"
        )
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
    """Demo: top-20 Hessian spectrum, trace, density and N_eff of a digits MLP; the loss along its top
    eigenvectors against random directions; the BLR contraction."""
    from modelsense.experiments.report import Section

    root = Path(out) / "curvature"
    spectrum = SpectrumSpec(train=TrainConfig(epochs=20), save_vectors=True, spectrum=SpectrumConfig(
        k=20, s=(DEFAULT_S_SUM, 1297.0), trace_samples=30, density_probes=3, density_steps=40, lanczos_tol=1e-4))
    spec = (resume and finished_metrics(root / "spectrum")) or execute(SPECTRUM, spectrum, root / "spectrum",
                                                                        overwrite=True, progress=progress)
    perturb = PerturbSpec(train=spectrum.train, checkpoint=str(root / "spectrum" / "model.pt"),
                          vectors=str(root / "spectrum"))
    pert = (resume and finished_metrics(root / "perturb")) or execute(PERTURB, perturb, root / "perturb",
                                                                       overwrite=True, progress=progress)
    blr = (resume and finished_metrics(root / "blr")) or execute(BLR, BLRSpec(), root / "blr", overwrite=True,
                                                                 progress=progress)
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


__all__ = ["BLR", "GRID", "GRID_MODELS", "PERTURB", "SPECTRUM", "SWEEP_MODELS", "WIDTH_SWEEP", "BLRSpec", "GridSpec",
           "PerturbSpec", "SpectrumSpec", "WidthSweepSpec", "curvature_section", "describe_cost",
           "width_result_path"]
