"""Gradient-similarity methods: `grad-dot`, `grad-cos`, `randproj`, `tracin`, `tracin-rp`.

With g_i = ∇_θ l_i(θ*) (per-example loss gradient, flat (P,)):

    grad-dot    score(i, j) = g_iᵀ g_j                                 (H ≈ I)
    grad-cos    score(i, j) = g_iᵀ g_j / (||g_i|| ||g_j||)             (self-score ≡ 1)
    randproj    score(i, j) = (G g_i)ᵀ (G g_j),  G ∈ R^{d×P}, G_kp ~ N(0, 1/d)
                (E[GᵀG] = I, so an unbiased sketch of grad-dot; the GEX original's `randproj`
                with one scale for self- and cross-influence: the sum over the d coordinates)
    tracin      score(i, j) = Σ_t η_t g_i(θ_t)ᵀ g_j(θ_t)               (TracInCP, Pruthi et al. 2020)
    tracin-rp   score(i, j) = Σ_t η_t (G g_i(θ_t))ᵀ (G g_j(θ_t))       (the original's `tracinrp`,
                which leaves out η_t; `lr_weighted=False` restores that)

Signs follow the package convention (positive = i helps j): a gradient step on i with learning
rate η lowers l_j by η g_iᵀ g_j to first order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from modelsense.attribution.base import FeatureAttributor, check_positive, param_dtype, register
from modelsense.core.functional import Params, chunks
from modelsense.errors import ConfigError


class GaussianProjector:
    """x ↦ x Gᵀ for a fixed Gaussian G ∈ R^{d×P} with entries N(0, 1/d), pure PyTorch.

    G is generated in column blocks of `block_cols` from generators seeded by (seed, block), so it
    is reproducible and never needs more than d·block_cols numbers at once (cached whole when
    d·P·itemsize <= `cache_bytes`).
    """

    def __init__(self, n_params: int, dim: int, seed: int = 0, block_cols: int = 65536,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 cache_bytes: int = 256 * 2**20) -> None:
        if dim < 1:
            raise ConfigError(f"projection dimension must be >= 1, received {dim}")
        self.n_params, self.dim, self.seed = int(n_params), int(dim), int(seed)
        self.block_cols, self.dtype, self.device = int(block_cols), dtype, torch.device(device)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self._cache: list[Tensor] | None = None
        if self.dim * self.n_params * itemsize <= cache_bytes:
            self._cache = [self._block(b, s) for b, s in enumerate(chunks(self.n_params, self.block_cols))]

    def _block(self, b: int, cols: slice) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        G = torch.randn(self.dim, cols.stop - cols.start, generator=gen, dtype=torch.float64)
        return (G / math.sqrt(self.dim)).to(self.device, self.dtype)

    def matrix(self) -> Tensor:
        """G as a dense (d, P) tensor (tests and small problems)."""
        return torch.cat([self._cache[b] if self._cache else self._block(b, s)
                          for b, s in enumerate(chunks(self.n_params, self.block_cols))], dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        """(n, P) -> (n, d)."""
        if x.shape[-1] != self.n_params:
            raise ConfigError(f"projector expects vectors of length {self.n_params}, received {x.shape[-1]}")
        out = torch.zeros(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        for b, s in enumerate(chunks(self.n_params, self.block_cols)):
            G = self._cache[b] if self._cache else self._block(b, s)
            out += x[:, s] @ G.T.to(x.dtype)
        return out


@register("grad-dot")
class GradientDot(FeatureAttributor):
    """score(i, j) = g_iᵀ g_j at the trained parameters (influence with H = I)."""

    symmetric = True

    def __init__(self, **common) -> None:
        super().__init__(**common)

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        return self._per_example_grads(self.params_, x, y)

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._grads(self.x_train_[rows], self.y_train_[rows])]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [self._grads(x, y)]


@register("grad-cos")
class GradientCosine(GradientDot):
    """score(i, j) = cos(g_i, g_j) (zero gradients give 0); the self-score is 1 for every example."""

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        g = super()._grads(x, y)
        return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny ** 0.5)


@register("randproj")
class RandomProjection(GradientDot):
    """score(i, j) = (G g_i)ᵀ (G g_j) with a Gaussian sketch G (d × P, entries N(0, 1/d)).

    Settings: proj_dim d (the original's `--randproj_dim`, default 20 there; 256 here).
    """

    def __init__(self, proj_dim: int = 256, **common) -> None:
        super().__init__(**common)
        if int(proj_dim) < 1:
            raise ConfigError(f"proj_dim must be >= 1, received {proj_dim}")
        self.proj_dim = int(proj_dim)

    def _fit(self) -> None:
        p = self.params_
        self.projector_ = GaussianProjector(self.model_.n_params, self.proj_dim, self.seed, dtype=param_dtype(p),
                                            device=next(iter(p.values())).device)

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        return self.projector_(self._per_example_grads(self.params_, x, y))


def checkpoints_from_fit(result) -> tuple[list[Params], list[float]]:
    """(parameters, learning rate) of every epoch checkpoint of a `modelsense.training.Fit`.

    The checkpoint after epoch E (key `epoch_E`, E >= 1) is weighted by the learning rate used in
    that epoch, cosine_lr(cfg, E - 1); `epoch_0` (the initialisation) is left out.
    """
    from modelsense.training.config import cosine_lr

    items = []
    for key, params in result.checkpoints.items():
        if key.startswith("epoch_") and int(key.split("_")[1]) >= 1:
            e = int(key.split("_")[1])
            items.append((e, params, cosine_lr(result.config, e - 1)))
    if not items:
        raise ConfigError("the fit has no epoch checkpoints after epoch 0; train with checkpoint_epochs=(...)")
    items.sort(key=lambda t: t[0])
    return [p for _, p, _ in items], [lr for _, _, lr in items]


def tracin_checkpoint_epochs(epochs: int, num_ckpt: int = 5) -> tuple[int, ...]:
    """The original's schedule: num_ckpt checkpoints evenly over the second half of training."""
    half = epochs / 2
    return tuple(sorted({min(epochs, max(1, round(half + (k + 1) * half / num_ckpt))) for k in range(num_ckpt)}))


@register("tracin")
class TracIn(FeatureAttributor):
    """TracInCP: score(i, j) = Σ_t η_t g_i(θ_t)ᵀ g_j(θ_t) over checkpoints θ_t with learning rates η_t.

    Settings:
        checkpoints: parameter dicts (name -> tensor) of the training trajectory (e.g. from
            `checkpoints_from_fit(fit_result)`); None: the trained parameters alone (= grad-dot).
        learning_rates: η_t per checkpoint (default 1 each).
        lr_weighted: False drops η_t (the GEX original's `tracinrp`).
    """

    def __init__(self, checkpoints: Sequence[Params] | None = None, learning_rates: Sequence[float] | None = None,
                 lr_weighted: bool = True, **common) -> None:
        super().__init__(**common)
        if checkpoints is not None and len(checkpoints) == 0:
            raise ConfigError("checkpoints is empty; pass at least one parameter dict or None")
        if learning_rates is not None:
            if checkpoints is None or len(learning_rates) != len(checkpoints):
                raise ConfigError(f"got {len(learning_rates)} learning rates for "
                                  f"{0 if checkpoints is None else len(checkpoints)} checkpoints")
            for lr in learning_rates:
                check_positive("a checkpoint learning rate", lr, allow_zero=True)
        self.checkpoints = checkpoints
        self.learning_rates = learning_rates
        self.lr_weighted = bool(lr_weighted)

    def _fit(self) -> None:
        names = list(self.params_)
        dtype, device = param_dtype(self.params_), next(iter(self.params_.values())).device
        ckpts = self.checkpoints or [self.params_]
        self.checkpoint_params_ = []
        for k, c in enumerate(ckpts):
            missing = [n for n in names if n not in c]
            if missing:
                raise ConfigError(f"checkpoint {k} lacks parameters {missing[:3]} of the model")
            bad = [n for n in names if tuple(c[n].shape) != tuple(self.params_[n].shape)]
            if bad:
                raise ConfigError(f"checkpoint {k}: parameter {bad[0]} has shape {tuple(c[bad[0]].shape)}, "
                                  f"the model's is {tuple(self.params_[bad[0]].shape)}")
            self.checkpoint_params_.append({n: c[n].detach().to(device, dtype) for n in names})
        lrs = self.learning_rates if (self.learning_rates is not None and self.lr_weighted) else [1.0] * len(ckpts)
        self.weights_ = [float(lr) for lr in lrs]

    def _project(self, g: Tensor) -> Tensor:
        return g

    def _component(self, x: Tensor, y: Tensor, c: int) -> Tensor:
        return self._project(self._per_example_grads(self.checkpoint_params_[c], x, y))

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._train_component(rows, c) for c in range(len(self.checkpoint_params_))]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [self._test_component(x, y, c) for c in range(len(self.checkpoint_params_))]

    def _train_component(self, rows: slice, c: int) -> Tensor:
        return self._component(self.x_train_[rows], self.y_train_[rows], c)

    def _test_component(self, x: Tensor, y: Tensor, c: int) -> Tensor:
        """η_c g_j(θ_c): the learning rate on the test side (no copy of the larger train side)."""
        g = self._component(x, y, c)
        return g if self.weights_[c] == 1.0 else self.weights_[c] * g

    def _self_feature_pair(self, rows: slice) -> tuple[list[Tensor], list[Tensor]]:
        a = self._train_features(rows)
        return a, [g if w == 1.0 else w * g for g, w in zip(a, self.weights_)]


@register("tracin-rp")
class TracInRandomProjection(TracIn):
    """TracIn on Gaussian sketches: score(i, j) = Σ_t η_t (G g_i(θ_t))ᵀ (G g_j(θ_t)), one G for all t."""

    def __init__(self, checkpoints: Sequence[Params] | None = None, learning_rates: Sequence[float] | None = None,
                 lr_weighted: bool = True, proj_dim: int = 256, **common) -> None:
        super().__init__(checkpoints, learning_rates, lr_weighted, **common)
        if int(proj_dim) < 1:
            raise ConfigError(f"proj_dim must be >= 1, received {proj_dim}")
        self.proj_dim = int(proj_dim)

    def _fit(self) -> None:
        super()._fit()
        self.projector_ = GaussianProjector(self.model_.n_params, self.proj_dim, self.seed,
                                            dtype=param_dtype(self.params_), device=next(iter(self.params_.values())).device)

    def _project(self, g: Tensor) -> Tensor:
        return self.projector_(g)
