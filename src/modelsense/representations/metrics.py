"""Similarity of two sets of representations of the same n examples.

Every function takes two feature arrays `x`, `y` (torch tensors on any device, or numpy arrays) whose
first axis indexes the same n examples in the same order, and returns a Python float. Features may
be (n, d) (after a dense layer) or (n, C, *spatial) (after a convolution, e.g. (n, C, H, W)); the two
arguments may have different widths. All arithmetic is float64 on the device of `x` (float32 inputs
are converted block by block where a layer is wide); no quantity is computed with a Python loop over
examples or pairs of examples.

How features are read:
- CKA family (`linear_cka`, `unbiased_cka`, `rbf_cka`): each example is one vector,
  `x.reshape(n, -1)` (so d = C*H*W for conv features).
- Procrustes family (`procrustes_distance`, `angular_shape_distance`, `relu_procrustes_*`): the
  transform acts on channels, the same at every spatial position (a 1x1 convolution), as in Godfrey et
  al. (2022); the rows are all (example, position) pairs: (n, C, H, W) -> (n*H*W, C).
  If the two tensors differ in spatial size, the smaller is upsampled by nearest-neighbour repetition
  (each spatial size of one must divide the other's); if they differ in channel count, the smaller is
  padded with zero channels. A 2-D (n, C) tensor compared with an (n, C', H, W) one counts as spatial
  size 1 x 1.
- G_ReLU-CKA (`relu_cka`) builds one kernel per model, so the two tensors may differ in any way
  except n.

References: Kornblith et al. 2019 (CKA); Song et al. 2012 (unbiased HSIC); Gretton et al. 2005
(HSIC); Ding et al. 2021 and Williams et al. 2021 (Procrustes / angular shape metric); Godfrey, Brown,
Emerson and Kvinge 2022 (G_ReLU = permutation x positive diagonal; G_ReLU-Procrustes and -CKA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from modelsense.errors import ConfigError, DataError

ArrayLike = Union[Tensor, np.ndarray]

#: Largest number of float64 entries an intermediate block may hold (2**25 = 256 MiB).
BLOCK_ENTRIES = 2**25


# ----------------------------------------------------------------------------------------------
# Input validation and reshaping
# ----------------------------------------------------------------------------------------------


def as_features(
    x: ArrayLike, name: str = "x", min_examples: int = 2, dtype: torch.dtype | None = torch.float64
) -> Tensor:
    """Validate one feature array; return it as a tensor of `dtype` on the same device.

    `dtype=None` keeps a floating dtype (no copy) and turns other dtypes into float64. Raises
    `DataError` if `x` is not a tensor/array, has fewer than 2 axes or `min_examples` rows, or
    holds NaN/inf.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise DataError(
            f"{name}: expected a torch.Tensor or numpy.ndarray of features, got {type(x).__name__}; "
            "pass the activations as an array of shape (n, d) or (n, C, H, W)"
        )
    if x.ndim < 2:
        raise DataError(
            f"{name}: expected features of shape (n, d) or (n, C, H, W), got shape {tuple(x.shape)}; "
            "for one number per example use x.reshape(-1, 1)"
        )
    if x.shape[0] < min_examples:
        raise DataError(
            f"{name}: this metric needs at least {min_examples} examples, got n={x.shape[0]}"
        )
    if x.is_complex():
        raise DataError(f"{name}: expected real-valued features, got dtype {x.dtype}")
    x = x.detach()
    if dtype is not None or not x.is_floating_point():
        x = x.to(dtype or torch.float64)
    if not bool(torch.isfinite(x.sum(dtype=torch.float64))):  # NaN/inf reach the sum; cheap
        raise DataError(f"{name}: features contain NaN or inf; check the model or the inputs")
    return x


def _pair(
    x: ArrayLike, y: ArrayLike, min_examples: int = 2, dtype: torch.dtype | None = torch.float64
) -> tuple[Tensor, Tensor]:
    x = as_features(x, "x", min_examples, dtype)
    y = as_features(y, "y", min_examples, dtype)
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"x has n={x.shape[0]} examples but y has n={y.shape[0]}; both must be computed on the "
            "same examples in the same order"
        )
    return x, y.to(x.device)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _center_columns(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _upsample_to(x: Tensor, spatial: Sequence[int]) -> Tensor:
    for axis, (have, want) in enumerate(zip(x.shape[2:], spatial), start=2):
        if have != want:
            x = x.repeat_interleave(want // have, dim=axis)
    return x


def align_channel_shapes(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Bring (n, C1, *S1) and (n, C2, *S2) to a common (n, C, *S) as Godfrey et al. (2022) do.

    Spatial: the smaller map is upsampled by nearest-neighbour repetition (integer factor per axis);
    a 2-D (n, C) tensor counts as spatial size 1 per axis. Channels: the narrower tensor is padded
    with zero channels up to C = max(C1, C2). Raises `DataError` when the spatial sizes are not
    integer multiples of each other.
    """
    if x.ndim != y.ndim:
        if x.ndim == 2:
            x = x.reshape(*x.shape, *([1] * (y.ndim - 2)))
        elif y.ndim == 2:
            y = y.reshape(*y.shape, *([1] * (x.ndim - 2)))
        else:
            raise DataError(
                f"cannot align features of shapes {tuple(x.shape)} and {tuple(y.shape)}: "
                "expected the same number of spatial axes (or a 2-D (n, C) tensor)"
            )
    sx, sy = tuple(x.shape[2:]), tuple(y.shape[2:])
    if sx != sy:
        target = tuple(max(a, b) for a, b in zip(sx, sy))
        for s in (sx, sy):
            if any(t % a for a, t in zip(s, target)):
                raise DataError(
                    f"spatial sizes {sx} and {sy} are not integer multiples of each other; "
                    "pool or crop one of the feature maps before comparing"
                )
        x, y = _upsample_to(x, target), _upsample_to(y, target)
    cx, cy = x.shape[1], y.shape[1]
    if cx != cy:
        c = max(cx, cy)
        pad = lambda t: torch.cat(  # noqa: E731
            [t, t.new_zeros((t.shape[0], c - t.shape[1], *t.shape[2:]))], dim=1
        )
        x = pad(x) if cx < c else x
        y = pad(y) if cy < c else y
    return x, y


def channel_rows(x: Tensor) -> Tensor:
    """(n, C, *S) -> (n * prod(S), C): one row per (example, position), one column per channel."""
    if x.ndim == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


# ----------------------------------------------------------------------------------------------
# HSIC estimators on Gram matrices
# ----------------------------------------------------------------------------------------------


def gram_linear(x: ArrayLike) -> Tensor:
    """Linear kernel K = X X^T of the flattened features, shape (n, n)."""
    xf = _flat(as_features(x))
    return xf @ xf.T


def gram_rbf(x: ArrayLike, bandwidth: float = 1.0) -> Tensor:
    """RBF kernel K_ab = exp(-||x_a - x_b||^2 / (2 sigma^2)), shape (n, n).

    sigma = bandwidth * sqrt(median of the squared distances ||x_a - x_b||^2 over the pairs a < b)
    (the median heuristic of Kornblith et al. 2019, whose `threshold` is `bandwidth`). The median is
    the usual one (the mean of the two middle values when the number of pairs n(n-1)/2 is even) and
    the diagonal is not included: the n zero distances of an example to itself do not pull it down.
    (Kornblith et al.'s notebook takes `np.median` over the whole n x n matrix, diagonal included, so
    its sigma is slightly smaller for small n.)
    """
    if not bandwidth > 0:
        raise ConfigError(f"rbf bandwidth must be > 0, got {bandwidth}")
    xf = _flat(as_features(x))
    sq = xf.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xf @ xf.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    n = d2.shape[0]
    pairs = d2[torch.ones(n, n, dtype=torch.bool, device=d2.device).triu_(1)]
    m = pairs.numel()
    if m == 0:
        return torch.ones_like(d2)
    # kthvalue, not torch.median (the lower middle value) nor torch.quantile (limited to 2^24 entries)
    med = (pairs.kthvalue((m + 1) // 2).values + pairs.kthvalue(m // 2 + 1).values) / 2
    if med <= 0:
        return torch.ones_like(d2)
    return torch.exp(-d2 / (2.0 * bandwidth**2 * med))


def center_gram(k: Tensor) -> Tensor:
    """H K H with H = I - 11^T/n, computed from row/column means in O(n^2)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic_biased(k: ArrayLike, l: ArrayLike) -> float:
    """HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 (Gretton et al. 2005), K, L of shape (n, n)."""
    k = as_features(k, "K")
    l = as_features(l, "L").to(k.device)
    n = k.shape[0]
    return float((center_gram(k) * center_gram(l)).sum() / (n - 1) ** 2)


def _hsic_unbiased_tensor(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    k = k.clone()
    l = l.clone()
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    k1, l1 = k.sum(1), l.sum(1)
    total = (k * l).sum() + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)
    return total / (n * (n - 3))


def hsic_unbiased(k: ArrayLike, l: ArrayLike) -> float:
    """Unbiased HSIC_1 of Song et al. (2012), in closed form, O(n^2) for Gram matrices K, L (n, n).

    With K~, L~ the Gram matrices with their diagonals set to zero and 1 the all-ones vector:
        HSIC_1 = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) (K~ 1)^T (L~ 1) ]
                 / (n (n-3)).
    Needs n >= 4.
    """
    k = as_features(k, "K", 4)
    l = as_features(l, "L", 4).to(k.device)
    if k.shape != l.shape or k.shape[0] != k.shape[1]:
        raise DataError(
            f"expected two (n, n) Gram matrices, got {tuple(k.shape)} and {tuple(l.shape)}"
        )
    return float(_hsic_unbiased_tensor(k, l))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def cka_from_grams(k: ArrayLike, l: ArrayLike, debiased: bool = False) -> float:
    """CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for given (n, n) Gram matrices.

    `debiased=False` uses HSIC_0 (centred Gram matrices), `True` the unbiased HSIC_1. Returns NaN
    when a self-similarity is not positive (e.g. a constant representation).
    """
    k = as_features(k, "K", 4 if debiased else 2)
    l = as_features(l, "L", 4 if debiased else 2).to(k.device)
    if k.shape != l.shape or k.shape[0] != k.shape[1]:
        raise DataError(
            f"expected two (n, n) Gram matrices, got {tuple(k.shape)} and {tuple(l.shape)}"
        )
    return _cka_grams(k, l, debiased)


def _cka_grams(k: Tensor, l: Tensor, debiased: bool) -> float:
    if debiased:
        kl, kk, ll = (float(_hsic_unbiased_tensor(a, b)) for a, b in ((k, l), (k, k), (l, l)))
        if kk <= 0 or ll <= 0:
            return float("nan")
        return kl / math.sqrt(kk * ll)
    kc, lc = center_gram(k), center_gram(l)
    return _ratio(float((kc * lc).sum()), float(kc.norm() * lc.norm()))


# ----------------------------------------------------------------------------------------------
# Linear CKA in feature space
# ----------------------------------------------------------------------------------------------


@dataclass
class _LinearFeatures:
    """Column-centred flattened features X (n, d) in float64, kept in the cheaper of two forms.

    d <= n: X itself (`xc`); the Gram matrix X X^T is formed only if a pair needs it.
    d > n: only the Gram matrix (n, n), accumulated over blocks of columns, so a wide conv layer
    is never held in float64.
    """

    xc: Tensor | None
    gram_: Tensor | None
    self_sq: float  # ||X^T X||_F^2 = ||X X^T||_F^2
    row_sq: Tensor  # (n,) ||x_a||^2 = diag(X X^T)

    def gram(self) -> Tensor:
        if self.gram_ is None:
            self.gram_ = self.xc @ self.xc.T
        return self.gram_


def _prepare_linear(x: Tensor) -> _LinearFeatures:
    xf = _flat(x)
    n, d = xf.shape
    if d <= n:
        xc = _center_columns(xf.to(torch.float64))
        return _LinearFeatures(xc, None, float((xc.T @ xc).pow(2).sum()), xc.pow(2).sum(1))
    gram = torch.zeros(n, n, dtype=torch.float64, device=xf.device)
    row_sq = torch.zeros(n, dtype=torch.float64, device=xf.device)
    step = max(1, BLOCK_ENTRIES // n)
    for i in range(0, d, step):
        block = _center_columns(xf[:, i : i + step].to(torch.float64))
        gram += block @ block.T
        row_sq += block.pow(2).sum(1)
    return _LinearFeatures(None, gram, float(gram.pow(2).sum()), row_sq)


def _cross_sq(a: _LinearFeatures, b: _LinearFeatures) -> float:
    """||X^T Y||_F^2 = <X X^T, Y Y^T>_F: in feature space (blocks of X's columns) when both are
    narrow, else through the Gram matrices."""
    if a.xc is None or b.xc is None:
        return float((a.gram() * b.gram()).sum())
    x, y = a.xc, b.xc
    step = max(1, BLOCK_ENTRIES // max(y.shape[1], 1))
    return float(sum((x[:, i : i + step].T @ y).pow(2).sum() for i in range(0, x.shape[1], step)))


def _linear_cka_prepared(a: _LinearFeatures, b: _LinearFeatures, debiased: bool) -> float:
    cross = _cross_sq(a, b)
    if not debiased:
        return _ratio(cross, math.sqrt(a.self_sq * b.self_sq))
    return _ratio_unbiased(
        _linear_hsic1(cross, a.row_sq, b.row_sq, len(a.row_sq)),
        _linear_hsic1(a.self_sq, a.row_sq, a.row_sq, len(a.row_sq)),
        _linear_hsic1(b.self_sq, b.row_sq, b.row_sq, len(b.row_sq)),
    )


def _linear_hsic1(cross_sq: float, ra: Tensor, rb: Tensor, n: int) -> float:
    """HSIC_1 for linear kernels of column-centred X, Y, from ||X^T Y||_F^2 and row norms.

    With centred features X^T 1 = 0, so K~ 1 = -diag(K) = -ra and 1^T K~ 1 = -sum(ra); and
    tr(K~ L~) = ||X^T Y||_F^2 - sum_a ra_a rb_a.
    """
    tr = cross_sq - float(ra @ rb)
    sa, sb = float(ra.sum()), float(rb.sum())
    total = tr + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(ra @ rb)
    return total / (n * (n - 3))


def _ratio_unbiased(kl: float, kk: float, ll: float) -> float:
    if kk <= 0 or ll <= 0:
        return float("nan")
    return kl / math.sqrt(kk * ll)


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA of Kornblith et al. (2019) between flattened features x (n, ...) and y (n, ...).

    With X, Y the column-centred (n, d_x), (n, d_y) features:
        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)             (debiased=False, HSIC_0)
    computed in feature space (O(n d^2)) or through n x n Gram matrices when d > n, whichever is
    cheaper; never with an explicit centring matrix. `debiased=True` replaces each HSIC by the
    unbiased HSIC_1 (see `hsic_unbiased`), still in closed form from X^T Y and the row norms.
    In [0, 1] (debiased: may dip slightly below 0); invariant to orthogonal transforms and isotropic
    scaling of either argument. NaN if a representation is constant.
    """
    x, y = _pair(x, y, 4 if debiased else 2, dtype=None)
    return _linear_cka_prepared(_prepare_linear(x), _prepare_linear(y), debiased)


def unbiased_cka(x: ArrayLike, y: ArrayLike, kernel: str = "linear", bandwidth: float = 1.0) -> float:
    """CKA with the unbiased HSIC_1 estimator (Song et al. 2012; "debiased CKA").

    kernel="linear": closed form in feature space (see `linear_cka(debiased=True)`);
    kernel="rbf": RBF Gram matrices (`gram_rbf(bandwidth)`) and the O(n^2) closed form of HSIC_1.
    Needs n >= 4.
    """
    if kernel == "linear":
        return linear_cka(x, y, debiased=True)
    if kernel == "rbf":
        return rbf_cka(x, y, bandwidth=bandwidth, debiased=True)
    raise ConfigError(f"unknown CKA kernel {kernel!r}; expected 'linear' or 'rbf'")


def rbf_cka(x: ArrayLike, y: ArrayLike, bandwidth: float = 1.0, debiased: bool = False) -> float:
    """CKA with RBF kernels (median-heuristic widths, see `gram_rbf`); O(n^2) memory."""
    x, y = _pair(x, y, 4 if debiased else 2)
    return _cka_grams(gram_rbf(x, bandwidth), gram_rbf(y, bandwidth), debiased)


# ----------------------------------------------------------------------------------------------
# Orthogonal Procrustes and the angular shape metric
# ----------------------------------------------------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    nrm = x.norm()
    return x / nrm if nrm > 0 else x


def _procrustes_rows(x: ArrayLike, y: ArrayLike, center: bool) -> tuple[Tensor, Tensor]:
    x, y = _pair(x, y)
    x, y = align_channel_shapes(x, y)
    a, b = channel_rows(x), channel_rows(y)
    if center:
        a, b = _center_columns(a), _center_columns(b)
    return _unit(a), _unit(b)


def procrustes_nuclear_similarity(x: ArrayLike, y: ArrayLike, center: bool = False) -> float:
    """nu = ||A^T B||_* = max over orthogonal R of <A R, B>, A, B the unit-Frobenius channel rows.

    A = rows(x)/||rows(x)||_F (optionally column-centred first), likewise B; ||.||_* is the nuclear
    norm (sum of singular values). In [0, 1]; 1 iff y = c x R for an orthogonal R and c > 0.
    """
    a, b = _procrustes_rows(x, y, center)
    return float(torch.linalg.svdvals(a.T @ b).sum())


def procrustes_distance(x: ArrayLike, y: ArrayLike, center: bool = False) -> float:
    """Orthogonal Procrustes distance ("ortho_procrustes" of Godfrey et al. 2022), nuclear-norm form.

        d = sqrt(||A||_F^2 + ||B||_F^2 - 2 ||A^T B||_*) / 2 = min_R ||A R - B||_F / 2
          = sqrt((1 - nu) / 2)  for nonzero x, y,
    with A, B the unit-Frobenius (n*H*W, C) channel rows (channels aligned as in
    `align_channel_shapes`) and R orthogonal (C x C), acting on channels. The original does not
    centre; `center=True` centres each channel first (the translation-invariant Procrustes distance
    of Ding et al. 2021, up to the factor 1/2). In [0, 1/sqrt(2)] for nonnegative features.
    """
    a, b = _procrustes_rows(x, y, center)
    nuc = torch.linalg.svdvals(a.T @ b).sum()
    sq = a.pow(2).sum() + b.pow(2).sum() - 2.0 * nuc
    return float(sq.clamp_min(0.0).sqrt() / 2.0)


def procrustes_similarity(x: ArrayLike, y: ArrayLike, center: bool = False) -> float:
    """1 - `procrustes_distance(x, y)`: the similarity the original reports."""
    return 1.0 - procrustes_distance(x, y, center)


def procrustes_rotation(x: ArrayLike, y: ArrayLike, center: bool = False) -> Tensor:
    """The orthogonal R (C x C) minimising ||A R - B||_F: R = U V^T for A^T B = U S V^T.

    A, B as in `procrustes_distance`; equals `scipy.linalg.orthogonal_procrustes(A, B)[0]`.
    """
    a, b = _procrustes_rows(x, y, center)
    u, _, vh = torch.linalg.svd(a.T @ b)
    return u @ vh


def angular_shape_distance(x: ArrayLike, y: ArrayLike, center: bool = True) -> float:
    """Angular shape metric of Williams et al. (2021) with orthogonal alignment (alpha = 1).

        theta = arccos( ||A^T B||_* ),  A, B the centred, unit-Frobenius channel rows.
    A metric on representations modulo translation, orthogonal transforms and isotropic scaling;
    in [0, pi/2].
    """
    nu = procrustes_nuclear_similarity(x, y, center)
    return float(math.acos(min(max(nu, -1.0), 1.0)))


# ----------------------------------------------------------------------------------------------
# G_ReLU (permutation x positive diagonal) metrics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelMatching:
    """Optimal G_ReLU alignment of x's channels to y's (after `align_channel_shapes` padding).

    permutation: (C,) ints; channel j of y is matched to channel permutation[j] of x, so
        x[:, permutation] * scale[:, None, ...] approximates y (exactly when y = x P D).
    scale: (C,) ||y_j|| / ||x_permutation[j]|| (norms over examples and positions; 0 if x's channel
        is zero).
    cosine: (C,) cosine of each matched channel pair.
    distance: the G_ReLU-Procrustes distance; similarity = 1 - distance.
    """

    permutation: np.ndarray
    scale: np.ndarray
    cosine: np.ndarray
    distance: float

    @property
    def similarity(self) -> float:
        return 1.0 - self.distance


def _unit_channels(rows: Tensor) -> tuple[Tensor, Tensor]:
    nrm = rows.norm(dim=0)
    return rows / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), nrm


def relu_procrustes_matching(x: ArrayLike, y: ArrayLike) -> ChannelMatching:
    """G_ReLU-Procrustes ("wreath_procrustes" of Godfrey et al. 2022) and its optimal permutation.

    Each channel k of x and y is scaled to unit L2 norm over (examples x positions), which removes
    any positive diagonal scaling; C_kl = <x_k, y_l> (C x C); the permutation maximising
    sum_k C_{k, pi(k)} is found with the Hungarian algorithm; then
        d = sqrt( (||X||^2 + ||Y||^2 - 2 sum_k C_{k, pi(k)}) / (4 C) ),
    where ||X||^2 counts x's nonzero channels (each has unit norm). With no dead channels,
    d^2 = (1 - mean matched cosine) / 2. No centring (as the original). d = 0 iff y = x P D for a
    permutation P and a positive diagonal D. Channel counts and spatial sizes are aligned as in
    `align_channel_shapes` (zero channels never match anything).
    """
    x, y = _pair(x, y)
    x, y = align_channel_shapes(x, y)
    a, na = _unit_channels(channel_rows(x))
    b, nb = _unit_channels(channel_rows(y))
    from scipy.optimize import linear_sum_assignment  # here: `modelsense --help` does not load scipy

    c = a.T @ b  # (C, C), rows: x channels, columns: y channels
    rows, cols = linear_sum_assignment(c.cpu().numpy(), maximize=True)
    perm = np.empty(c.shape[1], dtype=np.int64)
    perm[cols] = rows
    matched = c[torch.as_tensor(rows, device=c.device), torch.as_tensor(cols, device=c.device)]
    sq = a.pow(2).sum() + b.pow(2).sum() - 2.0 * matched.sum()
    dist = float((sq.clamp_min(0.0) / (4 * c.shape[0])).sqrt())
    cos = np.empty(c.shape[1])
    cos[cols] = matched.cpu().numpy()
    na_np, nb_np = na.cpu().numpy(), nb.cpu().numpy()
    src = na_np[perm]
    scale = np.divide(nb_np, src, out=np.zeros_like(nb_np), where=src > 0)
    return ChannelMatching(permutation=perm, scale=scale, cosine=cos, distance=dist)


def relu_procrustes_distance(x: ArrayLike, y: ArrayLike) -> float:
    """G_ReLU-Procrustes distance (see `relu_procrustes_matching`)."""
    return relu_procrustes_matching(x, y).distance


def relu_procrustes_similarity(x: ArrayLike, y: ArrayLike) -> float:
    """1 - G_ReLU-Procrustes distance: the similarity the original reports."""
    return relu_procrustes_matching(x, y).similarity


RELU_KERNEL_ESTIMATORS = ("max", "median")


def relu_kernel(
    x: ArrayLike, centered: bool = True, estimator: str = "max", block_entries: int = BLOCK_ENTRIES
) -> Tensor:
    """The G_ReLU-invariant kernel of Godfrey et al. (2022) ("wreath_cka"): (n, n), zero diagonal.

    Each channel k of x (n, C, *S) is centred (if `centered`) and scaled to unit norm over
    (examples x positions); then for a != b
        K_ab = max_k sum_s x[a, k, s] x[b, k, s]       (estimator="max"; "median": median over k),
    and K_aa = 0 (only off-diagonal entries enter the unbiased HSIC). A 2-D (n, C) input is a map of
    spatial size 1. Invariant to permuting and positively rescaling channels. Computed in row blocks
    holding at most `block_entries` numbers (batched matrix products, no per-example loop).
    """
    if estimator not in RELU_KERNEL_ESTIMATORS:
        raise ConfigError(
            f"unknown relu kernel estimator {estimator!r}; expected one of {RELU_KERNEL_ESTIMATORS}"
        )
    x = as_features(x)
    n, c = x.shape[:2]
    h = x.reshape(n, c, -1)
    if centered:
        h = h - h.mean(dim=(0, 2), keepdim=True)
    nrm = h.pow(2).sum(dim=(0, 2), keepdim=True).sqrt()
    h = h / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    hc = h.permute(1, 0, 2).contiguous()  # (C, n, S)
    hct = hc.transpose(1, 2)  # (C, S, n)
    k = x.new_empty((n, n))
    step = max(1, block_entries // max(c * n, 1))
    for i in range(0, n, step):
        g = torch.bmm(hc[:, i : i + step], hct)  # (C, b, n)
        k[i : i + step] = g.amax(0) if estimator == "max" else g.median(0).values
    k.fill_diagonal_(0.0)
    return k


def relu_cka(x: ArrayLike, y: ArrayLike, centered: bool = True, estimator: str = "max") -> float:
    """G_ReLU-CKA of Godfrey et al. (2022): unbiased-HSIC CKA of the two `relu_kernel` matrices.

        CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)).
    Equals 1 when y = x P D (P a channel permutation, D a positive diagonal). Needs n >= 4.
    x and y may have any channel counts and spatial sizes.
    """
    x, y = _pair(x, y, 4)
    return _cka_grams(relu_kernel(x, centered, estimator), relu_kernel(y, centered, estimator), True)


# ----------------------------------------------------------------------------------------------
# Layer x layer similarity matrices
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    prepare: Callable[[Tensor], Any]
    compare: Callable[[Any, Any], float]


def _metric(name: str, options: Mapping[str, Any]) -> _Metric:
    o = dict(options)
    if name == "cka":
        return _Metric(_prepare_linear, lambda a, b: _linear_cka_prepared(a, b, False))
    if name == "unbiased-cka":
        return _Metric(_prepare_linear, lambda a, b: _linear_cka_prepared(a, b, True))
    if name == "rbf-cka":
        bw = o.get("bandwidth", 1.0)
        deb = o.get("debiased", False)
        return _Metric(lambda t: gram_rbf(t, bw), lambda a, b: _cka_grams(a, b, deb))
    if name == "relu-cka":
        cen, est = o.get("centered", True), o.get("estimator", "max")
        return _Metric(lambda t: relu_kernel(t, cen, est), lambda a, b: _cka_grams(a, b, True))
    if name == "procrustes":
        cen = o.get("center", False)
        return _Metric(lambda t: t, lambda a, b: procrustes_similarity(a, b, cen))
    if name == "relu-procrustes":
        return _Metric(lambda t: t, relu_procrustes_similarity)
    raise ConfigError(f"unknown similarity {name!r}; expected one of {SIMILARITIES}")


#: Names accepted by `similarity_matrix` (all similarities: larger means more alike, 1 = identical
#: up to the metric's invariances).
SIMILARITIES = ("cka", "unbiased-cka", "rbf-cka", "procrustes", "relu-procrustes", "relu-cka")


def similarity_matrix(
    features_a: Mapping[str, ArrayLike] | Sequence[ArrayLike],
    features_b: Mapping[str, ArrayLike] | Sequence[ArrayLike],
    metric: str = "cka",
    diagonal_only: bool = False,
    **options: Any,
) -> np.ndarray:
    """S[i, j] = similarity(layer i of model a, layer j of model b), shape (L_a, L_b).

    `metric` is one of `SIMILARITIES`; `options` go to it (`bandwidth`, `debiased` for rbf-cka;
    `centered`, `estimator` for relu-cka; `center` for procrustes). Per-layer work (centring, Gram or
    G_ReLU kernels) is done once per layer, not once per pair. With `diagonal_only` only S[i, i] is
    computed (the rest is NaN; needs L_a == L_b), as the original does for Procrustes.
    """
    la = list(features_a.values()) if isinstance(features_a, Mapping) else list(features_a)
    lb = list(features_b.values()) if isinstance(features_b, Mapping) else list(features_b)
    if not la or not lb:
        raise DataError("similarity_matrix needs at least one layer of features on each side")
    if diagonal_only and len(la) != len(lb):
        raise DataError(
            f"diagonal_only needs the same number of layers, got {len(la)} and {len(lb)}"
        )
    m = _metric(metric, options)
    min_n = 4 if metric in ("unbiased-cka", "relu-cka") or options.get("debiased") else 2
    xs = [as_features(t, f"features_a[{i}]", min_n, None) for i, t in enumerate(la)]
    device = xs[0].device
    ys = [as_features(t, f"features_b[{j}]", min_n, None).to(device) for j, t in enumerate(lb)]
    n = xs[0].shape[0]
    for t in xs + ys:
        if t.shape[0] != n:
            raise DataError(
                f"every layer must hold the same n={n} examples, got a layer with n={t.shape[0]}"
            )
    pb = [m.prepare(t) for t in ys]
    out = np.full((len(xs), len(ys)), np.nan)
    for i, t in enumerate(xs):
        pa = m.prepare(t)
        for j in [i] if diagonal_only else range(len(ys)):
            out[i, j] = m.compare(pa, pb[j])
    return out
