"""Curvature: the top of the Hessian spectrum, its trace, and the effective dimensionality N_eff."""

import torch

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import SpectrumConfig, compute_spectrum, dense_hessian, effective_dimension, laplace
from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig, fit

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:spectrum]
data = load_dataset("digits", n_train=300, seed=0)
model = build_model("mlp", data.input_shape, data.num_classes, widths=(16,), seed=0)
fit(model, data, TrainConfig(lr=0.1, epochs=20, bs=64, delta=1.0, seed=0), progress=False)

config = SpectrumConfig(k=10, s=(100.0,), trace_samples=50)  # Hessian of the loss summed over the 300 examples
spectrum = compute_spectrum(FunctionalModel(model), data.x_train, data.y_train, config)
print("top eigenvalues", [round(float(v), 2) for v in spectrum.eigenvalues[:5]])
print(f"trace {spectrum.trace.estimate:.1f} +- {spectrum.trace.standard_error:.1f}, "
      f"N_eff(s=100) {spectrum.effective_dimension[100.0]:.2f} of {spectrum.n_params} parameters")
# --8<-- [end:spectrum]

# --8<-- [start:exact]
# at this size the dense Hessian fits in memory: Lanczos against the exact eigenvalues
H = dense_hessian(FunctionalModel(model), data.x_train, data.y_train)
exact = torch.linalg.eigvalsh(H.double()).flip(0)
print(f"largest |Lanczos - exact| over the top 10: {(spectrum.eigenvalues.double() - exact[:10]).abs().max():.2e}")
print(f"trace exact {float(exact.sum()):.1f}; N_eff over all eigenvalues {effective_dimension(exact, 100.0):.2f}")
# --8<-- [end:exact]

# --8<-- [start:posterior]
# a Laplace posterior: precision GGN + delta I in K-FAC form; predictive covariance J S J^T per example
posterior = laplace(FunctionalModel(model), data.x_train, data.y_train, structure="kfac", prior_precision=1.0)
V = posterior.predictive_covariance(data.x_test[:4])
print(
    "predictive covariance",
    tuple(V.shape),
    "variances of example 0:",
    [round(float(v), 3) for v in V[0].diagonal()[:3]],
)
# --8<-- [end:posterior]

assert (spectrum.eigenvalues.double() - exact[:10]).abs().max() < 1e-3 * exact[0]
assert spectrum.effective_dimension[100.0] <= effective_dimension(exact, 100.0)
