"""Krylov estimators on any symmetric operator: top-k eigenpairs, trace, spectral density.

All functions take either a `Curvature` (from `modelsense.curvature.operators`; batched products
are used where they help) or a plain callable `matvec(v: (P,)) -> (P,)` together with `dim=P`.

- `top_eigenpairs`: Lanczos with full reorthogonalisation (classical Gram-Schmidt, applied twice),
  extended step by step until the k wanted Ritz pairs have converged (no restarts needed at the
  sizes used here). Ritz pair (θ, u = Q s) has residual ‖K u − θ u‖ = β_m |s_m|; by Bauer-Fike
  there is an eigenvalue of K within that residual of θ.
- `hutchinson_trace`: tr(K) ≈ (1/m) Σ_j z_jᵀ K z_j with Rademacher z_j, with its standard error;
  `hutchpp_trace`: Hutch++, the top of the spectrum exactly from a sketch plus Hutchinson on the rest.
- `spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019):
  for unit probes v, vᵀ g(K) v ≈ Σ_i w_i g(θ_i) with Ritz values θ_i and weights w_i = (first
  component of the i-th eigenvector of T)²; the density is the probe average of Σ_i w_i δ(t − θ_i),
  so Σ_i w_i θ_i^j estimates tr(K^j)/P, exactly per probe for j ≤ 2m − 1.

Each takes `progress=True` for a progress bar (`modelsense.progress`): per Lanczos step, per
Hutchinson probe, per SLQ probe. Cost in matrix-vector products: Lanczos one per step (at most
max(4k, k + 60), fewer when the k pairs converge early), Hutchinson one per probe, SLQ
num_probes × num_steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from modelsense.errors import ConfigError
from modelsense.progress import progress_bar

MatVec = Callable[[Tensor], Tensor]
WHICH = ("largest", "magnitude")


@dataclass(frozen=True)
class EigenDecomposition:
    """k eigenpairs of a symmetric operator, sorted descending (by value, or by |value|).

    eigenvalues: (k,); eigenvectors: (P, k) with orthonormal columns; residuals: (k,)
    ‖K u − λ u‖ for iterative results (None where exact); converged: (k,) bool (None where exact).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor | None = None
    converged: Tensor | None = None
    num_matvecs: int = 0


def _operator(
    op, dim: int | None, dtype: torch.dtype | None, device
) -> tuple[MatVec, MatVec | None, int, torch.dtype, torch.device]:
    """(matvec, matmat or None, P, dtype, device) of a Curvature or a callable."""
    if hasattr(op, "mv") and hasattr(op, "n_params"):
        return op.mv, op.mv, op.n_params, op.dtype, op.device
    if not callable(op):
        raise ConfigError(f"expected a Curvature or a callable matvec, received {type(op).__name__}")
    if dim is None or dim < 1:
        raise ConfigError(f"a callable matvec needs dim = P >= 1, received dim={dim!r}")
    return op, None, int(dim), dtype or torch.get_default_dtype(), torch.device(device or "cpu")


def _rademacher(shape, dtype, device, generator) -> Tensor:
    z = torch.randint(0, 2, shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
    return 2 * z - 1


def _random_unit(dim, dtype, device, generator, basis: Tensor | None = None) -> Tensor:
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    if basis is not None and basis.shape[0] > 0:  # basis: (m, P) orthonormal rows
        for _ in range(2):
            v = v - basis.T @ (basis @ v)
    return v / v.norm()


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    key = theta if which == "largest" else theta.abs()
    return torch.argsort(key, descending=True)[:k]


def top_eigenpairs(
    op,
    k: int,
    *,
    dim: int | None = None,
    tol: float = 1e-5,
    max_steps: int | None = None,
    which: str = "largest",
    check_every: int = 5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
) -> EigenDecomposition:
    """Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        op: a Curvature or a callable v -> K v on vectors of length `dim`.
        k: number of eigenpairs (capped at P).
        tol: a Ritz pair counts as converged when its residual β_m|s_m| <= tol · max(|θ|, 1e-3 θ_max)
            (θ_max the largest |Ritz value|), which bounds its eigenvalue error by the same amount.
        max_steps: most Lanczos steps (= matvecs); default min(P, max(4k, k + 60)). The run stops
            as soon as the k wanted pairs have converged (checked every `check_every` steps).
        which: "largest" (algebraic, the default, as for N_eff) or "magnitude" (|λ|).
        progress: a progress bar over the Lanczos steps (one matvec each), with the converged count.
    Returns:
        EigenDecomposition sorted descending by `which`, with residuals and a converged mask;
        pairs that did not converge within max_steps are returned and flagged, not dropped.
    """
    if which not in WHICH:
        raise ConfigError(f"unknown which={which!r}; expected one of {WHICH}")
    matvec, _, P, dtype, device = _operator(op, dim, dtype, device)
    if k < 1:
        raise ConfigError(f"need k >= 1 eigenpairs, received k={k}")
    k = min(int(k), P)
    steps = min(P, int(max_steps) if max_steps else max(4 * k, k + 60))
    steps = max(steps, k)
    Q = torch.zeros(steps, P, dtype=dtype, device=device)  # rows: contiguous Lanczos vectors
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    Q[0] = _random_unit(P, dtype, device, generator)
    m = 0
    result = None
    with progress_bar(steps, f"Lanczos (top {k})", enabled=progress) as bar:
        for j in range(steps):
            q = Q[j]
            w = matvec(q)
            a = torch.dot(q, w)
            w = w - a * q
            if j > 0:
                w = w - beta[j - 1].to(dtype) * Q[j - 1]
            basis = Q[: j + 1]
            for _ in range(2):  # full reorthogonalisation, twice is enough (Giraud et al. 2005)
                w = w - basis.T @ (basis @ w)
            b = w.norm()
            alpha[j], beta[j] = float(a), float(b)
            m = j + 1
            bar.advance(1)
            scale = float(alpha[:m].abs().max()) + float(beta[:m].max()) + 1e-300
            breakdown = float(b) <= 1e-10 * scale
            if (m % check_every == 0 and m >= k) or m == steps or (breakdown and m >= k):
                result = _ritz(alpha[:m], beta[:m], Q[:m], k, which, tol)
                bar.set_info(converged=f"{int(result.converged.sum())}/{k}")
                if bool(result.converged.all()) or m == steps:
                    break
            if m == steps:
                break
            if breakdown:  # invariant subspace found: continue from a fresh orthogonal direction
                beta[j] = 0.0
                Q[j + 1] = _random_unit(P, dtype, device, generator, basis)
            else:
                Q[j + 1] = w / b
        bar.set_total(m)  # stopped early once converged: the bar ends full at the steps taken
    if result is None or result.eigenvalues.numel() == 0 or m != result.num_matvecs:
        result = _ritz(alpha[:m], beta[:m], Q[:m], k, which, tol)
    return result


def _ritz(alpha, beta, Q, k, which, tol) -> EigenDecomposition:
    m = alpha.numel()
    T = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    idx = _select(theta, min(k, m), which)
    theta, S = theta[idx], S[:, idx]
    residuals = (beta[m - 1] * S[m - 1]).abs()
    top = float(theta.abs().max()) if theta.numel() else 0.0
    converged = residuals <= tol * torch.clamp(theta.abs(), min=1e-3 * top)
    vectors = Q.T @ S.to(Q.dtype)  # Q: (m, P) rows
    return EigenDecomposition(theta.to(Q.dtype), vectors, residuals, converged, num_matvecs=m)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of tr(K) with its standard error std(samples)/sqrt(m)."""

    estimate: float
    standard_error: float
    samples: Tensor


def hutchinson_trace(
    op,
    num_samples: int = 100,
    *,
    dim: int | None = None,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
) -> TraceEstimate:
    """tr(K) ≈ (1/m) Σ_j z_jᵀ K z_j, z_j with independent ±1 entries; SE = std(z_jᵀKz_j, ddof=1)/√m.

    A Curvature is applied to `batch_size` probes at once (one pass over the data per batch).
    Cost: num_samples matvecs. `progress`: a bar over the probes.
    """
    if num_samples < 2:
        raise ConfigError(f"need num_samples >= 2 for a standard error, received {num_samples}")
    matvec, matmat, P, dtype, device = _operator(op, dim, dtype, device)
    values = []
    done = 0
    with progress_bar(num_samples, "Hutchinson trace (probes)", enabled=progress) as bar:
        while done < num_samples:
            b = min(batch_size, num_samples - done)
            Z = _rademacher((P, b), dtype, device, generator)
            KZ = matmat(Z) if matmat is not None else torch.stack([matvec(Z[:, i]) for i in range(b)], 1)
            values.append((Z * KZ).sum(0).double().cpu())
            done += b
            bar.advance(b)
    samples = torch.cat(values)
    return TraceEstimate(float(samples.mean()), float(samples.std() / math.sqrt(len(samples))), samples)


def hutchpp_trace(
    op,
    num_matvecs: int = 102,
    *,
    dim: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(K) = tr(Qᵀ K Q) + tr((I − QQᵀ) K (I − QQᵀ)),
    Q an orthonormal basis of K S for m/3 Rademacher columns S, the first term exact and the second
    by Hutchinson with m/3 probes projected off Q. The standard error is that of the second term
    (given Q). Far fewer matvecs than Hutchinson for the same error when the spectrum decays fast,
    as Hessians' do. Cost: num_matvecs products (three batched passes for a Curvature).
    """
    if num_matvecs < 6:
        raise ConfigError(f"Hutch++ needs num_matvecs >= 6, received {num_matvecs}")
    matvec, matmat, P, dtype, device = _operator(op, dim, dtype, device)
    apply = matmat if matmat is not None else (lambda Z: torch.stack([matvec(Z[:, i]) for i in range(Z.shape[1])], 1))
    k = num_matvecs // 3
    S = _rademacher((P, k), dtype, device, generator)
    Q, _ = torch.linalg.qr(apply(S))
    exact = float(torch.trace(Q.T @ apply(Q)))
    G = _rademacher((P, k), dtype, device, generator)
    G = G - Q @ (Q.T @ G)
    samples = (G * apply(G)).sum(0).double().cpu()
    return TraceEstimate(exact + float(samples.mean()), float(samples.std() / math.sqrt(k)), samples + exact)


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: nodes (probes, m) and weights (probes, m); each probe's
    weights sum to 1 (padded with zero weights when Lanczos stopped early on an invariant subspace).
    """

    nodes: Tensor
    weights: Tensor
    n_params: int

    def moment(self, j: int) -> float:
        """Estimate of tr(K^j)/P: probe mean of Σ_i w_i θ_i^j."""
        return float(self.probe_moments(j).mean())

    def probe_moments(self, j: int) -> Tensor:
        """Σ_i w_i θ_i^j for each probe, shape (probes,)."""
        return (self.weights * self.nodes.pow(j)).sum(-1)

    def evaluate(self, grid: Tensor, bandwidth: float | None = None) -> Tensor:
        """Density on `grid` (shape (g,)): probe mean of Σ_i w_i N(t; θ_i, bandwidth²).

        It integrates to 1 over the real line. Default bandwidth: 1% of the node range
        (or 1e-3 · max(1, |θ|max) when all nodes coincide).
        """
        grid = torch.as_tensor(grid, dtype=torch.float64)
        nodes, weights = self.nodes.double(), self.weights.double()
        if bandwidth is None:
            span = float(nodes.max() - nodes.min())
            bandwidth = 0.01 * span if span > 0 else 1e-3 * max(1.0, float(nodes.abs().max()))
        if bandwidth <= 0:
            raise ConfigError(f"bandwidth must be > 0, received {bandwidth}")
        z = (grid[:, None, None] - nodes[None]) / bandwidth
        kernel = torch.exp(-0.5 * z**2) / (bandwidth * math.sqrt(2 * math.pi))
        return (kernel * weights[None]).sum(-1).mean(-1)


def spectral_density(
    op,
    num_probes: int = 10,
    num_steps: int = 60,
    *,
    dim: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
) -> SpectralDensity:
    """Spectral density of K by stochastic Lanczos quadrature (see module docstring).

    Each probe v = z/√P (z Rademacher, so ‖v‖ = 1 and E[vᵀ K v] = tr(K)/P) runs min(num_steps, P)
    Lanczos steps with full reorthogonalisation; cost num_probes · num_steps matvecs.
    `progress`: a bar over the probes.
    """
    if num_probes < 1 or num_steps < 1:
        raise ConfigError(f"need num_probes >= 1 and num_steps >= 1, received {num_probes}, {num_steps}")
    matvec, _, P, dtype, device = _operator(op, dim, dtype, device)
    m_max = min(num_steps, P)
    nodes = torch.zeros(num_probes, m_max, dtype=torch.float64)
    weights = torch.zeros(num_probes, m_max, dtype=torch.float64)
    with progress_bar(num_probes, f"spectral density (SLQ probes of {m_max} steps)", enabled=progress) as bar:
        for r in range(num_probes):
            v = _rademacher((P,), dtype, device, generator) / math.sqrt(P)
            alpha, beta = _lanczos_coefficients(matvec, v, m_max)
            m = alpha.numel()
            T = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
            theta, S = torch.linalg.eigh(T)
            nodes[r, :m] = theta
            weights[r, :m] = S[0] ** 2
            bar.advance(1)
    return SpectralDensity(nodes, weights, P)


def _lanczos_coefficients(matvec: MatVec, v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """α (m,) and β (m,) of `steps` Lanczos steps from unit v, stopping early on breakdown."""
    P = v.numel()
    Q = torch.zeros(steps, P, dtype=v.dtype, device=v.device)  # rows: contiguous Lanczos vectors
    Q[0] = v
    alpha, beta = [], []
    for j in range(steps):
        w = matvec(Q[j])
        a = torch.dot(Q[j], w)
        w = w - a * Q[j]
        if j > 0:
            w = w - beta[-1] * Q[j - 1]
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = w.norm()
        alpha.append(float(a))
        beta.append(float(b))
        scale = max(abs(x) for x in alpha) + max(beta) + 1e-300
        if j + 1 == steps or float(b) <= 1e-10 * scale:
            break
        Q[j + 1] = w / b
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
