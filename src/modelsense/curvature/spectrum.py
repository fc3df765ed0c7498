"""One call for the spectrum summary the `spectrum` and `effdim` commands report.

    compute_spectrum(model, x, y, SpectrumConfig(k=20)) -> Spectrum

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
from typing import TypeVar

import torch
from torch import Tensor

from modelsense.core.functional import FunctionalModel, Params
from modelsense.curvature.effdim import effective_dimension
from modelsense.curvature.lanczos import SpectralDensity, TraceEstimate, hutchinson_trace, spectral_density
from modelsense.curvature.operators import CurvatureConfig, build_curvature
from modelsense.errors import ConfigError


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

    k: int = 20
    matrix: str = "hessian"
    reduction: str = "sum"
    s: tuple[float, ...] = ()
    trace_samples: int = 0
    density_probes: int = 0
    density_steps: int = 60
    lanczos_tol: float = 1e-5
    lanczos_max_steps: int | None = None
    chunk_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or any(not v > 0 for v in self.s):
            raise ConfigError(f"need k >= 1 and every s > 0, received k={self.k}, s={self.s}")
        if self.trace_samples == 1 or self.trace_samples < 0:
            raise ConfigError(f"trace_samples must be 0 (skip) or >= 2, received {self.trace_samples}")
        if self.density_probes < 0 or self.density_steps < 1:
            raise ConfigError(f"density_probes must be >= 0 (0 skips) and density_steps >= 1, received "
                              f"{self.density_probes}, {self.density_steps}")


@dataclass(frozen=True)
class Spectrum:
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


T = TypeVar("T")


def compute_spectrum(
    model: FunctionalModel, x: Tensor, y: Tensor, config: SpectrumConfig | None = None, params: Params | None = None,
    *, progress: bool = False,
) -> Spectrum:
    """Top-k eigenvalues and N_eff (and, if asked, trace and density) of `config.matrix` over (x, y).

    The returned config has s resolved (the default when empty, with N = len(x)); `cost` holds the
    matrix-vector products and seconds of each part. `progress`: a bar per Lanczos step, per
    Hutchinson probe, per SLQ probe.
    """
    config = config or SpectrumConfig()
    config = dataclasses.replace(config, s=resolve_s(config.s, config.reduction, len(x)))
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
                    config, cost)
