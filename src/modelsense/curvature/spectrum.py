"""One call for the spectrum summary the `spectrum` and `effdim` commands report.

    compute_spectrum(model, x, y, SpectrumConfig(k=20, s=1.0)) -> Spectrum

top-k eigenvalues (Lanczos), Hutchinson trace with its standard error, SLQ spectral density and
N_eff(s) of the chosen matrix (default: the Hessian of the loss summed over (x, y)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from modelsense.core.functional import FunctionalModel, Params
from modelsense.curvature.effdim import effective_dimension
from modelsense.curvature.lanczos import SpectralDensity, TraceEstimate, hutchinson_trace, spectral_density
from modelsense.curvature.operators import CurvatureConfig, build_curvature
from modelsense.errors import ConfigError


@dataclass(frozen=True)
class SpectrumConfig:
    """k: eigenvalues; s: N_eff regulariser(s) (scale with `reduction`: see effdim.py);
    trace_samples: Hutchinson probes (0 skips); density_probes / density_steps: SLQ (0 skips)."""

    k: int = 20
    matrix: str = "hessian"
    reduction: str = "sum"
    s: tuple[float, ...] = (1.0,)
    trace_samples: int = 100
    density_probes: int = 5
    density_steps: int = 60
    lanczos_tol: float = 1e-5
    lanczos_max_steps: int | None = None
    chunk_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or not self.s or any(v <= 0 for v in self.s):
            raise ConfigError(f"need k >= 1 and every s > 0, received k={self.k}, s={self.s}")
        if self.trace_samples == 1 or self.trace_samples < 0:
            raise ConfigError(f"trace_samples must be 0 (skip) or >= 2, received {self.trace_samples}")


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

    def to_metrics(self) -> dict:
        """JSON-ready summary: eigenvalues, trace (+ standard error), effective_dimension, n_params."""
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
        }


def compute_spectrum(
    model: FunctionalModel, x: Tensor, y: Tensor, config: SpectrumConfig | None = None, params: Params | None = None
) -> Spectrum:
    """Top-k eigenvalues, trace, density and N_eff of `config.matrix` over (x, y) at `params`."""
    config = config or SpectrumConfig()
    K = build_curvature(
        model, x, y,
        CurvatureConfig(matrix=config.matrix, structure="implicit", reduction=config.reduction,
                        chunk_size=config.chunk_size, seed=config.seed),
        params=params,
    )
    eig = K.eigen(config.k, tol=config.lanczos_tol, max_steps=config.lanczos_max_steps)
    neff = {s: effective_dimension(eig.eigenvalues, s, converged=eig.converged) for s in config.s}
    gen = torch.Generator().manual_seed(config.seed + 1)
    trace = hutchinson_trace(K, config.trace_samples, generator=gen) if config.trace_samples else None
    density = (
        spectral_density(K, config.density_probes, config.density_steps, generator=gen)
        if config.density_probes and config.density_steps else None
    )
    return Spectrum(eig.eigenvalues, eig.converged, eig.residuals, K.n_params, neff, trace, density, K.num_matvecs, config)
