"""The loss along straight lines θ + t·d through the trained parameters θ (Maddox, Benton & Wilson
2020, Section 5 and Figs. A.1, A.2: `cifar-loss-surfaces`, `cifar-homogeneity`).

Directions d are unit vectors (‖d‖₂ = 1) in the flat parameter space of a `FunctionalModel` (all
its parameters, or the weights only), of three kinds:

    top       eigenvectors v_1, v_2, ... of the curvature K for its largest eigenvalues (Lanczos):
              the loss rises fastest along them, d²L/dt² at t = 0 equals λ_i (for K the Hessian of
              the loss L of the same reduction);
    bottom    low-curvature directions: a standard Gaussian vector projected off the span of the top
              k eigenvectors V, then normalised (`complement_directions`). These are the original's
              low-curvature directions (perturbations.py, loss_surface_runner.py: gram_schmidt of a
              random vector against the top eigenvectors). Their curvature dᵀKd has mean
              (tr K − Σ_{i≤k} λ_i)/(P − k): what the top k leave over, spread over P − k dimensions.
              Not the eigenvectors of the smallest eigenvalues: a trained network's Hessian has a
              large cluster of eigenvalues near 0, so an eigenvector "at the bottom" is not well
              defined and Lanczos converges slowly inside a cluster; its algebraically smallest
              eigenvalues (which Lanczos does find cheaply) are small negative ones, directions of
              negative curvature, another question;
    random    standard Gaussian vectors normalised to unit length (seeded): the curvature of one
              has mean tr(K)/P.

`scan_directions` evaluates, for every direction d and every t, the mean NLL, the accuracy and the
agreement (the fraction of examples whose predicted class is the one at t = 0: the original's
"classification homogeneity") on (x, y); `directional_curvature` gives dᵀKd with one batched product.
`perturbation_study` runs the whole experiment (directions of the three kinds, their curvature, the
scans on the training and test sets, the rise of the training loss along each) and summarises it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modelsense.core.functional import FunctionalModel, Params, chunks
from modelsense.curvature.operators import CurvatureConfig, build_curvature
from modelsense.curvature.spectrum import SpectrumConfig, compute_spectrum
from modelsense.errors import ConfigError

KINDS = ("top", "bottom", "random")


def random_directions(n_params: int, count: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                      device=None) -> Tensor:
    """`count` independent unit vectors g/‖g‖, g ~ N(0, I_P), as columns of a (P, count) matrix
    (drawn in float64 on the CPU from `generator`, so the same seed gives the same directions anywhere)."""
    if n_params < 1 or count < 0:
        raise ConfigError(f"need n_params >= 1 and count >= 0, received {n_params}, {count}")
    g = torch.randn(n_params, count, generator=generator, dtype=torch.float64)
    return (g / g.norm(dim=0, keepdim=True)).to(dtype=dtype, device=device)


def complement_directions(basis: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` unit vectors orthogonal to the columns of `basis` (P, k; orthonormal): g − V(Vᵀg),
    applied twice (one pass leaves rounding errors of the size of the float precision times the
    projection), then normalised; shape (P, count), the dtype and device of `basis`."""
    P, k = basis.shape
    if k >= P:
        raise ConfigError(f"the top {k} eigenvectors span all {P} dimensions: no direction is orthogonal to them")
    V = basis.double().cpu()
    g = torch.randn(P, count, generator=generator, dtype=torch.float64)
    for _ in range(2):
        g = g - V @ (V.T @ g)
    return (g / g.norm(dim=0, keepdim=True)).to(dtype=basis.dtype, device=basis.device)


def directional_curvature(K, directions: Tensor) -> Tensor:
    """dᵀ K d for each column d of `directions` (P, m), shape (m,): the curvature along d (for K the
    Hessian of a loss L, d²L(θ + t·d)/dt² at t = 0); one batched product with K (a `Curvature`)."""
    KD = K.mv(directions.to(dtype=K.dtype, device=K.device))
    return (directions.to(KD.dtype) * KD).sum(0)


@dataclass(frozen=True)
class LineScan:
    """The loss along θ + t·d: `t` (T,) and, per direction (rows) and t (columns), shape (m, T):
    `loss` (mean NLL), `accuracy`, `agreement` (fraction of examples predicted as at t = 0)."""

    t: Tensor
    loss: Tensor
    accuracy: Tensor
    agreement: Tensor


@torch.no_grad()
def scan_directions(model: FunctionalModel, directions: Tensor, t: Tensor, x: Tensor, y: Tensor,
                    params: Params | None = None, chunk_size: int = 2048) -> LineScan:
    """Mean NLL, accuracy and agreement of `model` at θ + t_j·d_i for every column d_i of `directions`
    (P, m) and every t_j of `t` (T,), on (x, y). θ = `params` (default `model.params`); parameters
    outside the model's selection (e.g. biases with weights_only) stay fixed. Cost: m·T forward
    passes over x, in chunks of `chunk_size` examples."""
    params = model.params if params is None else params
    theta = model.spec.flatten(params)
    if directions.ndim != 2 or directions.shape[0] != theta.numel():
        raise ConfigError(f"directions must have shape (P={theta.numel()}, m), received {tuple(directions.shape)}")
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    D = directions.to(dtype=theta.dtype, device=theta.device)
    x, y = x.to(theta.device), y.to(theta.device)
    if x.is_floating_point():
        x = x.to(theta.dtype)
    base = _predict(model, params, x, chunk_size).argmax(-1)
    m, T = D.shape[1], t.numel()
    loss = torch.zeros(m, T, dtype=torch.float64)
    accuracy = torch.zeros(m, T, dtype=torch.float64)
    agreement = torch.zeros(m, T, dtype=torch.float64)
    for i in range(m):
        for j in range(T):
            moved = model.spec.unflatten(theta + float(t[j]) * D[:, i])
            logits = _predict(model, moved, x, chunk_size)
            loss[i, j] = float(model.objective.nll(logits, y).double().mean())
            pred = logits.argmax(-1)
            accuracy[i, j] = float((pred == y).double().mean())
            agreement[i, j] = float((pred == base).double().mean())
    return LineScan(t, loss, accuracy, agreement)


def _predict(model: FunctionalModel, params: Params, x: Tensor, chunk_size: int) -> Tensor:
    return torch.cat([model(params, x[s]) for s in chunks(len(x), chunk_size)])


def symmetric_rise(t: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(t_k >= 0, r(t_k)) with r(t) = (L(t) + L(−t))/2 − L(0) for the rows of `values` (m, T) on a grid
    `t` symmetric about 0 that contains 0 (r(0) = 0 is the first column): the even part of the curve,
    where the gradient term (odd in t) cancels, so r(t) ≈ ½ dᵀ∇²L d t² for small t."""
    t = torch.as_tensor(t, dtype=torch.float64)
    zero = torch.nonzero(t.abs() <= 1e-12 * max(float(t.abs().max()), 1.0)).flatten()
    if zero.numel() != 1 or not torch.allclose(t, -t.flip(0)):
        raise ConfigError("the grid of t must be symmetric about 0 and contain 0 (an odd number of points)")
    c = int(zero[0])
    return t[c:].abs(), (values[:, c:] + values[:, : c + 1].flip(1)) / 2 - values[:, c : c + 1]


def first_crossing(t: Tensor, curve: Tensor, level: float) -> float | None:
    """The smallest t (linear interpolation between grid points) at which `curve` (T,), starting below
    `level`, first reaches it; t[0] when it starts at or above it; None if it never does."""
    t, curve = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(curve, dtype=torch.float64)
    above = torch.nonzero(curve >= level).flatten()
    if above.numel() == 0:
        return None
    j = int(above[0])
    if j == 0:
        return float(t[0])
    a, b = float(curve[j - 1]), float(curve[j])
    return float(t[j - 1] + (t[j] - t[j - 1]) * (level - a) / (b - a))


def interpolate(t: Tensor, curves: Tensor, at: float) -> Tensor:
    """The rows of `curves` (m, T) at `at`, linearly interpolated on the increasing grid `t` (T,)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    j = int(torch.searchsorted(t, torch.tensor(at, dtype=torch.float64)).clamp(1, t.numel() - 1))
    w = (at - float(t[j - 1])) / float(t[j] - t[j - 1])
    return curves[:, j - 1] * (1 - w) + curves[:, j] * w


def study_directions(vectors: Tensor, n_top: int, n_bottom: int, n_random: int,
                     seed: int) -> tuple[Tensor, list[str], list[str]]:
    """(directions (P, m), names, kinds): the first `n_top` columns of `vectors` (the top eigenvectors,
    (P, k)), `n_bottom` low-curvature directions orthogonal to all k of them and `n_random` random
    directions, both drawn from `seed` (`complement_directions`, `random_directions`)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [vectors[:, :n_top]]
    if n_bottom:
        parts.append(complement_directions(vectors, n_bottom, gen))
    parts.append(random_directions(vectors.shape[0], n_random, gen, vectors.dtype))
    kinds = ["top"] * n_top + ["bottom"] * n_bottom + ["random"] * n_random
    names = ([f"v{i + 1}" for i in range(n_top)] + [f"bottom {j + 1}" for j in range(n_bottom)]
             + [f"random {j + 1}" for j in range(n_random)])
    return torch.cat(parts, dim=1), names, kinds


@dataclass(frozen=True)
class PerturbationStudy:
    """The result of `perturbation_study`: the directions' `names` and `kinds`, the `eigenvalues` (k,)
    of the top eigenvectors, the curvature dᵀKd (m,) along each direction, the line scans per split
    ("train", "test"), and the seconds the scans took."""

    names: list[str]
    kinds: list[str]
    eigenvalues: Tensor
    curvature: Tensor
    scans: dict[str, LineScan]
    seconds: float

    def arrays(self) -> dict[str, Any]:
        """t, names, kinds, curvature, eigenvalues and per split <split>_loss / _accuracy / _agreement (m, T)."""
        out: dict[str, Any] = {"t": self.scans["train"].t, "names": np.array(self.names),
                               "kinds": np.array(self.kinds), "curvature": self.curvature,
                               "eigenvalues": self.eigenvalues}
        for split, scan in self.scans.items():
            out.update({f"{split}_loss": scan.loss, f"{split}_accuracy": scan.accuracy,
                        f"{split}_agreement": scan.agreement})
        return out

    def curves(self, split: str) -> dict[str, np.ndarray]:
        """loss, accuracy and agreement (m, T) on `split` (`curvature.plots.perturbation_figure`)."""
        scan = self.scans[split]
        return {"loss": scan.loss.numpy(), "accuracy": scan.accuracy.numpy(), "agreement": scan.agreement.numpy()}

    def by_kind(self, values: Tensor) -> dict[str, Any]:
        """{"top": the value of each top direction, "bottom" / "random": the mean over that kind (None: none)}."""
        n_top = self.kinds.count("top")
        out: dict[str, Any] = {"top": [float(v) for v in values[:n_top]]}
        for kind in ("bottom", "random"):
            sel = [i for i, k in enumerate(self.kinds) if k == kind]
            out[kind] = float(values[sel].mean()) if sel else None
        return out

    def metrics(self) -> dict[str, Any]:
        """The summary: curvature by kind, the train / test loss at t = 0, t_double (where the symmetrised
        rise of the training loss (L(t) + L(−t))/2 − L(0) along v_1 first reaches L(0); None without a
        top direction or when it does not within the grid) and the relative rise of every direction
        there (`rise_at_t_double`) and at the largest t (`rise_at_t_max`)."""
        train, middle = self.scans["train"], len(self.scans["train"].t) // 2
        loss0 = float(train.loss[0, middle])
        pos, rise = symmetric_rise(train.t, train.loss)
        rise = rise / loss0
        t_double = first_crossing(pos, rise[0], 1.0) if "top" in self.kinds else None
        return {
            "names": self.names, "kinds": self.kinds, "k": len(self.eigenvalues),
            "eigenvalues": [float(v) for v in self.eigenvalues], "curvature": [float(c) for c in self.curvature],
            "curvature_by_kind": self.by_kind(self.curvature), "train_loss_at_0": loss0,
            "test_loss_at_0": float(self.scans["test"].loss[0, middle]), "t_double": t_double,
            "rise_at_t_double": None if t_double is None else self.by_kind(interpolate(pos, rise, t_double)),
            "rise_at_t_max": self.by_kind(rise[:, -1]),
        }


def perturbation_study(model: FunctionalModel, x: Tensor, y: Tensor, config: SpectrumConfig,
                       splits: dict[str, tuple[Tensor, Tensor]], t: Tensor, n_top: int, n_bottom: int, n_random: int,
                       seed: int = 0, vectors: tuple[Tensor, Tensor] | None = None,
                       progress: bool = False) -> PerturbationStudy:
    """The loss along θ + t·d on each split ({"train": (x, y), "test": (x, y)}) for the top `n_top`
    eigenvectors of the curvature K (`config.matrix` and `config.reduction` of the loss over (x, y)),
    `n_bottom` low-curvature and `n_random` random directions (`study_directions`), and the curvature
    dᵀKd along each. The eigenvectors: `vectors` = (eigenvectors (P, k), eigenvalues (k,)), e.g. read
    from a file, or the top `config.k` computed here (`compute_spectrum`)."""
    if vectors is None:
        spectrum = compute_spectrum(model, x, y, config, progress=progress)
        vectors = spectrum.eigenvectors, spectrum.eigenvalues
    K = build_curvature(model, x, y, CurvatureConfig(matrix=config.matrix, structure="implicit",
                                                     reduction=config.reduction, chunk_size=config.chunk_size))
    dtype = next(iter(model.params.values())).dtype
    D, names, kinds = study_directions(torch.as_tensor(vectors[0]).to(dtype), n_top, n_bottom, n_random, seed)
    curvature = directional_curvature(K, D).double()
    start = time.perf_counter()
    scans = {split: scan_directions(model, D, t, xs, ys) for split, (xs, ys) in splits.items()}
    eigenvalues = torch.as_tensor(vectors[1], dtype=torch.float64)
    return PerturbationStudy(names, kinds, eigenvalues, curvature, scans, time.perf_counter() - start)


def describe_perturbation(m: dict[str, Any]) -> str:
    """A few lines of `PerturbationStudy.metrics()` `m` with matrix, reduction and t_max: the curvature
    by kind and the rise of the training loss at t_double and at t_max."""
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


__all__ = ["KINDS", "LineScan", "PerturbationStudy", "complement_directions", "describe_perturbation",
           "directional_curvature", "first_crossing", "interpolate", "perturbation_study", "random_directions",
           "scan_directions", "study_directions", "symmetric_rise"]
