"""Curvature, posteriors and effective dimensionality.

    build_curvature(model, x, y, CurvatureConfig(matrix, structure, ...)) -> Curvature
    laplace / ivon_posterior / adam_posterior -> GaussianPosterior
    top_eigenpairs, hutchinson_trace, spectral_density   (any Curvature or matvec)
    effective_dimension, blr_posterior_contraction
    compute_spectrum(model, x, y, SpectrumConfig(k, s, ...)) -> Spectrum (eigenvalues, N_eff; trace, density on request)
"""

from modelsense.curvature.dense import dense_empirical_fisher, dense_ggn, dense_hessian, dense_matrix
from modelsense.curvature.effdim import (
    BLRContraction,
    blr_posterior_contraction,
    effdim_scale,
    effective_dimension,
    fourier_features,
)
from modelsense.curvature.kfac import KroneckerCurvature
from modelsense.curvature.lanczos import (
    EigenDecomposition,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    top_eigenpairs,
)
from modelsense.curvature.operators import (
    MATRICES,
    STRUCTURES,
    Curvature,
    CurvatureConfig,
    DenseCurvature,
    DiagonalCurvature,
    ImplicitCurvature,
    LowRankCurvature,
    build_curvature,
)
from modelsense.curvature.posterior import (
    GaussianPosterior,
    LaplacePosterior,
    adam_posterior,
    ivon_posterior,
    laplace,
)
from modelsense.curvature.spectrum import (
    DEFAULT_S_SUM,
    Spectrum,
    SpectrumConfig,
    compute_spectrum,
    module_spectra,
    resolve_s,
)

__all__ = [
    "MATRICES", "STRUCTURES", "BLRContraction", "Curvature", "CurvatureConfig", "DenseCurvature",
    "DiagonalCurvature", "EigenDecomposition", "GaussianPosterior", "ImplicitCurvature",
    "KroneckerCurvature", "LaplacePosterior", "LowRankCurvature", "SpectralDensity", "TraceEstimate",
    "adam_posterior", "blr_posterior_contraction", "build_curvature", "dense_empirical_fisher",
    "dense_ggn", "dense_hessian", "dense_matrix", "effdim_scale", "effective_dimension",
    "fourier_features", "hutchinson_trace", "hutchpp_trace", "ivon_posterior", "laplace", "spectral_density",
    "top_eigenpairs", "DEFAULT_S_SUM", "Spectrum", "SpectrumConfig", "compute_spectrum", "module_spectra", "resolve_s",
]
