"""Model stitching: model A up to a ReLU -> a trainable stitching layer -> model B after that point.

A stitching layer maps activations (n, C_in, *S) to (n, C_out, *S) with one C_out x C_in matrix
applied to the channels at every position (a 1x1 convolution for conv features, a dense map for
(n, C) features). The channel axis of each model's features at the stitch point follows
`modelsense.representations.features.channel_axes` (e.g. the last axis of a transformer's (n, T, width)
tokens: the layer is then width x width, the same at every token); `StitchedModel` moves it to axis 1
for the stitching layer and back to model B's layout.
Kinds (Godfrey et al. 2022, `model_symmetries/stitching/stitching.py`):

- `linear`: an unconstrained matrix (optionally with bias).
- `birkhoff`: W diag(s) with W doubly stochastic and s >= 0, trained by projected gradient; the
  relaxed matrix is also used at evaluation.
- `permutation`: the same layer and training, but at evaluation W is rounded to the permutation that
  maximises <W, P> (Hungarian algorithm), so the evaluated map is P diag(s), an element of G_ReLU.
  This is what the paper reports as G_ReLU stitching.
- `lowrank`: U V with V (r x C_in), U (C_out x r).
- `lasso`: a matrix with an L1 penalty `multiplier * sum|W|`; entries below 1e-4 in magnitude are
  zeroed at evaluation.

Projection after every optimizer step (birkhoff/permutation): W <- max(W, 0), s <- max(s, 0), then
either `sinkhorn_normalize` (the original: 16 alternating row/column normalisations, an
approximation) or `project_birkhoff` (the exact Euclidean projection onto the Birkhoff polytope).

Both networks stay frozen and in eval mode all along (the original put their batch norms in train
mode, so running statistics drifted); only the stitching layer's parameters train.

Options of the original (`Stitcher`, `cifar10_stitching.py`, `train.py`), in `StitchConfig`:
- batch norm around the layer (`batch_norm`: "before", "after" or "both"; the original's `batch_norm`
  flag puts one before and one after, affine only with a bias): `ChannelBatchNorm` over the channel
  axis, trained with the layer, its running statistics used at evaluation;
- the permutation warm-up of birkhoff/permutation layers (`perm_warmup`, the original's default; off
  with its `--nopermwarmup`): W alone for epochs // 2, then W and the scales;
- the learning-rate schedule (`schedule`): "constant" (every configuration of the paper, `--noschedule`)
  or "step", the original's default: in each phase StepLR(step = max(1, epochs of the phase // 4),
  gamma = 0.5) stepped once per epoch, and the second warm-up phase starting at lr / 16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelsense.core.device import check_device
from modelsense.core.functional import chunks
from modelsense.errors import ConfigError, DataError
from modelsense.options import option
from modelsense.representations.features import _extract, channel_axes, extract_features
from modelsense.representations.metrics import channel_rows, relu_procrustes_matching

STITCH_KINDS = ("linear", "birkhoff", "permutation", "lowrank", "lasso")
PROJECTIONS = ("sinkhorn", "exact")
INITS = ("default", "match")
#: where batch norm goes around a stitching layer
BATCH_NORMS = ("none", "before", "after", "both")
#: learning-rate schedules of stitching-layer training
SCHEDULES = ("constant", "step")


# ----------------------------------------------------------------------------------------------
# Birkhoff polytope: Sinkhorn normalisation and exact Euclidean projection
# ----------------------------------------------------------------------------------------------


def sinkhorn_normalize(w: Tensor, iters: int = 16) -> Tensor:
    """`iters` alternating normalisations of a nonnegative matrix, rows first, as the original.

    One iteration divides every row by its sum (rows first), the next every column; rows or
    columns summing to zero are left unchanged. An approximation of a doubly stochastic matrix
    near `w`, not the Euclidean projection.
    """
    out = w.clone()
    for i in range(iters):
        dim = 1 if i % 2 == 0 else 0
        s = out.sum(dim=dim, keepdim=True)
        out = out / torch.where(s != 0, s, torch.ones_like(s))
    return out


def _birkhoff_dual(y: Tensor, u: Tensor, v: Tensor) -> tuple[float, float]:
    """(phi(u, v), max |row/column sum - 1|) for the dual of the Birkhoff projection."""
    x = (y + u[:, None] + v[None, :]).clamp_min(0.0)
    phi = 0.5 * x.pow(2).sum() - u.sum() - v.sum()
    res = torch.maximum((x.sum(1) - 1).abs().max(), (x.sum(0) - 1).abs().max())
    return float(phi), float(res)


def _newton_direction(m: Tensor, gu: Tensor, gv: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """Solve ([[diag(M1), M], [M^T, diag(M^T 1)]] + mu I) (du, dv) = -(gu, gv) by eliminating du.

    Schur complement: S = diag(M^T 1) + mu - M^T diag(1 / (M1 + mu)) M (SPD), then
    S dv = -gv + M^T (gu / (M1 + mu)), du = -(gu + M dv) / (M1 + mu).
    """
    dr = m.sum(1) + mu
    s = torch.diag(m.sum(0) + mu) - m.T @ (m / dr[:, None])
    rhs = -gv + m.T @ (gu / dr)
    if s.device.type == "cpu":  # LAPACK directly: torch's thread pool costs more than a small solve
        import scipy.linalg  # here: `modelsense --help` does not load scipy

        try:
            factor = scipy.linalg.cho_factor(s.numpy(), check_finite=False)
            dv = torch.from_numpy(scipy.linalg.cho_solve(factor, rhs.numpy(), check_finite=False))
        except np.linalg.LinAlgError:  # numerically semidefinite: least squares
            dv = torch.from_numpy(np.linalg.lstsq(s.numpy(), rhs.numpy(), rcond=None)[0])
    else:
        chol, info = torch.linalg.cholesky_ex(s)
        if int(info) == 0:
            dv = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
        else:
            dv = torch.linalg.lstsq(s, rhs[:, None]).solution[:, 0]
    du = -(gu + m @ dv) / dr
    return du, dv


def project_birkhoff(
    y: Tensor,
    tol: float = 1e-10,
    max_iter: int = 200,
    duals: tuple[Tensor, Tensor] | None = None,
    return_duals: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
    """Exact Euclidean projection of a square matrix onto the Birkhoff polytope.

        P(Y) = argmin_X ||X - Y||_F^2  s.t.  X >= 0, X 1 = 1, X^T 1 = 1.

    The KKT conditions give X = max(Y + u 1^T + 1 v^T, 0) with duals (u, v) minimising the convex,
    piecewise-quadratic dual
        phi(u, v) = 1/2 ||max(Y + u 1^T + 1 v^T, 0)||_F^2 - 1^T u - 1^T v,
    whose gradient is (X 1 - 1, X^T 1 - 1). We minimise phi by a semismooth Newton method
    (generalised Hessian [[diag(M 1), M], [M^T, diag(M^T 1)]] with M the 0/1 support of X,
    Levenberg-Marquardt damping ~ ||grad||, Armijo backtracking) from the duals of the projection
    onto the affine set {X 1 = 1, X^T 1 = 1}, until max |row/column sum - 1| <= tol. A doubly
    stochastic input is returned unchanged (idempotent). Computed in float64, returned in y.dtype.

    Args:
        y: (C, C) matrix.
        duals: warm start (u, v) from a previous call on a nearby matrix.
        return_duals: also return the final (u, v).
    """
    if y.ndim != 2 or y.shape[0] != y.shape[1]:
        raise DataError(f"project_birkhoff needs a square (C, C) matrix, got shape {tuple(y.shape)}")
    yd = y.detach().to(torch.float64)
    c = yd.shape[0]
    ones = torch.ones(c, dtype=yd.dtype, device=yd.device)
    if duals is not None:
        u, v = duals[0].to(yd).clone(), duals[1].to(yd).clone()
    else:
        r, s = yd.sum(1), yd.sum(0)
        u = (1.0 - r) / c + (yd.sum() - c) / c**2
        v = (1.0 - s) / c
    for _ in range(max_iter):
        z = yd + u[:, None] + v[None, :]
        x = z.clamp_min(0.0)
        g = torch.cat([x.sum(1) - ones, x.sum(0) - ones])
        gnorm = float(g.abs().max())
        if gnorm <= tol:
            break
        mu = max(min(1.0, float(g.norm())), 1e-8)
        du, dv = _newton_direction((z > 0).to(yd.dtype), g[:c], g[c:], mu)
        d = torch.cat([du, dv])
        phi0 = float(0.5 * x.pow(2).sum() - u.sum() - v.sum())
        slope = float(g @ d)
        t = 1.0
        for _ls in range(60):
            # Armijo on phi; near the solution phi's decrease drops below round-off, so a step that
            # shrinks the residual enough is accepted as well
            phi, res = _birkhoff_dual(yd, u + t * du, v + t * dv)
            if phi <= phi0 + 1e-4 * t * slope or res <= 0.5 * gnorm:
                break
            t *= 0.5
        else:  # no progress possible at this precision
            break
        u, v = u + t * du, v + t * dv
    x = (yd + u[:, None] + v[None, :]).clamp_min(0.0).to(y.dtype)
    if return_duals:
        return x, (u, v)
    return x


def is_doubly_stochastic(w: Tensor, atol: float = 1e-6) -> bool:
    """True if w >= -atol and every row and column sums to 1 within atol."""
    w = w.detach()
    one = torch.ones((), dtype=w.dtype, device=w.device)
    return bool(
        (w >= -atol).all()
        and torch.allclose(w.sum(0), one.expand(w.shape[1]), atol=atol, rtol=0)
        and torch.allclose(w.sum(1), one.expand(w.shape[0]), atol=atol, rtol=0)
    )


def hungarian_permutation(w: Tensor) -> np.ndarray:
    """The permutation pi maximising sum_j w[j, pi[j]] (Hungarian algorithm); shape (C,)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(w.detach().cpu().double().numpy(), maximize=True)
    perm = np.empty(w.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def permutation_matrix(perm: np.ndarray | Tensor, dtype=torch.float32, device=None) -> Tensor:
    """P with P[j, perm[j]] = 1, so (P x)[j] = x[perm[j]]."""
    perm = torch.as_tensor(perm, dtype=torch.long, device=device)
    p = torch.zeros(len(perm), len(perm), dtype=dtype, device=device)
    p[torch.arange(len(perm), device=device), perm] = 1.0
    return p


# ----------------------------------------------------------------------------------------------
# Stitching layers
# ----------------------------------------------------------------------------------------------


def apply_channel_matrix(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """y[:, j, ...] = sum_k w[j, k] x[:, k, ...] (+ bias[j]): a dense map or a 1x1 convolution."""
    if x.shape[1] != w.shape[1]:
        raise DataError(
            f"stitching layer expects {w.shape[1]} input channels, got activations of shape "
            f"{tuple(x.shape)}"
        )
    if x.ndim == 2:
        return F.linear(x, w, bias)
    if x.ndim == 4:
        return F.conv2d(x, w[:, :, None, None].to(x.dtype), bias)
    out = torch.movedim(F.linear(torch.movedim(x, 1, -1), w, None), -1, 1)
    return out if bias is None else out + bias.reshape(1, -1, *([1] * (x.ndim - 2)))


class ChannelBatchNorm(nn.Module):
    """Batch norm over the channel axis of (n, C, *S) activations (n, C) included: nn.BatchNorm1d /
    nn.BatchNorm2d for any number of positions. Training: each channel normalised by its mean and
    (biased) variance over the batch's examples and positions, running statistics updated with
    `momentum` (unbiased variance, as PyTorch); evaluation: the running statistics. `affine`: a
    learned scale and shift per channel."""

    def __init__(self, channels: int, affine: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.momentum, self.eps = int(channels), float(momentum), float(eps)
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise DataError(f"batch norm of {self.channels} channels got activations of shape {tuple(x.shape)}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.channels}, affine={self.weight is not None}"


class StitchingLayer(nn.Module):
    """Base class: a channel matrix `weight_matrix()` (C_out, C_in) applied at every position,
    optionally between batch norms (`add_batch_norm`): x -> norm_after(W norm_before(x) + b).

    Subclasses may add a training `penalty()` (added to the loss) and a `project()` (called
    without gradient after every optimizer step).
    """

    bias: nn.Parameter | None

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        if channels_in < 1 or channels_out < 1:
            raise ConfigError(f"channel counts must be >= 1, got {channels_in} -> {channels_out}")
        self.channels_in = int(channels_in)
        self.channels_out = int(channels_out)
        self.bias = None
        self.norm_before: ChannelBatchNorm | None = None
        self.norm_after: ChannelBatchNorm | None = None

    def add_batch_norm(self, where: str, affine: bool = False) -> StitchingLayer:
        """Batch norm `where` ("none", "before", "after", "both") the channel map; returns self."""
        if where not in BATCH_NORMS:
            raise ConfigError(f"unknown batch norm placement {where!r}; expected one of {', '.join(BATCH_NORMS)}")
        if where in ("before", "both"):
            self.norm_before = ChannelBatchNorm(self.channels_in, affine)
        if where in ("after", "both"):
            self.norm_after = ChannelBatchNorm(self.channels_out, affine)
        return self

    @property
    def has_batch_norm(self) -> bool:
        return self.norm_before is not None or self.norm_after is not None

    def weight_matrix(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_before is not None:
            x = self.norm_before(x)
        out = apply_channel_matrix(x, self.weight_matrix(), self.bias)
        return out if self.norm_after is None else self.norm_after(out)

    def penalty(self) -> Tensor:
        return torch.zeros((), device=next(self.parameters()).device)

    def project(self) -> None:
        return None

    def extra_repr(self) -> str:
        return f"{self.channels_in} -> {self.channels_out}"


def _kaiming(shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    # the default init of nn.Linear / nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class LinearStitch(StitchingLayer):
    """Unconstrained C_out x C_in matrix (a 1x1 conv), PyTorch's default init, optional bias."""

    def __init__(self, channels_in: int, channels_out: int, bias: bool = False, generator=None):
        super().__init__(channels_in, channels_out)
        self.weight = nn.Parameter(_kaiming((channels_out, channels_in), generator))
        if bias:
            b = 1.0 / math.sqrt(channels_in)
            self.bias = nn.Parameter((torch.rand(channels_out, generator=generator) * 2 - 1) * b)

    def weight_matrix(self) -> Tensor:
        return self.weight


class LowRankStitch(StitchingLayer):
    """W = U V with V (rank x C_in), U (C_out x rank): two 1x1 convs C_in -> rank -> C_out."""

    def __init__(
        self, channels_in: int, channels_out: int, rank: int = 4, bias: bool = False, generator=None
    ):
        super().__init__(channels_in, channels_out)
        if not 1 <= rank <= min(channels_in, channels_out):
            raise ConfigError(
                f"rank must be in [1, min(C_in, C_out)] = "
                f"[1, {min(channels_in, channels_out)}], got {rank}"
            )
        self.rank = int(rank)
        self.down = nn.Parameter(_kaiming((rank, channels_in), generator))
        self.up = nn.Parameter(_kaiming((channels_out, rank), generator))
        if bias:
            self.bias = nn.Parameter(torch.zeros(channels_out))

    def weight_matrix(self) -> Tensor:
        return self.up @ self.down


class LassoStitch(StitchingLayer):
    """Dense matrix with penalty multiplier * sum |W|; at evaluation |W_jk| < zero_below -> 0."""

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        multiplier: float = 1e-3,
        zero_below: float = 1e-4,
        bias: bool = False,
        generator=None,
    ):
        super().__init__(channels_in, channels_out)
        if multiplier < 0:
            raise ConfigError(f"lasso multiplier must be >= 0, got {multiplier}")
        self.multiplier = float(multiplier)
        self.zero_below = float(zero_below)
        self.weight = nn.Parameter(_kaiming((channels_out, channels_in), generator))
        if bias:
            self.bias = nn.Parameter(torch.zeros(channels_out))

    def weight_matrix(self) -> Tensor:
        if self.training:
            return self.weight
        return self.weight * (self.weight.abs() >= self.zero_below)

    def penalty(self) -> Tensor:
        return self.multiplier * self.weight.abs().sum()

    def sparsity(self, tol: float = 1e-3) -> float:
        """Fraction of entries with |W_jk| <= tol (the original's reported sparsity)."""
        return float((self.weight.detach().abs() <= tol).float().mean())


class BirkhoffStitch(StitchingLayer):
    """W diag(s): W doubly stochastic (C x C), s >= 0 per input channel; G_ReLU stitching.

    Init (as the original): W ~ U[0, 1) then 100 Sinkhorn iterations, s = 1. Training: projected
    gradient, `project()` after each step (see module docstring); `penalty()` = -alpha ||W||_F
    (pushes W towards the vertices of the polytope, i.e. permutations). `scales_enabled=False`
    uses s = 1 (the first, permutation-only phase of the original's warm-up).
    At evaluation with `round_at_eval` (kind `permutation`) W is replaced by the Hungarian rounding
    P of W, so the map is P diag(s): output channel j = s[pi[j]] * input channel pi[j].
    """

    def __init__(
        self,
        channels: int,
        projection: str = "sinkhorn",
        sinkhorn_iters: int = 16,
        alpha: float = 0.1,
        round_at_eval: bool = False,
        generator=None,
    ):
        super().__init__(channels, channels)
        if projection not in PROJECTIONS:
            raise ConfigError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
        self.projection = projection
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.alpha = float(alpha)
        self.round_at_eval = bool(round_at_eval)
        self.scales_enabled = True
        w0 = sinkhorn_normalize(torch.rand(channels, channels, generator=generator), 100)
        self.perm = nn.Parameter(w0)
        self.scales = nn.Parameter(torch.ones(channels))
        self._duals: tuple[Tensor, Tensor] | None = None
        self._rounded: tuple[tuple[int, int], Tensor] | None = None

    def permutation(self) -> np.ndarray:
        """Hungarian rounding pi of W: the permutation maximising sum_j W[j, pi[j]]."""
        return hungarian_permutation(self.perm)

    def _hard(self) -> Tensor:
        key = (self.perm.data_ptr(), self.perm._version)
        if self._rounded is None or self._rounded[0] != key:
            p = permutation_matrix(self.permutation(), self.perm.dtype, self.perm.device)
            self._rounded = (key, p)
        return self._rounded[1]

    def weight_matrix(self) -> Tensor:
        w = self._hard() if (self.round_at_eval and not self.training) else self.perm
        if not self.scales_enabled:
            return w
        return w * self.scales[None, :]

    def penalty(self) -> Tensor:
        return -self.alpha * self.perm.norm()

    @torch.no_grad()
    def project(self) -> None:
        self.scales.clamp_min_(0.0)
        if self.projection == "sinkhorn":
            self.perm.copy_(sinkhorn_normalize(self.perm.clamp_min(0.0), self.sinkhorn_iters))
        else:
            x, self._duals = project_birkhoff(self.perm, duals=self._duals, return_duals=True)
            self.perm.copy_(x)

    def extra_repr(self) -> str:
        return (
            f"{self.channels_in}, projection={self.projection}, alpha={self.alpha}, "
            f"round_at_eval={self.round_at_eval}"
        )


@dataclass
class StitchConfig:
    """Settings of a stitching layer and of its training (defaults: the paper's configurations).

    kind: one of STITCH_KINDS. epochs, batch_size, lr: plain minibatch training on the given
    tensors (the paper: 20 epochs, batch 32, lr 1e-3, constant). optimizer: "sgd" (the original:
    no momentum) or "adam". weight_decay: on the scales s (birkhoff/permutation) or on the weights
    (other kinds), never on W. alpha: weight of -||W||_F (birkhoff/permutation). projection:
    "sinkhorn" (original, `sinkhorn_iters` steps) or "exact". perm_warmup: birkhoff/permutation
    train W alone (s = 1) for epochs // 2, then W and s for the rest at lr * scales_lr_factor
    (/ 16 with schedule "step") (only with init "default"; other kinds train in one phase). schedule:
    "constant" or "step" (see the module docstring). batch_norm: "none", "before", "after" or "both"
    (`ChannelBatchNorm`, affine iff `bias`; not with init "match").
    rank: lowrank. lasso_multiplier: lasso. bias: linear/lowrank/lasso. init: "default" (the
    original's random init) or "match" (closed form from the activations of the first
    `init_examples` training inputs, see `initialize_from_activations`; not in the original).
    seed: init and batch order.
    """

    kind: str = "linear"
    epochs: int = option(20, "epochs of stitching-layer training", flag="--stitch-epochs")
    batch_size: int = option(32, "stitching minibatch size", flag="--stitch-bs")
    lr: float = option(1e-3, "stitching learning rate", flag="--stitch-lr")
    optimizer: str = option("sgd", "sgd (no momentum, as Godfrey et al. 2022) or adam", flag="--stitch-optimizer")
    momentum: float = 0.0
    weight_decay: float = 1e-4
    alpha: float = option(0.1, "weight of -alpha·||W||_F pushing Birkhoff layers towards permutations")
    projection: str = option("sinkhorn", "Birkhoff projection after each step: sinkhorn (as Godfrey et al. 2022) or "
                                         "exact")
    sinkhorn_iters: int = 16
    perm_warmup: bool = option(True, "birkhoff/permutation: train the permutation alone (scales 1) for half the "
                                     "epochs, then with the scales (Godfrey et al. 2022; off: their --nopermwarmup)",
                               flag="--perm-warmup/--no-perm-warmup")
    scales_lr_factor: float = 1.0
    schedule: str = option("constant", "constant (the configurations of Godfrey et al. 2022, --noschedule) or step "
                                       "(their default: StepLR halving the rate every quarter of a phase; the second "
                                       "warm-up phase starts at lr/16)", flag="--stitch-schedule")
    batch_norm: str = option("none", "batch norm before, after or both around the stitching layer (Godfrey et al. "
                                     "2022's batch_norm: both), or none", flag="--stitch-bn")
    rank: int = option(4, "rank of lowrank stitching")
    lasso_multiplier: float = option(1e-3, "L1 multiplier of lasso stitching", flag="--multiplier")
    bias: bool = False
    init: str = option("default", "default (random, as Godfrey et al. 2022) or match (closed form from activations)")
    init_examples: int = 2048
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in STITCH_KINDS:
            raise ConfigError(f"unknown stitching kind {self.kind!r}; expected one of {STITCH_KINDS}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(
                f"unknown projection {self.projection!r}; expected one of {PROJECTIONS}"
            )
        if self.init not in INITS:
            raise ConfigError(f"unknown stitching init {self.init!r}; expected one of {INITS}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; expected 'sgd' or 'adam'")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --stitch-schedule {self.schedule!r}; expected {' or '.join(SCHEDULES)}")
        if self.batch_norm not in BATCH_NORMS:
            raise ConfigError(f"unknown --stitch-bn {self.batch_norm!r}; expected one of {', '.join(BATCH_NORMS)}")
        if self.batch_norm != "none" and self.init == "match":
            raise ConfigError("--init match computes the stitching layer from raw activations; it cannot be combined "
                              "with --stitch-bn (batch norm changes what the layer sees)")
        self.device = check_device(self.device)
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(
                f"need epochs >= 0, batch_size >= 1, lr > 0; "
                f"got {self.epochs}, {self.batch_size}, {self.lr}"
            )


def make_stitching_layer(
    config: StitchConfig, channels_in: int, channels_out: int | None = None
) -> StitchingLayer:
    """The stitching layer `config.kind` from C_in to C_out (default C_out = C_in) channels, with the
    batch norms of `config.batch_norm`."""
    return _make_layer(config, channels_in, channels_out).add_batch_norm(config.batch_norm, affine=config.bias)


def _make_layer(config: StitchConfig, channels_in: int, channels_out: int | None) -> StitchingLayer:
    c_out = channels_in if channels_out is None else channels_out
    gen = torch.Generator().manual_seed(config.seed)
    if config.kind == "linear":
        return LinearStitch(channels_in, c_out, bias=config.bias, generator=gen)
    if config.kind == "lowrank":
        return LowRankStitch(channels_in, c_out, rank=config.rank, bias=config.bias, generator=gen)
    if config.kind == "lasso":
        return LassoStitch(
            channels_in, c_out, multiplier=config.lasso_multiplier, bias=config.bias, generator=gen
        )
    if channels_in != c_out:
        raise ConfigError(
            f"{config.kind} stitching needs equal channel counts, got {channels_in} -> {c_out}; "
            "use kind='linear' between layers of different widths"
        )
    return BirkhoffStitch(
        channels_in,
        projection=config.projection,
        sinkhorn_iters=config.sinkhorn_iters,
        alpha=config.alpha,
        round_at_eval=config.kind == "permutation",
        generator=gen,
    )


@torch.no_grad()
def initialize_from_activations(layer: StitchingLayer, ha: Tensor, hb: Tensor) -> StitchingLayer:
    """Set `layer` to the closed-form map from A's activations ha to B's hb (n, C, *S), in place.

    birkhoff/permutation: the G_ReLU-Procrustes matching (`relu_procrustes_matching`): W = P with
    P[j, pi[j]] = 1 and s[pi[j]] = ||hb_j|| / ||ha_pi[j]||, exact when hb = ha P D.
    linear/lasso: least squares W = argmin sum over (example, position) ||W a - b||^2 (with a
    bias column when the layer has a bias). lowrank: the rank-r truncated SVD of that solution.
    """
    a = channel_rows(ha.detach().to(torch.float64).cpu())
    b = channel_rows(hb.detach().to(torch.float64).cpu())
    if isinstance(layer, BirkhoffStitch):
        m = relu_procrustes_matching(ha, hb)
        perm = torch.as_tensor(m.permutation)
        scales = torch.zeros(layer.channels_in, dtype=torch.float64)
        scales[perm] = torch.as_tensor(m.scale)
        layer.perm.copy_(permutation_matrix(m.permutation, layer.perm.dtype))
        layer.scales.copy_(scales.to(layer.scales.dtype))
        layer._duals = None
        return layer
    design = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) if layer.bias is not None else a
    sol = torch.linalg.lstsq(design, b).solution  # (C_in [+1], C_out)
    w = sol[: a.shape[1]].T
    if layer.bias is not None:
        layer.bias.copy_(sol[-1].to(layer.bias.dtype))
    if isinstance(layer, LowRankStitch):
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = sv[: layer.rank].sqrt()
        layer.up.copy_((u[:, : layer.rank] * root).to(layer.up.dtype))
        layer.down.copy_((root[:, None] * vh[: layer.rank]).to(layer.down.dtype))
    else:
        layer.weight.copy_(w.to(layer.weight.dtype))
    return layer


# ----------------------------------------------------------------------------------------------
# The stitched network
# ----------------------------------------------------------------------------------------------


class _StopForward(BaseException):
    """Raised by a forward hook to end model A's forward pass once the stitch point is reached."""


def _runs_children_in_order(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def split_sequential(model: nn.Module, name: str) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(prefix up to and including module `name`, the rest) for nested plain `nn.Sequential`s.

    Returns None when `model` (or a container on the path to `name`) is not a plain Sequential.
    The parts share modules with `model` (no copies).
    """
    if not _runs_children_in_order(model):
        return None
    head, _, rest = name.partition(".")
    names = [n for n, _ in model.named_children()]
    if head not in names:
        return None
    i = names.index(head)
    children = list(model.children())
    if not rest:
        return nn.Sequential(*children[: i + 1]), nn.Sequential(*children[i + 1 :])
    inner = split_sequential(children[i], rest)
    if inner is None:
        return None
    return nn.Sequential(*children[:i], inner[0]), nn.Sequential(inner[1], *children[i + 1 :])


class StitchedModel(nn.Module):
    """x -> model_a up to and including module `layer` -> stitch -> model_b after module `layer_b`.

    Both models are frozen (requires_grad False) and stay in eval mode whatever `train()` is called
    with; only `stitch` trains. Plain (nested) `nn.Sequential` models are split into a prefix and a
    suffix (`mode="sequential"`); any other model is run whole with forward hooks (`mode="hooks"`):
    a hook on A's module ends A's forward pass there, a hook on B's module replaces its output by
    the stitched activations (B's modules before that point run but do not influence the output).
    The module at the stitch point must be called once per forward pass. `mode="auto"` picks
    "sequential" for each model where possible. `axes`: the channel axes (of A's output at `layer`,
    of B's at `layer_b`); None: `channel_axes` of both models on the first batch seen. The stitching
    layer gets A's activations with the channel axis moved to 1, and its output goes to B with the
    channel axis moved back to B's.
    """

    def __init__(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        stitch: nn.Module,
        layer: str,
        layer_b: str | None = None,
        mode: str = "auto",
        axes: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("auto", "sequential", "hooks"):
            raise ConfigError(f"unknown stitching mode {mode!r}; expected auto, sequential or hooks")
        layer_b = layer if layer_b is None else layer_b
        for m, name, which in ((model_a, layer, "model_a"), (model_b, layer_b, "model_b")):
            names = dict(m.named_modules())
            if name not in names or not name:
                raise ConfigError(
                    f"{which} has no module named {name!r}; ReLU modules available: "
                    f"{[n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU)]}"
                )
        self.model_a = model_a
        self.model_b = model_b
        self.stitch = stitch
        self.layer = layer
        self.layer_b = layer_b
        self.axes = None if axes is None else (int(axes[0]), int(axes[1]))
        for p in list(model_a.parameters()) + list(model_b.parameters()):
            p.requires_grad_(False)
        split_a = split_sequential(model_a, layer) if mode != "hooks" else None
        split_b = split_sequential(model_b, layer_b) if mode != "hooks" else None
        if mode == "sequential" and (split_a is None or split_b is None):
            raise ConfigError(
                "mode='sequential' needs both models to be plain nn.Sequential containers down to "
                "the stitch point; use mode='hooks' (or 'auto') for other models"
            )
        # stored outside the module registry: the parts share modules with model_a / model_b
        object.__setattr__(self, "_prefix_a", None if split_a is None else split_a[0])
        object.__setattr__(self, "_suffix_b", None if split_b is None else split_b[1])
        self.train(True)

    @property
    def mode(self) -> str:
        return "sequential" if self._prefix_a is not None and self._suffix_b is not None else "hooks"

    def train(self, mode: bool = True) -> StitchedModel:
        super().train(mode)
        self.model_a.eval()
        self.model_b.eval()
        return self

    def activations_a(self, x: Tensor) -> Tensor:
        """Model A's output at the stitch point (no gradient)."""
        with torch.no_grad():
            if self._prefix_a is not None:
                return self._prefix_a(x)
            captured: list[Tensor] = []

            def grab(_m, _i, out):
                captured.append(out)
                raise _StopForward

            handle = self.model_a.get_submodule(self.layer).register_forward_hook(grab)
            try:
                self.model_a(x)
            except _StopForward:
                pass
            finally:
                handle.remove()
        if not captured:
            raise DataError(f"module {self.layer!r} of model_a was not called in its forward pass")
        return captured[0]

    def continue_b(self, h: Tensor, x: Tensor) -> Tensor:
        """Model B's output when the output of its module `layer_b` is replaced by h."""
        if self._suffix_b is not None:
            return self._suffix_b(h)
        calls = [0]

        def replace(_m, _i, out):
            calls[0] += 1
            if calls[0] > 1:
                raise ConfigError(
                    f"module {self.layer_b!r} of model_b is called more than once per forward pass; "
                    "stitch at a module that is used once (give reused activations their own module)"
                )
            if out.shape != h.shape:
                raise DataError(
                    f"stitched activations have shape {tuple(h.shape)} but module {self.layer_b!r} "
                    f"of model_b outputs {tuple(out.shape)}"
                )
            return h

        handle = self.model_b.get_submodule(self.layer_b).register_forward_hook(replace)
        try:
            out = self.model_b(x)
        finally:
            handle.remove()
        if calls[0] == 0:
            raise DataError(f"module {self.layer_b!r} of model_b was not called in its forward pass")
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.axes is None:
            self.axes = (channel_axes(self.model_a, x, [self.layer])[self.layer],
                         channel_axes(self.model_b, x, [self.layer_b])[self.layer_b])
        axis_a, axis_b = self.axes
        h = self.stitch(self.activations_a(x).movedim(axis_a, 1))
        return self.continue_b(h.movedim(1, axis_b), x)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class StitchHistory:
    """Per-epoch mean training loss (cross-entropy + penalty), phase name and learning rate of each epoch."""

    loss: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def _param_groups(layer: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the scales (birkhoff/permutation) or the weights (other kinds); none on W, the
    bias and the batch norms' scale and shift."""
    norms = [p for n, p in layer.named_parameters() if n.startswith(("norm_before.", "norm_after."))]
    if isinstance(layer, BirkhoffStitch):
        groups = [
            {"params": [layer.perm], "weight_decay": 0.0},
            {"params": [layer.scales], "weight_decay": weight_decay},
        ]
    else:
        own = [(n, p) for n, p in layer.named_parameters() if not n.startswith(("norm_before.", "norm_after."))]
        decay = [p for n, p in own if n != "bias" and p.requires_grad]
        rest = [p for n, p in own if n == "bias" and p.requires_grad]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
    if norms:
        groups.append({"params": norms, "weight_decay": 0.0})
    return groups


def _as_tensor(a, name: str) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, Tensor):
        raise DataError(f"{name}: expected a tensor or numpy array, got {type(a).__name__}")
    return a


def train_stitch(
    model: StitchedModel,
    x: Tensor,
    y: Tensor,
    config: StitchConfig | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool | Callable[[int, float], None] = False,
) -> StitchHistory:
    """Train only `model.stitch` on (x, y): minibatch loss_fn (default mean cross-entropy) +
    stitch.penalty(), optimizer step, then stitch.project().

    Phases: for birkhoff/permutation layers with `perm_warmup` (and init "default": a matched
    layer already has its scales), W alone (scales fixed to 1) for
    epochs // 2 epochs at lr, then W and scales for the remaining epochs at lr * scales_lr_factor
    (divided by 16 with schedule "step", as the original); otherwise one phase. Schedule "step":
    in each phase the rate halves every max(1, epochs of the phase // 4) epochs (StepLR, stepped
    after each epoch). Batches are reshuffled each epoch from `config.seed`; with batch norm a last
    batch of a single example is skipped (its batch statistics are undefined). `progress=True`
    shows a progress bar; a callable gets (epoch, mean loss) after every epoch.
    """
    config = config or StitchConfig()
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataError(
            f"x and y must hold the same nonzero number of examples, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
    loss_fn = loss_fn or F.cross_entropy
    device = torch.device(config.device)
    model.to(device)
    layer = model.stitch
    gen = torch.Generator().manual_seed(config.seed)
    birkhoff = isinstance(layer, BirkhoffStitch)
    if birkhoff and config.perm_warmup and config.init == "default":
        first = config.epochs // 2
        second = config.lr * config.scales_lr_factor / (16.0 if config.schedule == "step" else 1.0)
        phases = [
            ("permutation", first, config.lr, False),
            ("scales", config.epochs - first, second, True),
        ]
    else:
        phases = [("all", config.epochs, config.lr, True)]

    history = StitchHistory()
    bar = None
    if progress is True:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task("stitching", total=config.epochs)
        bar.start()
    epoch = 0
    try:
        for phase, n_epochs, lr, scales_on in phases:
            if birkhoff:
                layer.scales_enabled = scales_on
                layer.scales.requires_grad_(scales_on)
            groups = [
                g
                for g in _param_groups(layer, config.weight_decay)
                if all(p.requires_grad for p in g["params"])
            ]
            if config.optimizer == "sgd":
                opt = torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
            else:
                opt = torch.optim.Adam(groups, lr=lr)
            scheduler = (torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, n_epochs // 4), gamma=0.5)
                         if config.schedule == "step" else None)
            model.train()
            for _ in range(n_epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                total, count = 0.0, 0
                rate = opt.param_groups[0]["lr"]
                for sl in chunks(x.shape[0], config.batch_size):
                    idx = order[sl]
                    if len(idx) == 1 and getattr(layer, "has_batch_norm", False) and count:
                        continue
                    xb, yb = x[idx].to(device), y[idx].to(device)
                    loss = loss_fn(model(xb), yb) + layer.penalty()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    layer.project()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                history.loss.append(total / count)
                history.phase.append(phase)
                history.lr.append(rate)
                if scheduler is not None:
                    scheduler.step()
                epoch += 1
                if bar is not None:
                    bar.update(task, advance=1)
                elif callable(progress):
                    progress(epoch, history.loss[-1])
    finally:
        if bar is not None:
            bar.stop()
        if birkhoff:
            layer.scales.requires_grad_(True)
            layer.scales_enabled = True
        model.eval()
    return history


def evaluate_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Fraction of the n examples whose argmax prediction equals y (eval mode, exact over all n,
    not an average of per-batch accuracies). The model's mode is restored after."""
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for sl in chunks(x.shape[0], batch_size):
                pred = model(x[sl].to(device)).argmax(-1).cpu()
                correct += int((pred == y[sl].cpu()).sum())
    finally:
        model.train(was)
    return correct / x.shape[0]


def stitching_penalty(
    clean_accuracy_a: float, clean_accuracy_b: float, stitched_accuracy: float
) -> float:
    """Mean clean accuracy of the two models minus the stitched model's accuracy."""
    return 0.5 * (clean_accuracy_a + clean_accuracy_b) - stitched_accuracy


def _probe_layer(model: nn.Module, probe: Tensor, layer: str, which: str) -> tuple[Tensor, int]:
    """The output of `layer` on the probe examples, channels first, and its channel axis (one forward pass)."""
    features, axes = _extract(model, probe, [layer], len(probe), None, "cpu", None, True)
    if set(features) != {layer}:
        raise ConfigError(f"module {layer!r} of {which} is called more than once per forward pass; "
                          "stitch at a module that is used once (give reused activations their own module)")
    return features[layer], axes[layer]


def stitch_models(
    model_a: nn.Module,
    model_b: nn.Module,
    layer: str,
    x: Tensor,
    y: Tensor,
    config: StitchConfig | None = None,
    layer_b: str | None = None,
    progress: bool | Callable[[int, float], None] = False,
) -> tuple[StitchedModel, StitchHistory]:
    """Build the stitching layer `config.kind` for the shapes at `layer` / `layer_b`, wrap both
    models in a `StitchedModel` and train the layer on (x, y) with `train_stitch`."""
    config = config or StitchConfig()
    layer_b = layer if layer_b is None else layer_b
    probe = _as_tensor(x, "x")[:2]
    (ha, axis_a), (hb, axis_b) = (_probe_layer(m, probe, name, which)
                                  for m, name, which in ((model_a, layer, "model_a"), (model_b, layer_b, "model_b")))
    if ha.ndim != hb.ndim or ha.shape[2:] != hb.shape[2:]:
        raise ConfigError(
            f"cannot stitch activations with {ha.shape[1]} channels x positions {tuple(ha.shape[2:])} (model_a "
            f"{layer!r}) to {hb.shape[1]} channels x {tuple(hb.shape[2:])} (model_b {layer_b!r}): a stitching layer "
            "maps channels only, so the positions must agree"
        )
    stitch = make_stitching_layer(config, ha.shape[1], hb.shape[1])
    if config.init == "match":
        sub = _as_tensor(x, "x")[: config.init_examples]
        ha = next(iter(extract_features(model_a, sub, [layer], dtype=None, channels_first=True).values()))
        hb = next(iter(extract_features(model_b, sub, [layer_b], dtype=None, channels_first=True).values()))
        initialize_from_activations(stitch, ha, hb)
    stitched = StitchedModel(model_a, model_b, stitch, layer, layer_b, axes=(axis_a, axis_b))
    history = train_stitch(stitched, x, y, config, progress=progress)
    return stitched, history
