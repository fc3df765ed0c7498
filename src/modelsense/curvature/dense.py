"""Dense ground truth: the Hessian, GGN and empirical Fisher as explicit P x P matrices.

Computed the slow, obvious way with torch.func on small nets, over all examples given (loss
summed over them), to check the structured operators against:

    dense_hessian:           Σ_chunks jacrev(grad(θ ↦ Σ_i l_i(θ)))  (reverse-over-reverse: in torch
                             2.13 torch.func.hessian, i.e. jacfwd(jacrev), returned a wrong, asymmetric
                             Hessian for an MLP with nn.LayerNorm, while jvp-of-grad products were right)
    dense_ggn:               Σ_i J_iᵀ Λ_i J_i with J_i from vmap(jacrev), Λ_i = ∂²l_i/∂f_i² explicitly
    dense_empirical_fisher:  Σ_i g_i g_iᵀ with g_i from vmap(grad)
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelsense.core.functional import FunctionalModel, Params, n_rows
from modelsense.curvature._common import check_data, data_chunks
from modelsense.errors import ConfigError


def dense_hessian(
    model: FunctionalModel, x: Tensor, y: Tensor, params: Params | None = None, chunk_size: int = 256
) -> Tensor:
    """∂²(Σ_i l_i)/∂θ², shape (P, P)."""
    check_data(model, x, y)
    params = params if params is not None else model.params
    flat = model.spec.flatten(params)
    H = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    for xb, yb in data_chunks(x, y, chunk_size, params):
        H += torch.func.jacrev(
            torch.func.grad(lambda t, xb=xb, yb=yb: model.per_example_loss(model.spec.unflatten(t), xb, yb).sum())
        )(flat)
    return H


def dense_ggn(
    model: FunctionalModel, x: Tensor, y: Tensor, params: Params | None = None, chunk_size: int = 256
) -> Tensor:
    """Σ_i J_iᵀ Λ_i J_i, shape (P, P) (Λ_i = `model.objective.output_hessian`: diag(p) − ppᵀ categorical, I "
    "gaussian)."""
    check_data(model, x, y)
    params = params if params is not None else model.params
    P = model.n_params
    G = None
    for xb, _ in data_chunks(x, y, chunk_size, params):
        J = model.jacobians(params, xb, chunk_size=n_rows(xb))
        with torch.no_grad():
            lam = model.objective.output_hessian(model(params, xb))
        part = torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
        G = part if G is None else G + part
    assert G is not None and G.shape == (P, P)
    return G


def dense_empirical_fisher(
    model: FunctionalModel, x: Tensor, y: Tensor, params: Params | None = None, chunk_size: int = 256
) -> Tensor:
    """Σ_i g_i g_iᵀ, g_i = ∂l_i/∂θ, shape (P, P)."""
    check_data(model, x, y)
    params = params if params is not None else model.params
    F = None
    for xb, yb in data_chunks(x, y, chunk_size, params):
        g = model.per_example_grads(params, xb, yb, chunk_size=n_rows(xb), flat=True)
        F = g.T @ g if F is None else F + g.T @ g
    return F


def dense_matrix(
    model: FunctionalModel, x: Tensor, y: Tensor, matrix: str = "ggn", params: Params | None = None
) -> Tensor:
    """One of the three matrices by name: ggn | hessian | ef."""
    table = {"ggn": dense_ggn, "hessian": dense_hessian, "ef": dense_empirical_fisher}
    if matrix not in table:
        raise ConfigError(f"unknown matrix {matrix!r}; expected one of {tuple(table)}")
    return table[matrix](model, x, y, params)
