"""Similarity of two sets of representations of the same n examples.

Each metric family is one class with the scikit-learn / netrep contract (see `RepresentationMetric`):
settings in `__init__` (checked there), `fit(X, Y)` learns what the metric aligns, `score(X, Y)`
returns the similarity on any data of the same layers (held-out examples too) under that alignment,
1 = identical up to the metric's invariances:

    class           settings                         fit learns                     score is 1 under
    LinearCKA       debiased=False                   nothing                        orthogonal, isotropic scale, shift
    RBFCKA          bandwidth=1.0, debiased=False    nothing                        orthogonal, isotropic scale, shift
    ReLUCKA         centered=True, estimator="max"   nothing                        channel permutation x positive scale
    Procrustes      center=False                     rotation (and means)           orthogonal, isotropic scale (shift)
    AngularShape    center=True                      rotation and means             orthogonal, isotropic scale, shift
    ReLUProcrustes  (none)                           channel permutation, scales    channel permutation x positive scale

    Procrustes(center=True).fit(A_train, B_train).score(A_test, B_test)

`make_metric(name, **options)` builds one by the names of `SIMILARITIES`; `similarity_matrix` compares
every layer of one model with every layer of another. The functions (`linear_cka`, `procrustes_distance`,
`relu_procrustes_matching`, ...) are the one-shot forms: fit and score on the same data.

Features X, Y (torch tensors on any device, or numpy arrays): the first axis indexes the same n
examples in the same order; (n, d) (after a dense layer) or (n, C, *spatial) (after a convolution,
e.g. (n, C, H, W)); the two may have different widths. All arithmetic is float64 on the device of X
(float32 inputs are converted block by block where a layer is wide); no quantity is computed with a
Python loop over examples or pairs of examples.

How features are read:
- CKA family (`LinearCKA`, `RBFCKA`): each example is one vector, `x.reshape(n, -1)` (so d = C*H*W
  for conv features).
- Procrustes family (`Procrustes`, `AngularShape`, `ReLUProcrustes`): the transform acts on
  channels, the same at every spatial position (a 1x1 convolution), as in Godfrey et al. (2022); the
  rows are all (example, position) pairs: (n, C, H, W) -> (n*H*W, C).
  If the two tensors differ in spatial size, the smaller is upsampled by nearest-neighbour repetition
  (each spatial size of one must divide the other's); if they differ in channel count, the smaller is
  padded with zero channels. A 2-D (n, C) tensor compared with an (n, C', H, W) one counts as spatial
  size 1 x 1.
- G_ReLU-CKA (`ReLUCKA`) builds one kernel per model, so the two tensors may differ in any way
  except n.

References: Kornblith et al. 2019 (CKA); Song et al. 2012 (unbiased HSIC); Gretton et al. 2005
(HSIC); Ding et al. 2021 and Williams et al. 2021 (Procrustes / angular shape metric); Godfrey, Brown,
Emerson and Kvinge 2022 (G_ReLU = permutation x positive diagonal; G_ReLU-Procrustes and -CKA).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from modelsense.errors import ConfigError, DataError, shown

ArrayLike = Tensor | np.ndarray

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

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros((t.shape[0], c - t.shape[1], *t.shape[2:]))], dim=1)

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


# ----------------------------------------------------------------------------------------------
# The G_ReLU-invariant kernel
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# The metric objects: settings in __init__, fit learns the alignment, score on any data
# ----------------------------------------------------------------------------------------------


def _check_bool(owner: str, what: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{owner}: {what} must be True or False, received {shown(value)}")
    return bool(value)


def _check_bandwidth(owner: str, value: Any) -> float:
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not number or not math.isfinite(float(value)) or not value > 0:
        raise ConfigError(
            f"{owner}: bandwidth must be a finite number > 0 (a multiple of the median-heuristic "
            f"width; 1.0 is the heuristic itself), received {shown(value)}"
        )
    return float(value)


def _check_estimator(owner: str, value: Any) -> str:
    if not isinstance(value, str) or value not in RELU_KERNEL_ESTIMATORS:
        raise ConfigError(
            f"{owner}: estimator must be one of {', '.join(RELU_KERNEL_ESTIMATORS)}, received {shown(value)}"
        )
    return value


class RepresentationMetric:
    """Base of the metric objects: the scikit-learn / netrep estimator contract.

    - Settings go to `__init__`, each named there, validated there (`ConfigError` on a bad value) and
      stored under its own name (`settings()` returns them).
    - `fit(X, Y)` checks the inputs and learns what the metric aligns (Procrustes: the channel means
      and the rotation; G_ReLU-Procrustes: the channel permutation and positive scaling); the
      learned state is in attributes ending with `_`. The CKA family learns nothing: `fit` only
      checks the inputs, and `score` works unfitted.
    - `score(X, Y)` returns the similarity of X and Y under the fitted alignment, as a Python float:
      1 = identical up to the metric's invariances, smaller = less alike. X and Y may be held-out
      data (other examples than the fit's, of the same layers: the same per-example shapes).
    - `fit_score(X, Y)` = `fit(X, Y).score(X, Y)`.
    - Metrics that learn raise `ConfigError` from `score` before `fit`.

    Shapes: X (n, d) or (n, C, *spatial), Y (n, d') or (n, C', *spatial'): features of the same n
    examples in the same order (torch tensors on any device, computed in float64 there, or numpy
    arrays). How each metric reads conv features is in the module docstring.
    """

    #: whether `fit` learns an alignment (and `score` needs it)
    learns: ClassVar[bool] = False
    #: dtype the features are checked into (None: any float dtype is kept, blocks are converted)
    _dtype: ClassVar[torch.dtype | None] = torch.float64

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Names of the metric's settings: the parameters of its `__init__`."""
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def settings(self) -> dict[str, Any]:
        """{name: value} of every setting, as stored by `__init__`."""
        return {name: getattr(self, name) for name in self.setting_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    @property
    def min_examples(self) -> int:
        """Fewest examples n the metric accepts (4 for the unbiased HSIC estimator, else 2)."""
        return 2

    def fit(self, X: ArrayLike, Y: ArrayLike) -> RepresentationMetric:
        """Check X (n, ...) and Y (n, ...) and learn the alignment (if the metric has one); returns self."""
        x, y = _pair(X, Y, self.min_examples, self._dtype)
        self._fit(x, y)
        return self

    def score(self, X: ArrayLike, Y: ArrayLike) -> float:
        """Similarity of X (n, ...) and Y (n, ...) under the fitted alignment; 1 = identical up to
        the metric's invariances."""
        self._check_fitted()
        x, y = _pair(X, Y, self.min_examples, self._dtype)
        return self._score(x, y)

    def fit_score(self, X: ArrayLike, Y: ArrayLike) -> float:
        """`fit(X, Y)`, then the score on the same data."""
        return self.fit(X, Y).score(X, Y)

    def _fit(self, x: Tensor, y: Tensor) -> None:
        """Learn from checked features (state in attributes ending with `_`); nothing by default."""

    def _score(self, x: Tensor, y: Tensor) -> float:
        return self._pair_similarity(self._prepare(x), self._prepare(y))

    def _check_fitted(self) -> None:
        if self.learns and not hasattr(self, "feature_shapes_"):
            raise ConfigError(
                f"{type(self).__name__} is not fitted; call .fit(X, Y) on training features first "
                "(or .fit_score(X, Y) to fit and score the same data)"
            )

    # -- used by `similarity_matrix`: per-layer work once per layer, then once per pair ---------
    def _prepare(self, x: Tensor) -> Any:
        """What `_pair_similarity` needs of one checked feature tensor."""
        return x

    def _pair_similarity(self, a: Any, b: Any) -> float:
        """The similarity of two prepared layers; a metric that learns fits a fresh copy on them."""
        return type(self)(**self.settings()).fit_score(a, b)


# -- the CKA family: nothing to learn ----------------------------------------------------------


class LinearCKA(RepresentationMetric):
    """Linear CKA of Kornblith et al. (2019) between the flattened features.

    With X (n, d_x), Y (n, d_y) the column-centred features (conv features flattened, d = C*H*W):
        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)                  (debiased=False, HSIC_0)
    and with `debiased=True` every HSIC replaced by the unbiased HSIC_1 of Song et al. (2012) (see
    `hsic_unbiased`; needs n >= 4), in closed form from X^T Y and the row norms. Computed in feature
    space (O(n d^2)) or through the n x n Gram matrices when d > n, whichever is cheaper; float32
    inputs are converted to float64 block by block.

    Invariances: orthogonal transforms, isotropic scaling and translation of either argument, so
    Y = c X Q + 1 t^T (Q orthogonal, c > 0) gives 1. In [0, 1] (debiased: may dip
    slightly below 0); NaN if a representation is constant. Nothing to learn: `fit` checks the
    inputs, `score` needs no fit. The names "cka" and "unbiased-cka" of `make_metric`.
    """

    _dtype = None

    def __init__(self, debiased: bool = False) -> None:
        self.debiased = _check_bool("LinearCKA", "debiased", debiased)

    @property
    def min_examples(self) -> int:
        return 4 if self.debiased else 2

    def _prepare(self, x: Tensor) -> _LinearFeatures:
        return _prepare_linear(x)

    def _pair_similarity(self, a: _LinearFeatures, b: _LinearFeatures) -> float:
        return _linear_cka_prepared(a, b, self.debiased)


class RBFCKA(RepresentationMetric):
    """CKA with RBF kernels on the flattened features (Kornblith et al. 2019).

        K_ab = exp(-||x_a - x_b||^2 / (2 sigma_x^2)),  L likewise for Y with sigma_y,
        CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),
    HSIC_0 (centred Gram matrices) or, with `debiased=True`, the unbiased HSIC_1 (needs n >= 4).
    `bandwidth` sets each width relative to the median heuristic of that representation, on the
    data being scored: sigma^2 = bandwidth^2 * median_{a<b} ||x_a - x_b||^2 (see `gram_rbf`), so the
    default 1.0 is the median heuristic itself (the width "rbf-cka" has always used; `bandwidth` is
    Kornblith et al.'s `threshold`). O(n^2) memory.

    Invariances: orthogonal transforms, isotropic scaling and translation of either argument (the
    width follows the scale). Nothing to learn: `fit` checks the inputs, `score` needs no fit.
    """

    def __init__(self, bandwidth: float = 1.0, debiased: bool = False) -> None:
        self.bandwidth = _check_bandwidth("RBFCKA", bandwidth)
        self.debiased = _check_bool("RBFCKA", "debiased", debiased)

    @property
    def min_examples(self) -> int:
        return 4 if self.debiased else 2

    def _prepare(self, x: Tensor) -> Tensor:
        return gram_rbf(x, self.bandwidth)

    def _pair_similarity(self, a: Tensor, b: Tensor) -> float:
        return _cka_grams(a, b, self.debiased)


class ReLUCKA(RepresentationMetric):
    """G_ReLU-CKA of Godfrey et al. (2022): unbiased-HSIC CKA of the two `relu_kernel` matrices.

        CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)),
        K_ab = max_k <x_{a,k}, x_{b,k}> over channels k (a != b; "median": median over k),
    each channel first centred (`centered`) and scaled to unit norm over examples x positions on
    the data being scored. X (n, C, *S) and Y (n, C', *S') may differ in channels and spatial size;
    needs n >= 4.

    Invariances: permutations and positive rescalings of the channels (G_ReLU = permutation x
    positive diagonal) of either argument, not rotations; 1 when Y = X P D. Nothing to learn: `fit`
    checks the inputs, `score` needs no fit.
    """

    def __init__(self, centered: bool = True, estimator: str = "max") -> None:
        self.centered = _check_bool("ReLUCKA", "centered", centered)
        self.estimator = _check_estimator("ReLUCKA", estimator)

    @property
    def min_examples(self) -> int:
        return 4

    def _prepare(self, x: Tensor) -> Tensor:
        return relu_kernel(x, self.centered, self.estimator)

    def _pair_similarity(self, a: Tensor, b: Tensor) -> float:
        return _cka_grams(a, b, True)


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """`LinearCKA(debiased).score(x, y)`: linear CKA of x (n, ...) and y (n, ...), see `LinearCKA`."""
    return LinearCKA(debiased=debiased).score(x, y)


def unbiased_cka(x: ArrayLike, y: ArrayLike, kernel: str = "linear", bandwidth: float = 1.0) -> float:
    """CKA with the unbiased HSIC_1 estimator (Song et al. 2012; "debiased CKA"); needs n >= 4.

    kernel="linear": `LinearCKA(debiased=True)`; kernel="rbf": `RBFCKA(bandwidth, debiased=True)`.
    """
    if kernel == "linear":
        return linear_cka(x, y, debiased=True)
    if kernel == "rbf":
        return rbf_cka(x, y, bandwidth=bandwidth, debiased=True)
    raise ConfigError(f"unknown CKA kernel {kernel!r}; expected 'linear' or 'rbf'")


def rbf_cka(x: ArrayLike, y: ArrayLike, bandwidth: float = 1.0, debiased: bool = False) -> float:
    """`RBFCKA(bandwidth, debiased).score(x, y)`: CKA with median-heuristic RBF kernels, see `RBFCKA`."""
    return RBFCKA(bandwidth=bandwidth, debiased=debiased).score(x, y)


def relu_cka(x: ArrayLike, y: ArrayLike, centered: bool = True, estimator: str = "max") -> float:
    """`ReLUCKA(centered, estimator).score(x, y)`: G_ReLU-CKA of Godfrey et al. (2022), see `ReLUCKA`."""
    return ReLUCKA(centered=centered, estimator=estimator).score(x, y)


# -- orthogonal Procrustes and the angular shape metric ------------------------------------------


def _aligned_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Channel rows (m, C) of x and y after `align_channel_shapes`: one row per (example, position)."""
    x, y = align_channel_shapes(x, y)
    return channel_rows(x), channel_rows(y)


def _check_shapes(metric: RepresentationMetric, x: Tensor, y: Tensor) -> None:
    shapes = (tuple(x.shape[1:]), tuple(y.shape[1:]))
    if shapes != metric.feature_shapes_:
        raise DataError(
            f"{type(metric).__name__} was fitted on features of per-example shapes "
            f"{metric.feature_shapes_[0]} and {metric.feature_shapes_[1]}, got {shapes[0]} and {shapes[1]}; "
            "score features of the same two layers (any number of examples)"
        )


class Procrustes(RepresentationMetric):
    """Orthogonal Procrustes similarity ("ortho_procrustes" of Godfrey et al. 2022), fitted and scored.

    The transform acts on channels: A = rows(X) (m, C), B = rows(Y) (m, C), one row per (example,
    position), channel counts and spatial sizes aligned as in `align_channel_shapes`; with
    `center=True` the channel means of the fit's data, `mean_x_` and `mean_y_`, are subtracted (from
    held-out data too); then A and B are each scaled to unit Frobenius norm (by their own norms).
    `fit` learns the rotation R (C x C, orthogonal) minimising ||A R - B||_F: R = U V^T for
    A^T B = U S V^T (`rotation_`). On any data of the same layers
        score    = 1 - ||A R - B||_F / 2 = 1 - sqrt(||A||^2 + ||B||^2 - 2 <A R, B>_F) / 2,
        distance = ||A R - B||_F / 2,
    and on the fit's data <A R, B>_F = ||A^T B||_* (nuclear norm), so `fit_distance` is
    sqrt((1 - ||A^T B||_*) / 2) (`procrustes_distance`), in [0, 1/sqrt(2)] for nonnegative features.

    Invariances: Y = c X Q (Q orthogonal on channels, c > 0) gives 1, also on held-out data
    transformed by the same Q; with `center=True` also translations Y = c X Q + 1 t^T (the
    translation-invariant Procrustes distance of Ding et al. 2021, up to the factor 1/2). The
    original does not centre (`center=False`, the default). When A^T B is singular (e.g. with
    zero-padded channels) R is not unique: every choice gives the same score on the fit's data, not
    on held-out data (as netrep warns for zero padding).

    Learned: `rotation_` (C, C), `mean_x_`, `mean_y_` (C,) (zeros without centring), float64 on the
    fit's device, and `feature_shapes_` (the per-example shapes of X and Y).
    """

    learns = True

    def __init__(self, center: bool = False) -> None:
        self.center = _check_bool(type(self).__name__, "center", center)

    def _fit(self, x: Tensor, y: Tensor) -> tuple[float, float, float]:
        a, b = _aligned_rows(x, y)
        if self.center:
            mx, my = a.mean(0), b.mean(0)
            a, b = a - mx, b - my
        else:
            mx = my = a.new_zeros(a.shape[1])
        u, s, vh = torch.linalg.svd(a.T @ b)
        self.rotation_, self.mean_x_, self.mean_y_ = u @ vh, mx, my
        self.feature_shapes_ = (tuple(x.shape[1:]), tuple(y.shape[1:]))
        na, nb = float(a.norm()), float(b.norm())
        if na == 0 or nb == 0:
            return 0.0, float(na > 0), float(nb > 0)
        return float(s.sum()) / (na * nb), 1.0, 1.0  # <A R, B> = ||A^T B||_* on the fit's data

    def _cosine(self, x: Tensor, y: Tensor) -> tuple[float, float, float]:
        """(<A R, B>_F, ||A||^2, ||B||^2) for A, B of unit norm (a zero matrix stays zero)."""
        _check_shapes(self, x, y)
        a, b = _aligned_rows(x, y)
        dev = a.device
        if self.center:
            a, b = a - self.mean_x_.to(dev), b - self.mean_y_.to(dev)
        na, nb = float(a.norm()), float(b.norm())
        if na == 0 or nb == 0:
            return 0.0, float(na > 0), float(nb > 0)
        # <A R, B> = sum(R * A^T B): a C x C product, no second (m, C) array
        return float((self.rotation_.to(dev) * (a.T @ b)).sum()) / (na * nb), 1.0, 1.0

    @staticmethod
    def _similarity(cos: float, aa: float, bb: float) -> float:
        return 1.0 - Procrustes._distance(cos, aa, bb)

    @staticmethod
    def _distance(cos: float, aa: float, bb: float) -> float:
        return math.sqrt(max(aa + bb - 2.0 * cos, 0.0)) / 2.0

    def _score(self, x: Tensor, y: Tensor) -> float:
        return self._similarity(*self._cosine(x, y))

    def fit_score(self, X: ArrayLike, Y: ArrayLike) -> float:
        """`fit(X, Y)`, then the score on the same data (from the fit's singular values)."""
        return self._similarity(*self._fit(*_pair(X, Y, self.min_examples)))

    def distance(self, X: ArrayLike, Y: ArrayLike) -> float:
        """The distance of X and Y under the fitted alignment (see the class docstring)."""
        self._check_fitted()
        return self._distance(*self._cosine(*_pair(X, Y, self.min_examples)))

    def fit_distance(self, X: ArrayLike, Y: ArrayLike) -> float:
        """`fit(X, Y)`, then the distance on the same data (from the fit's singular values)."""
        return self._distance(*self._fit(*_pair(X, Y, self.min_examples)))


class AngularShape(Procrustes):
    """Angular shape metric of Williams et al. (2021) with orthogonal alignment (alpha = 1), fitted and scored.

    A, B, the fitted R and the centring as in `Procrustes` (here `center=True` by default). With
        cos(theta) = <A R, B>_F       (A, B of unit Frobenius norm),
    `score` returns cos(theta) (in [-1, 1]; 1 = identical up to the invariances) and `distance` the
    angle theta = arccos(<A R, B>_F) (in [0, pi]). On the fit's data cos(theta) = ||A^T B||_*
    (`procrustes_nuclear_similarity`) and theta is in [0, pi/2] (`angular_shape_distance`): a metric
    on representations modulo translation (with `center`), orthogonal transforms and isotropic
    scaling, so Y = c X Q + 1 t^T gives score 1 (also on held-out data transformed the same way).
    `Procrustes`' distance is sin(theta / 2).
    """

    def __init__(self, center: bool = True) -> None:
        super().__init__(center=center)

    @staticmethod
    def _similarity(cos: float, aa: float, bb: float) -> float:
        return cos

    @staticmethod
    def _distance(cos: float, aa: float, bb: float) -> float:
        return math.acos(min(max(cos, -1.0), 1.0))


def procrustes_nuclear_similarity(x: ArrayLike, y: ArrayLike, center: bool = False) -> float:
    """nu = ||A^T B||_* = max over orthogonal R of <A R, B>, A, B the unit-Frobenius channel rows.

    A = rows(x)/||rows(x)||_F (optionally column-centred first), likewise B; ||.||_* is the nuclear
    norm (sum of singular values). In [0, 1]; 1 iff y = c x R for an orthogonal R and c > 0.
    `AngularShape(center).fit_score(x, y)`.
    """
    return AngularShape(center=center).fit_score(x, y)


def procrustes_distance(x: ArrayLike, y: ArrayLike, center: bool = False) -> float:
    """Orthogonal Procrustes distance ("ortho_procrustes" of Godfrey et al. 2022), nuclear-norm form.

        d = sqrt(||A||_F^2 + ||B||_F^2 - 2 ||A^T B||_*) / 2 = min_R ||A R - B||_F / 2
          = sqrt((1 - nu) / 2)  for nonzero x, y,
    with A, B the unit-Frobenius (n*H*W, C) channel rows (channels aligned as in
    `align_channel_shapes`) and R orthogonal (C x C), acting on channels:
    `Procrustes(center).fit_distance(x, y)`. The original does not centre; `center=True` centres
    each channel first (the translation-invariant Procrustes distance of Ding et al. 2021, up to the
    factor 1/2). In [0, 1/sqrt(2)] for nonnegative features.
    """
    return Procrustes(center=center).fit_distance(x, y)


def procrustes_similarity(x: ArrayLike, y: ArrayLike, center: bool = False) -> float:
    """1 - `procrustes_distance(x, y)`, the similarity the original reports: `Procrustes(center).fit_score(x, y)`."""
    return Procrustes(center=center).fit_score(x, y)


def procrustes_rotation(x: ArrayLike, y: ArrayLike, center: bool = False) -> Tensor:
    """The orthogonal R (C x C) minimising ||A R - B||_F: R = U V^T for A^T B = U S V^T.

    A, B as in `procrustes_distance`; equals `scipy.linalg.orthogonal_procrustes(A, B)[0]`:
    `Procrustes(center).fit(x, y).rotation_`.
    """
    return Procrustes(center=center).fit(x, y).rotation_


def angular_shape_distance(x: ArrayLike, y: ArrayLike, center: bool = True) -> float:
    """Angular shape metric of Williams et al. (2021) with orthogonal alignment (alpha = 1).

        theta = arccos( ||A^T B||_* ),  A, B the centred, unit-Frobenius channel rows:
    `AngularShape(center).fit_distance(x, y)`. A metric on representations modulo translation,
    orthogonal transforms and isotropic scaling; in [0, pi/2].
    """
    return AngularShape(center=center).fit_distance(x, y)


# -- G_ReLU (permutation x positive diagonal) Procrustes ------------------------------------------


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


def _inverse_or_zero(v: Tensor) -> Tensor:
    return torch.where(v > 0, 1.0 / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))


class ReLUProcrustes(RepresentationMetric):
    """G_ReLU-Procrustes ("wreath_procrustes" of Godfrey et al. 2022), fitted and scored.

    Channels aligned as in `align_channel_shapes` (C channels after padding); rows(X), rows(Y) (m, C)
    one row per (example, position). `fit` scales each channel k to unit L2 norm over the rows
    (x_k / ||x_k||: removes any positive diagonal scaling; a zero channel stays zero), forms
    C_kl = <x_k / ||x_k||, y_l / ||y_l||> (C x C) and finds the permutation pi maximising
    sum_j C_{pi(j), j} (Hungarian algorithm):
        d = sqrt( (||A||^2 + ||B||^2 - 2 sum_j C_{pi(j), j}) / (4 C) ),
    ||A||^2, ||B||^2 the numbers of nonzero channels; with no dead channels d^2 = (1 - mean matched
    cosine) / 2. No centring (as the original). The fit's alignment is `matching_` (a
    `ChannelMatching`: pi, the positive scales ||y_j|| / ||x_pi(j)||, the cosines and d) and the fit's
    channel norms `channel_norms_x_`, `channel_norms_y_` (C,).

    `score(X, Y)` on any data of the same layers applies the fitted maps, A = rows(X)[:, pi] / ||x_pi||
    and B = rows(Y) / ||y|| with the fit's norms (so Y = X P D, D = diag(scale), maps to B = A; a
    channel that was zero in the fit gets weight 0), then scales A to Frobenius norm sqrt(number of
    x's nonzero channels in the fit), B likewise (as on the fit's data: invariant to isotropic
    scaling of the scored data), and returns
        similarity = 1 - ||A - B||_F / (2 sqrt(C)),
    equal to 1 - d on the fit's data (`relu_procrustes_similarity`); `distance(X, Y)` = 1 - score.

    Invariances: Y = X P D (P a channel permutation, D a positive diagonal) gives 1, on held-out
    data transformed by the same P and D; rotations do not.
    """

    learns = True

    def __init__(self) -> None:
        """G_ReLU-Procrustes has no settings."""

    def _fit(self, x: Tensor, y: Tensor) -> None:
        a, b = _aligned_rows(x, y)
        na, nb = a.norm(dim=0), b.norm(dim=0)
        ia, ib = _inverse_or_zero(na), _inverse_or_zero(nb)
        c = (a.T @ b) * ia[:, None] * ib[None, :]  # (C, C), rows: x channels, columns: y channels
        from scipy.optimize import linear_sum_assignment  # here: `modelsense --help` does not load scipy

        rows, cols = linear_sum_assignment(c.cpu().numpy(), maximize=True)
        perm = np.empty(c.shape[1], dtype=np.int64)
        perm[cols] = rows
        matched = c[torch.as_tensor(rows, device=c.device), torch.as_tensor(cols, device=c.device)]
        live_a, live_b = float((na > 0).sum()), float((nb > 0).sum())
        sq = live_a + live_b - 2.0 * float(matched.sum())
        dist = math.sqrt(max(sq, 0.0) / (4 * c.shape[0]))
        cos = np.empty(c.shape[1])
        cos[cols] = matched.cpu().numpy()
        na_np, nb_np = na.cpu().numpy(), nb.cpu().numpy()
        src = na_np[perm]
        scale = np.divide(nb_np, src, out=np.zeros_like(nb_np), where=src > 0)
        self.matching_ = ChannelMatching(permutation=perm, scale=scale, cosine=cos, distance=dist)
        self.channel_norms_x_, self.channel_norms_y_ = na, nb
        self.feature_shapes_ = (tuple(x.shape[1:]), tuple(y.shape[1:]))

    def fit_score(self, X: ArrayLike, Y: ArrayLike) -> float:
        """`fit(X, Y)`, then the score on the same data (1 - the fitted distance, no second pass)."""
        return self.fit(X, Y).matching_.similarity

    def _score(self, x: Tensor, y: Tensor) -> float:
        return 1.0 - self._distance(x, y)

    def _distance(self, x: Tensor, y: Tensor) -> float:
        _check_shapes(self, x, y)
        a, b = _aligned_rows(x, y)
        dev = a.device
        na, nb = self.channel_norms_x_.to(dev), self.channel_norms_y_.to(dev)
        perm = torch.as_tensor(self.matching_.permutation, device=dev)
        wa, wb = _inverse_or_zero(na)[perm], _inverse_or_zero(nb)  # weight of y channel j's pair
        # per-channel sums over the rows, with no (m, C) temporary beyond a and b
        qa, qb = torch.linalg.vector_norm(a, dim=0).pow(2)[perm], torch.linalg.vector_norm(b, dim=0).pow(2)
        cross = (a.T @ b)[perm, torch.arange(len(perm), device=dev)]
        aa, bb = float((qa * wa**2).sum()), float((qb * wb**2).sum())
        ka = math.sqrt(float((na > 0).sum()) / aa) if aa > 0 else 0.0
        kb = math.sqrt(float((nb > 0).sum()) / bb) if bb > 0 else 0.0
        sq = ka**2 * aa + kb**2 * bb - 2.0 * ka * kb * float((cross * wa * wb).sum())
        return math.sqrt(max(sq, 0.0) / (4 * len(perm)))

    def distance(self, X: ArrayLike, Y: ArrayLike) -> float:
        """||A - B||_F / (2 sqrt(C)) under the fitted alignment (= 1 - `score(X, Y)`)."""
        self._check_fitted()
        return self._distance(*_pair(X, Y, self.min_examples))

    def fit_distance(self, X: ArrayLike, Y: ArrayLike) -> float:
        """`fit(X, Y)`, then the distance on the same data (the fitted `matching_.distance`)."""
        return self.fit(X, Y).matching_.distance


def relu_procrustes_matching(x: ArrayLike, y: ArrayLike) -> ChannelMatching:
    """`ReLUProcrustes().fit(x, y).matching_`: the optimal G_ReLU alignment and the distance.

    Each channel k of x and y is scaled to unit L2 norm over (examples x positions), which removes
    any positive diagonal scaling; C_kl = <x_k, y_l> (C x C); the permutation maximising
    sum_k C_{k, pi(k)} is found with the Hungarian algorithm; then
        d = sqrt( (||X||^2 + ||Y||^2 - 2 sum_k C_{k, pi(k)}) / (4 C) ),
    where ||X||^2 counts x's nonzero channels (each has unit norm). With no dead channels,
    d^2 = (1 - mean matched cosine) / 2. No centring (as the original). d = 0 iff y = x P D for a
    permutation P and a positive diagonal D. Channel counts and spatial sizes are aligned as in
    `align_channel_shapes` (zero channels never match anything).
    """
    return ReLUProcrustes().fit(x, y).matching_


def relu_procrustes_distance(x: ArrayLike, y: ArrayLike) -> float:
    """G_ReLU-Procrustes distance (see `relu_procrustes_matching`): `ReLUProcrustes().fit_distance(x, y)`."""
    return ReLUProcrustes().fit_distance(x, y)


def relu_procrustes_similarity(x: ArrayLike, y: ArrayLike) -> float:
    """1 - G_ReLU-Procrustes distance, the similarity the original reports: `ReLUProcrustes().fit_score(x, y)`."""
    return ReLUProcrustes().fit_score(x, y)


# ----------------------------------------------------------------------------------------------
# Metrics by name; layer x layer similarity matrices
# ----------------------------------------------------------------------------------------------

#: name -> (class, settings the name fixes). Every other setting of the class is an option of the name.
_NAMED: dict[str, tuple[type[RepresentationMetric], dict[str, Any]]] = {
    "cka": (LinearCKA, {"debiased": False}),
    "unbiased-cka": (LinearCKA, {"debiased": True}),
    "rbf-cka": (RBFCKA, {}),
    "procrustes": (Procrustes, {}),
    "angular-shape": (AngularShape, {}),
    "relu-procrustes": (ReLUProcrustes, {}),
    "relu-cka": (ReLUCKA, {}),
}

#: Names accepted by `make_metric` and `similarity_matrix` (all similarities: larger means more
#: alike, 1 = identical up to the metric's invariances).
SIMILARITIES = ("cka", "unbiased-cka", "rbf-cka", "procrustes", "angular-shape", "relu-procrustes", "relu-cka")


def metric_options(name: str) -> tuple[str, ...]:
    """The options the similarity `name` takes (its class's settings that the name does not fix)."""
    if name not in _NAMED:
        raise ConfigError(f"unknown similarity {name!r}; expected one of {SIMILARITIES}")
    cls, fixed = _NAMED[name]
    return tuple(s for s in cls.setting_names() if s not in fixed)


def make_metric(name: str, **options: Any) -> RepresentationMetric:
    """An unfitted metric object for the similarity `name` (one of `SIMILARITIES`) with its options.

        cka             LinearCKA(debiased=False)     no options
        unbiased-cka    LinearCKA(debiased=True)      no options
        rbf-cka         RBFCKA(...)                   bandwidth, debiased
        relu-cka        ReLUCKA(...)                  centered, estimator
        procrustes      Procrustes(...)               center
        angular-shape   AngularShape(...)             center (the similarity is cos(theta), theta the angle)
        relu-procrustes ReLUProcrustes()              no options
    An option the name does not take is a ConfigError naming the metric, the options it takes and
    the names that take the option; a bad value is a ConfigError from the class.
    """
    own = metric_options(name)
    foreign = [k for k in options if k not in own]
    if foreign:
        def takers(option: str) -> str:
            names = [n for n in SIMILARITIES if option in metric_options(n)]
            return f"{option!r} is an option of {', '.join(names) if names else 'no similarity'}"

        takes = f"it takes {', '.join(own)}" if own else "it takes no options"
        raise ConfigError(
            f"similarity {name!r} does not take {'option' if len(foreign) == 1 else 'options'} "
            f"{', '.join(map(repr, foreign))} ({'; '.join(takers(k) for k in foreign)}); {takes}"
        )
    cls, fixed = _NAMED[name]
    try:
        return cls(**fixed, **options)
    except ConfigError as e:
        raise ConfigError(f"similarity {name!r}: {e}") from None


def similarity_matrix(
    features_a: Mapping[str, ArrayLike] | Sequence[ArrayLike],
    features_b: Mapping[str, ArrayLike] | Sequence[ArrayLike],
    metric: str | RepresentationMetric = "cka",
    diagonal_only: bool = False,
    **options: Any,
) -> np.ndarray:
    """S[i, j] = similarity(layer i of model a, layer j of model b), shape (L_a, L_b).

    `metric` is one of `SIMILARITIES` with its `options` (see `make_metric`; an option it does not
    take is a ConfigError), or a metric object (`RepresentationMetric`, no options). A metric that
    learns an alignment is fitted and scored on each pair (`fit_score`). Per-layer work (centring,
    Gram or G_ReLU kernels) is done once per layer, not once per pair. With `diagonal_only` only
    S[i, i] is computed (the rest is NaN; needs L_a == L_b), as the original does for Procrustes.
    """
    if isinstance(metric, RepresentationMetric):
        if options:
            raise ConfigError(
                f"similarity_matrix got a metric object {metric!r} and options {sorted(options)}; "
                "set the options on the object"
            )
        m = metric
    else:
        m = make_metric(metric, **options)
    la = list(features_a.values()) if isinstance(features_a, Mapping) else list(features_a)
    lb = list(features_b.values()) if isinstance(features_b, Mapping) else list(features_b)
    if not la or not lb:
        raise DataError("similarity_matrix needs at least one layer of features on each side")
    if diagonal_only and len(la) != len(lb):
        raise DataError(
            f"diagonal_only needs the same number of layers, got {len(la)} and {len(lb)}"
        )
    min_n = m.min_examples
    xs = [as_features(t, f"features_a[{i}]", min_n, None) for i, t in enumerate(la)]
    device = xs[0].device
    ys = [as_features(t, f"features_b[{j}]", min_n, None).to(device) for j, t in enumerate(lb)]
    n = xs[0].shape[0]
    for t in xs + ys:
        if t.shape[0] != n:
            raise DataError(
                f"every layer must hold the same n={n} examples, got a layer with n={t.shape[0]}"
            )
    pb = [m._prepare(t) for t in ys]
    out = np.full((len(xs), len(ys)), np.nan)
    for i, t in enumerate(xs):
        pa = m._prepare(t)
        for j in [i] if diagonal_only else range(len(ys)):
            out[i, j] = m._pair_similarity(pa, pb[j])
    return out
