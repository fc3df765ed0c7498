"""Gaussian posteriors over parameters, one interface whatever their source.

    q(θ) = N(θ*, Σ),   Σ = (K + δ I)^{-1}

K a Curvature of the loss summed over the N training examples and δ the prior precision
(prior N(0, δ^{-1} I); training objective Σ_i l_i + δ/2 ‖θ‖², i.e. the mean loss plus (δ/N)/2 ‖θ‖²).

Sources (SEEDS.md 0.1-0.2):
  - `laplace`: K = GGN (or EF / Hessian) at θ*, structure full | diag | kfac | ekfac | lowrank.
  - `ivon_posterior`: IVON/iBLR state, σ_p² = 1/(ess (h_p + wd)): K = diag(ess · h), δ = ess · wd
    (per parameter group; with ess = N and wd = δ/N this is 1/(N h + δ)).
  - `adam_posterior`: σ_p² = 1/(N sqrt(v_p) + δ), v = Adam's exp_avg_sq (no bias correction, as in MPE):
    K = diag(N sqrt(v)).

Every posterior gives per-example predictive covariances J_i Σ J_iᵀ (n, C, C) (J_i = ∂f(x_i)/∂θ at
θ*) in chunks — KFAC/EK-FAC through their Kronecker factors, without per-example Jacobians —,
marginal variances diag Σ, and parameter samples θ* + Σ^{1/2} ε.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel, Params, n_rows
from modelsense.curvature._common import check_data, data_chunks, resolve_data
from modelsense.curvature.operators import Curvature, CurvatureConfig, DiagonalCurvature, build_curvature
from modelsense.errors import ConfigError, shown


class GaussianPosterior:
    """N(θ*, (K + δI)^{-1}) over the parameters a FunctionalModel selects.

    Args:
        model: the FunctionalModel (its `trainable` selection defines θ).
        curvature: K, summed over the training examples.
        prior_precision: δ > 0, a float (or a (P,) tensor with a diagonal K).
        mean: θ* as a parameter dict (default: model.params).
        source: a label (laplace, ivon, adam).
    """

    def __init__(
        self,
        model: FunctionalModel,
        curvature: Curvature,
        prior_precision: float | Tensor,
        mean: Params | None = None,
        source: str = "laplace",
    ) -> None:
        if curvature.n_params != model.n_params:
            raise ConfigError(f"curvature has {curvature.n_params} parameters, the model selects {model.n_params}")
        self.model = model
        self.curvature = curvature
        self.mean: Params = dict(mean if mean is not None else model.params)
        self.source = source
        self.prior_precision = prior_precision  # validated by the setter

    @property
    def prior_precision(self) -> float | Tensor:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        if isinstance(value, Tensor) and value.numel() > 1:
            if not isinstance(self.curvature, DiagonalCurvature) or value.shape != (self.n_params,):
                raise ConfigError(
                    f"a per-parameter prior precision (shape {tuple(value.shape)}) needs a diagonal "
                    f"curvature and shape ({self.n_params},)"
                )
            ok = bool((value > 0).all())
        else:
            value = float(value)
            ok = math.isfinite(value) and value > 0
        if not ok:
            raise ConfigError(f"prior precision must be > 0, received {shown(value)}")
        self._prior_precision = value

    @property
    def n_params(self) -> int:
        return self.model.n_params

    @property
    def mean_flat(self) -> Tensor:
        return self.model.spec.flatten(self.mean)

    def covariance_mv(self, v: Tensor) -> Tensor:
        """Σ v = (K + δI)^{-1} v for (P,) or (P, m)."""
        return self.curvature.inverse_mv(v, self.prior_precision)

    def marginal_variance(self) -> Tensor:
        """diag Σ, shape (P,)."""
        return self.curvature.inverse_diag(self.prior_precision)

    def predictive_covariance(self, x: Tensor, chunk_size: int = 256) -> Tensor:
        """J_i Σ J_iᵀ for each input x_i, shape (n, C, C) (linearised predictive covariance of f)."""
        return self.curvature.jacobian_quadratic_form(self.model, self.mean, x, self.prior_precision, chunk_size)

    def predictive_variance(self, x: Tensor, chunk_size: int = 256) -> Tensor:
        """diag(J_i Σ J_iᵀ), shape (n, C)."""
        return torch.diagonal(self.predictive_covariance(x, chunk_size), dim1=-2, dim2=-1)

    def sample(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """k parameter draws θ* + Σ^{1/2} ε, ε ~ N(0, I), flat shape (k, P)."""
        if k < 1:
            raise ConfigError(f"need k >= 1 samples, received {k}")
        mean = self.mean_flat
        eps = torch.randn(self.n_params, k, generator=generator, dtype=torch.float64).to(mean)
        return mean + self.curvature.inverse_sqrt_mv(eps, self.prior_precision).T

    def sample_params(self, k: int, generator: torch.Generator | None = None) -> Params:
        """Like `sample`, as a dict of (k, *shape) tensors (for vmap over functional_call)."""
        return self.model.spec.unflatten(self.sample(k, generator))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, curvature={self.curvature!r})"


class LaplacePosterior(GaussianPosterior):
    """Laplace approximation at θ* with the training log-likelihood kept for the evidence.

    log p(D | δ) ≈ log p(D | θ*) − δ/2 ‖θ*‖² + P/2 log δ − ½ log det(K + δI)

    (exact for a linear-Gaussian model at its MAP). log p(D | θ*) = −Σ_i l_i, minus (N C/2) log 2π
    for the gaussian likelihood (unit noise).
    """

    def __init__(self, model, curvature, prior_precision, log_likelihood: float, mean=None) -> None:
        super().__init__(model, curvature, prior_precision, mean, source="laplace")
        self.log_likelihood = float(log_likelihood)

    def _terms(self):
        if isinstance(self.prior_precision, Tensor):
            raise ConfigError("the evidence here needs a scalar prior precision")
        theta_sq = float(self.mean_flat.double().pow(2).sum())
        return theta_sq, self.curvature.eigenvalues().double().clamp_min(0)

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """Laplace evidence at δ (default: the current prior precision), θ* held fixed."""
        delta = float(self.prior_precision if prior_precision is None else prior_precision)
        if not delta > 0:
            raise ConfigError(f"prior precision must be > 0, received {shown(delta)}")
        theta_sq, lam = self._terms()
        P = self.n_params
        return (
            self.log_likelihood
            - 0.5 * delta * theta_sq
            + 0.5 * P * math.log(delta)
            - 0.5 * float(torch.log(lam + delta).sum())
        )

    def optimize_prior_precision(self, max_iter: int = 100, tol: float = 1e-10) -> float:
        """Maximise the evidence over δ (θ* fixed) by Newton's method on u = log δ; sets and returns δ.

        d/du = ½(γ(δ) − δ‖θ*‖²) with γ(δ) = Σ_i λ_i/(λ_i + δ) (the effective number of parameters;
        the optimum is MacKay's fixed point δ = γ/‖θ*‖²); d²/du² = −½(δ‖θ*‖² + Σ_i δλ_i/(λ_i + δ)²) < 0,
        so the evidence is strictly concave in u and the maximiser unique.
        """
        theta_sq, lam = self._terms()
        if theta_sq <= 0:
            raise ConfigError("‖θ*‖ = 0: the evidence grows without bound in δ; nothing to optimise")
        if float(lam.max()) <= 0:
            raise ConfigError("the curvature is zero: the evidence decreases in δ without a maximum")
        u = math.log(float(self.prior_precision))
        for _ in range(max_iter):
            delta = math.exp(u)
            gamma = float((lam / (lam + delta)).sum())
            g = 0.5 * (gamma - delta * theta_sq)
            h = -0.5 * (delta * theta_sq + float((delta * lam / (lam + delta) ** 2).sum()))
            step = max(-2.0, min(2.0, -g / h))
            u += step
            if abs(step) < tol:
                break
        self.prior_precision = math.exp(u)
        return self.prior_precision


def laplace(
    model: FunctionalModel,
    x: Tensor,
    y: Tensor | None = None,
    structure: str = "kfac",
    prior_precision: float = 1.0,
    matrix: str = "ggn",
    params: Params | None = None,
    config: CurvatureConfig | None = None,
    chunk_size: int = 256,
) -> LaplacePosterior:
    """Laplace posterior N(θ*, (K + δI)^{-1}) at θ* = params (default model.params), K the `matrix`
    (ggn by default) of the loss summed over (x, y) in `structure` (full | diag | kfac | ekfac | lowrank);
    x may be a map-style Dataset / DataLoader with y None (`modelsense.data.stream`, read by chunks).

    Example:
        >>> post = laplace(FunctionalModel(net), x_train, y_train, structure="kfac", prior_precision=1.0)
        >>> post.optimize_prior_precision(); post.predictive_covariance(x_test).shape
        torch.Size([n_test, C, C])
    """
    if structure == "implicit":
        raise ConfigError("a Laplace posterior needs a structure with inverses: full, diag, kfac, ekfac or lowrank")
    x, y = resolve_data(x, y)
    base = config or CurvatureConfig(chunk_size=chunk_size)
    K = build_curvature(model, x, y, base, params=params, matrix=matrix, structure=structure, reduction="sum")
    check_data(model, x, y)
    theta = params if params is not None else model.params
    log_lik = 0.0
    with torch.no_grad():
        for xb, yb in data_chunks(x, y, base.chunk_size, theta):
            logits = model(theta, xb)
            log_lik -= float(model.objective.nll(logits, yb).double().sum())
            log_lik -= model.objective.nll_constant(logits[0].numel() * n_rows(xb))  # what nll leaves out
    return LaplacePosterior(model, K, prior_precision, log_lik, mean=theta)


def _optimizer_tensors(model: FunctionalModel):
    """Map id(parameter) -> name for the parameters the model selects."""
    named = dict(model.module.named_parameters())
    return {id(named[n]): n for n in model.spec.names if n in named}, named


def ivon_posterior(model: FunctionalModel, optimizer) -> GaussianPosterior:
    """Diagonal posterior from an `ivon.IVON` optimizer: σ_p² = 1/(ess (h_p + wd)) per parameter group.

    Reads `param_groups[g]["hess"]` (flat over the group's parameters in order, None skipped),
    `["ess"]` and `["weight_decay"]`; the mean is the module's current parameters (call outside
    `sampled_params`). K = diag(ess · h), δ = ess · wd (scalar when equal across groups).
    """
    ids, named = _optimizer_tensors(model)
    curv, damp = {}, {}
    for group in optimizer.param_groups:
        if "hess" not in group or "ess" not in group:
            raise ConfigError("expected an ivon.IVON optimizer (param groups with 'hess' and 'ess')")
        offset = 0
        for p in group["params"]:
            if p is None:
                continue
            name = ids.get(id(p))
            h = group["hess"][offset : offset + p.numel()]
            offset += p.numel()
            if name is not None:
                curv[name] = group["ess"] * h.detach().reshape(p.shape)
                damp[name] = torch.full(p.shape, group["ess"] * group["weight_decay"], dtype=h.dtype, device=h.device)
    return _diagonal_from_state(model, named, curv, damp, "ivon")


def adam_posterior(model: FunctionalModel, optimizer, n_train: int, prior_precision: float) -> GaussianPosterior:
    """Diagonal posterior from torch.optim.Adam(W) state: σ_p² = 1/(N sqrt(v_p) + δ), v = exp_avg_sq."""
    if n_train < 1:
        raise ConfigError(f"n_train must be >= 1, received {n_train}")
    ids, named = _optimizer_tensors(model)
    curv, damp = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = ids.get(id(p))
            if name is None:
                continue
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                raise ConfigError(f"no Adam state 'exp_avg_sq' for {name!r}: take at least one optimizer step first")
            curv[name] = n_train * state["exp_avg_sq"].detach().sqrt()
    for name in curv:
        damp[name] = torch.full_like(curv[name], float(prior_precision))
    return _diagonal_from_state(model, named, curv, damp, "adam")


def _diagonal_from_state(model, named, curv, damp, source) -> GaussianPosterior:
    missing = [n for n in model.spec.names if n not in curv]
    if missing:
        raise ConfigError(
            f"the optimizer holds no state for the selected parameters {missing}; pass the optimizer that trained "
            "this module"
        )
    d = model.spec.flatten(curv)
    delta = model.spec.flatten(damp)
    mean = {n: named[n].detach().clone() for n in model.spec.names}
    prior = float(delta[0]) if bool((delta == delta[0]).all()) else delta
    return GaussianPosterior(model, DiagonalCurvature(d, "optimizer"), prior, mean=mean, source=source)


def in_float64_on_failure(build, module: nn.Module, x: Tensor):
    """`build(FunctionalModel(module), x)`; when that raises `torch.linalg.LinAlgError`, the same in
    float64: `build(FunctionalModel(copy of module in float64), x in float64)`.

    A float32 eigendecomposition of a KFAC factor with many (near-)repeated eigenvalues, e.g. of dead
    ReLU units, can fail to converge; the same posterior in float64 is robust. The module itself is
    left as it is.
    """
    try:
        return build(FunctionalModel(module), x)
    except torch.linalg.LinAlgError:
        return build(FunctionalModel(copy.deepcopy(module).double()), x.to(torch.float64))
