"""One call for the spectrum summary the `spectrum` and `effdim` commands report.

    compute_spectrum(model, x, y, SpectrumConfig(k=20)) -> Spectrum
    module_spectra(model, x, y, SpectrumConfig(k=20)) -> {module name: Spectrum}

top-k eigenvalues (Lanczos) and N_eff(s) of the chosen matrix (default: the Hessian of the loss
summed over (x, y)); on request (they cost far more than the eigenvalues) the Hutchinson trace with
its standard error and the SLQ spectral density. `Spectrum.cost` says what each part cost, in
matrix-vector products and seconds.

Default s (`DEFAULT_S_SUM` = 100, declared here only; the commands read it): the eigenvalues of the
summed-loss matrix grow with N, and with s = 1 every top eigenvalue of a digits MLP is far above s,
so N_eff saturates at k. s = 100 (≈ 0.08 N on digits) is the value at which the prototype saw the
double-descent behaviour; with `reduction="mean"` the default is 100 / N, the same regularisation
(N_eff(H_sum, s) = N_eff(H_mean, s / N)).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel, Params
from modelsense.curvature._common import resolve_data
from modelsense.curvature.effdim import effective_dimension
from modelsense.curvature.lanczos import SpectralDensity, TraceEstimate, hutchinson_trace, spectral_density
from modelsense.curvature.operators import MATRICES, REDUCTIONS, CurvatureConfig, build_curvature
from modelsense.errors import ConfigError
from modelsense.options import floats, joined, option

#: s of N_eff for the matrix of the summed loss; divided by N for the mean loss (module docstring).
DEFAULT_S_SUM = 100.0


def resolve_s(s: Sequence[float] | None, reduction: str, n_train: int) -> tuple[float, ...]:
    """The s values to use: as given (each finite and > 0), or the default: `DEFAULT_S_SUM` for
    `reduction="sum"`, `DEFAULT_S_SUM / n_train` for `"mean"`."""
    if s:
        values = tuple(float(v) for v in s)
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ConfigError(f"every s must be a finite number > 0, received {list(values)}")
        return values
    return (DEFAULT_S_SUM if reduction == "sum" else DEFAULT_S_SUM / n_train,)


#: the help text of s wherever a command takes it
S_HELP = (f"comma-separated N_eff regularisers s, on the scale of the matrix; the first is the headline (default "
          f"{DEFAULT_S_SUM:g} for --reduction sum, {DEFAULT_S_SUM:g}/N for mean)")


@dataclass(frozen=True)
class SpectrumConfig:
    """What `compute_spectrum` computes. The defaults are the `spectrum` command's.

    k: top eigenvalues (Lanczos: at most max(4k, k + 60) matrix-vector products).
    s: N_eff regulariser(s), on the scale of the matrix; empty (default): `DEFAULT_S_SUM` for the
        summed loss, `DEFAULT_S_SUM / N` for the mean (see the module docstring).
    trace_samples: Hutchinson probes, one product each (0, the default, skips the trace; else >= 2).
    density_probes / density_steps: SLQ probes of that many Lanczos steps, probes x steps products
        (0 probes, the default, skips the density).
    """

    k: int = option(20, "number of top eigenvalues (Lanczos with full reorthogonalisation)")
    matrix: str = option("hessian", "hessian, ggn (= Fisher for softmax) or ef (empirical Fisher)")
    reduction: str = option("sum", "the loss the matrix is of: sum (default) or mean over the training examples")
    s: tuple[float, ...] = option((), S_HELP, parse=floats, show=joined)
    trace_samples: int = option(0, "Hutchinson probes for the trace, one matrix-vector product each (0: no trace; "
                                   "e.g. 100)")
    density_probes: int = option(0, "probes of the SLQ spectral density, --density-steps products each (0: no "
                                    "density; e.g. 5)")
    density_steps: int = option(60, "Lanczos steps per SLQ probe")
    lanczos_tol: float = option(1e-5, "relative residual below which a Ritz value counts as converged")
    lanczos_max_steps: int | None = None
    chunk_size: int = option(2048, "examples per chunk of the matrix-vector products (memory bound)")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.matrix not in MATRICES:
            raise ConfigError(f"unknown matrix {self.matrix!r}; expected one of {', '.join(MATRICES)} (--matrix)")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {self.reduction!r}; expected one of {', '.join(REDUCTIONS)} "
                              "(--reduction)")
        if self.k < 1:
            raise ConfigError(f"--k must be >= 1, received {self.k}")
        if self.s:
            object.__setattr__(self, "s", resolve_s(self.s, self.reduction, 1))
        if self.trace_samples == 1 or self.trace_samples < 0:
            raise ConfigError(f"trace_samples must be 0 (skip) or >= 2, received {self.trace_samples}")
        if self.density_probes < 0 or self.density_steps < 1:
            raise ConfigError(f"density_probes must be >= 0 (0 skips) and density_steps >= 1, received "
                              f"{self.density_probes}, {self.density_steps}")


@dataclass(frozen=True)
class Spectrum:
    """The result of `compute_spectrum`: top-k eigenvalues, N_eff per s, and trace / density when asked."""

    eigenvalues: Tensor  # (k,) descending
    converged: Tensor  # (k,) bool
    residuals: Tensor  # (k,)
    n_params: int
    effective_dimension: dict[float, float]  # s -> N_eff over the converged top-k eigenvalues
    trace: TraceEstimate | None = None
    density: SpectralDensity | None = None
    num_matvecs: int = 0
    config: SpectrumConfig = field(default_factory=SpectrumConfig)
    #: part ("eigenvalues", "trace", "density"; those computed) -> {"matvecs": products, "seconds": wall time}
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    #: (P, k) the Ritz vectors of `eigenvalues` (orthonormal columns, in the order of `FunctionalModel.spec`)
    eigenvectors: Tensor | None = None

    def to_metrics(self) -> dict:
        """JSON-ready summary: eigenvalues, trace (+ standard error), effective_dimension, n_params, cost."""
        first = self.config.s[0]
        return {
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "eigenvalues_converged": [bool(c) for c in self.converged],
            "trace": None if self.trace is None else self.trace.estimate,
            "trace_standard_error": None if self.trace is None else self.trace.standard_error,
            "effective_dimension": self.effective_dimension[first],
            "effective_dimension_by_s": {str(s): v for s, v in self.effective_dimension.items()},
            "s": first,
            "n_params": self.n_params,
            "matrix": self.config.matrix,
            "reduction": self.config.reduction,
            "num_matvecs": self.num_matvecs,
            "cost": {part: dict(values) for part, values in self.cost.items()},
        }

    def arrays(self) -> dict[str, Any]:
        """eigenvalues, converged, residuals and, with a density, density_grid / density
        (`density_on_grid`), slq_nodes and slq_weights."""
        out: dict[str, Any] = {"eigenvalues": self.eigenvalues, "converged": self.converged,
                               "residuals": self.residuals}
        if self.density is not None:
            grid, dens = density_on_grid(self.density)
            out.update(density_grid=grid, density=dens, slq_nodes=self.density.nodes, slq_weights=self.density.weights)
        return out


#: what `module_metrics` keeps of each module's `Spectrum.to_metrics`
MODULE_KEYS = ("eigenvalues", "eigenvalues_converged", "trace", "trace_standard_error", "effective_dimension",
               "effective_dimension_by_s", "n_params", "num_matvecs")


def module_metrics(spectra: dict[str, Spectrum]) -> dict[str, dict[str, Any]]:
    """{module: its `Spectrum.to_metrics` restricted to `MODULE_KEYS`} for the result of `module_spectra`."""
    return {m: {k: v for k, v in sp.to_metrics().items() if k in MODULE_KEYS} for m, sp in spectra.items()}


def module_arrays(spectra: dict[str, Spectrum]) -> dict[str, Tensor]:
    """<module>: eigenvalues and <module>:converged of every module's spectrum (`module_spectra`)."""
    return {**{m: sp.eigenvalues for m, sp in spectra.items()},
            **{f"{m}:converged": sp.converged for m, sp in spectra.items()}}


T = TypeVar("T")


def weight_names(module: nn.Module) -> set[str]:
    """Names of the parameters with >= 2 dimensions (linear / conv weights)."""
    return {n for n, p in module.named_parameters() if p.ndim >= 2}


def curvature_model(module: nn.Module, weights_only: bool = False) -> FunctionalModel:
    """The categorical FunctionalModel of `module` over all its parameters, or over the weights only
    (`weights_only`: parameters with >= 2 dimensions, as Maddox et al. 2020; biases and
    normalisation parameters are then held fixed)."""
    if not weights_only:
        return FunctionalModel(module)
    names = weight_names(module)
    if not names:
        raise ConfigError("--weights-only: the model has no parameter with >= 2 dimensions")
    return FunctionalModel(module, trainable=names.__contains__)


def count_params(module: nn.Module, weights_only: bool = False) -> int:
    """Number of parameters of `module` (the weights only with `weights_only`)."""
    names = weight_names(module) if weights_only else None
    return sum(p.numel() for n, p in module.named_parameters() if names is None or n in names)


def check_k(k: int, module: nn.Module, weights_only: bool = False) -> int:
    """The number of parameters the matrix acts on; ConfigError when `k` exceeds it."""
    n_curv = count_params(module, weights_only)
    if k > n_curv:
        raise ConfigError(f"--k {k} is larger than the number of parameters the matrix acts on ({n_curv}"
                          f"{', weights only' if weights_only else ''}); pass --k <= {n_curv}")
    return n_curv


def density_on_grid(density: SpectralDensity, points: int = 800) -> tuple[np.ndarray, np.ndarray]:
    """The SLQ density on a grid spanning its weighted nodes (5% margin each side): (grid, density)."""
    nodes = density.nodes.double()
    weighted = nodes[density.weights > 0]
    lo, hi = float(weighted.min()), float(weighted.max())
    margin = 0.05 * max(hi - lo, 1e-12)
    grid = torch.linspace(lo - margin, hi + margin, points, dtype=torch.float64)
    return grid.numpy(), density.evaluate(grid).numpy()


def compute_spectrum(
    model: FunctionalModel, x: Tensor, y: Tensor | None = None, config: SpectrumConfig | None = None,
    params: Params | None = None, *, progress: bool = False,
) -> Spectrum:
    """Top-k eigenpairs and N_eff (and, if asked, trace and density) of `config.matrix` over (x, y)
    (tensors, or x a map-style Dataset / DataLoader with y None: every product reads it by chunks).

    The returned config has s resolved (the default when empty, with N = len(x)); `cost` holds the
    matrix-vector products and seconds of each part. `progress`: a bar per Lanczos step, per
    Hutchinson probe, per SLQ probe.
    """
    x, y = resolve_data(x, y)
    config = config or SpectrumConfig()
    config = dataclasses.replace(config, s=resolve_s(config.s, config.reduction, len(y)))
    K = build_curvature(
        model, x, y,
        CurvatureConfig(matrix=config.matrix, structure="implicit", reduction=config.reduction,
                        chunk_size=config.chunk_size, seed=config.seed),
        params=params,
    )
    cost: dict[str, dict[str, float]] = {}

    def measured(part: str, compute: Callable[[], T]) -> T:
        before, start = K.num_matvecs, time.perf_counter()
        result = compute()
        cost[part] = {"matvecs": K.num_matvecs - before, "seconds": time.perf_counter() - start}
        return result

    eig = measured("eigenvalues", lambda: K.eigen(config.k, tol=config.lanczos_tol, max_steps=config.lanczos_max_steps,
                                                  progress=progress))
    neff = {s: effective_dimension(eig.eigenvalues, s, converged=eig.converged) for s in config.s}
    gen = torch.Generator().manual_seed(config.seed + 1)
    trace = density = None
    if config.trace_samples:
        trace = measured("trace", lambda: hutchinson_trace(K, config.trace_samples, generator=gen, progress=progress))
    if config.density_probes:
        density = measured("density", lambda: spectral_density(K, config.density_probes, config.density_steps,
                                                               generator=gen, progress=progress))
    return Spectrum(eig.eigenvalues, eig.converged, eig.residuals, K.n_params, neff, trace, density, K.num_matvecs,
                    config, cost, eig.eigenvectors)


def module_model(model: FunctionalModel, module_name: str) -> FunctionalModel:
    """`model` with only the parameters of module `module_name` (`ParamSpec.modules`) trainable, the
    others held at their values: its curvature (Hessian, GGN or EF) is the diagonal block of `model`'s
    curvature on that module's parameters."""
    names = {n for n in model.spec.names if model.spec.module_of(n) == module_name}
    if not names:
        raise ConfigError(f"module {module_name!r} holds none of the parameters the matrix acts on; modules: "
                          f"{', '.join(model.spec.modules)}")
    return FunctionalModel(model.module, model.likelihood, trainable=names.__contains__)


def module_spectra(
    model: FunctionalModel, x: Tensor, y: Tensor, config: SpectrumConfig | None = None, *, progress: bool = False,
) -> dict[str, Spectrum]:
    """{module: the spectrum of the diagonal block K[m, m] of `config.matrix` over (x, y)}, for every
    module m of `model.spec.modules` (with P_m parameters: the top min(k, P_m) eigenvalues, N_eff of
    the block with the same s, trace and density as asked). Each block is a matrix of its own: its
    eigenvalues interlace nothing in particular with the whole matrix's, but Σ_m tr(K[m, m]) = tr(K).
    """
    config = config or SpectrumConfig()
    out = {}
    for name, idx in model.spec.modules.items():
        sub = module_model(model, name)
        k = min(config.k, len(idx))
        out[name] = compute_spectrum(sub, x, y, dataclasses.replace(config, k=k), progress=progress)
    return out


def describe_cost(cost: dict[str, dict[str, float]]) -> str:
    """One line: what each part of a spectrum run cost, e.g. "training 9.1 s, eigenvalues 50 products 4.2 s"."""
    parts = []
    for part, values in cost.items():
        products = f" {int(values['matvecs'])} products" if "matvecs" in values else ""
        parts.append(f"{part}{products} {values['seconds']:.1f} s")
    return ", ".join(parts)


def describe_spectrum(m: dict[str, Any]) -> str:
    """A few lines of `Spectrum.to_metrics()` `m` (optionally with use_test and n_examples, and by_module:
    `module_metrics`): the eigenvalues, trace, N_eff per s, the cost and what was not computed."""
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
