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

grad-dot, grad-cos and tracin compute g_iᵀ g_j without per-example gradients when every trained
parameter sits in an nn.Linear with vector inputs (exact; `factored.py`): on the digits MLP this is
0.04 s for TracIn with 5 checkpoints on 1297 x 500 pairs against 1.0 s for captum's TracInCP; other
models use vmapped per-example gradients (`factored=False` forces that path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modelsense.attribution.base import (
    ComputeOptions,
    FeatureAttributor,
    check_int,
    check_positive,
    param_dtype,
    register,
)
from modelsense.core.functional import Params, chunks
from modelsense.errors import ConfigError
from modelsense.progress import progress_bar


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

    def head(self, cols: int = 8) -> Tensor:
        """The first `cols` columns of G, (d, cols): a saved state keeps them to check that the G drawn
        again from the seed at load is the same (another torch version could draw other numbers)."""
        cols = min(int(cols), self.n_params)
        G = self._cache[0] if self._cache else self._block(0, slice(0, min(self.block_cols, self.n_params)))
        return G[:, :cols].clone()

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


def _projector(att: FeatureAttributor, seed: int) -> GaussianProjector:
    """The Gaussian sketch (d = att.proj_dim) of the model's flat gradients, drawn from `seed`."""
    p = att.params_
    return GaussianProjector(att.model_.n_params, att.proj_dim, seed, dtype=param_dtype(p),
                             device=next(iter(p.values())).device)


def _check_projection(projector: GaussianProjector, saved_head: Tensor, name: str) -> None:
    """ConfigError when the sketch drawn again from its seed is not the one a saved state was fitted with."""
    if not torch.equal(projector.head(saved_head.shape[1]), saved_head.to(projector.device, projector.dtype)):
        raise ConfigError(f"{name}: the projection drawn from seed {projector.seed} differs from the saved one (this "
                          "torch draws other random numbers than the one that saved the state); fit again")


class _Sketched:
    """An attributor whose `_fit` draws a Gaussian sketch `projector_` from its seed: the saved state keeps the
    sketch's head, and loading fits again (no data pass) and checks that the same sketch was drawn."""

    def _get_state(self):
        return {"projection_head": self.projector_.head()}

    def _set_state(self, state) -> None:
        self._fit()
        _check_projection(self.projector_, state["projection_head"], self.name)


class _FactoredGradients:
    """Exact gradient inner products through the Linear-layer factorisation (`factored.py`) when every
    trained parameter belongs to an nn.Linear with vector inputs; else the generic feature path."""

    def streams(self) -> bool:
        """Reads the training data in batches by position (a Dataset is never read whole)."""
        return True


    supports_factored = True

    def _setup_factored(self) -> None:
        from modelsense.attribution.factored import linear_factors, linear_layers

        self.layers_ = None
        if self.factored and self.supports_factored:
            layers = linear_layers(self.model_)
            if layers is not None and linear_factors(self.model_, layers, self.params_, self.x_train_[:1],
                                                     self.y_train_[:1], 1) is not None:
                self.layers_ = layers

    def _factored_components(self) -> list[tuple[Params, float]]:
        return [(self.params_, 1.0)]

    def _factors(self, params: Params, x: Tensor, y: Tensor):
        from modelsense.attribution.factored import linear_factors

        return linear_factors(self.model_, self.layers_, params, x, y, self.chunk_size_)

    def _normalise(self, block: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """The score from the Gram block and the gradient norms of its rows and columns."""
        return block

    def _self_value(self, sq_norm: Tensor) -> Tensor:
        """The self-score from ||g_i||²."""
        return sq_norm

    def _scores(self, x_test: Tensor, y_test: Tensor, out) -> Tensor:
        if getattr(self, "layers_", None) is None:
            return super()._scores(x_test, y_test, out)
        from modelsense.attribution.factored import factored_gram, factored_sq_norms

        n, m = self.n_train, len(x_test)
        result = self._allocate((n, m), param_dtype(self.params_), out)
        comps = self._factored_components()
        train_blocks, test_blocks = list(chunks(n, self.compute.block_size)), list(chunks(m, self.compute.block_size))
        with progress_bar(len(comps) * len(train_blocks), f"{self.name} scores", enabled=self.compute.progress) as bar:
            for c, (params, weight) in enumerate(comps):
                tr = self._factors(params, self.x_train_, self.y_train_)
                te = self._factors(params, x_test, y_test)
                tr_norm, te_norm = (
                    factored_sq_norms(self.layers_, tr).sqrt(),
                    factored_sq_norms(self.layers_, te).sqrt(),
                )
                for rows in train_blocks:
                    for cols in test_blocks:
                        block = factored_gram(self.layers_, tr.rows(rows), te.rows(cols))
                        block = self._normalise(block, tr_norm[rows], te_norm[cols])
                        block = (block if weight == 1.0 else weight * block).detach().to("cpu", result.dtype)
                        if c == 0:
                            result[rows, cols] = block
                        else:
                            result[rows, cols] += block
                    bar.advance(1)
        self._flush()
        return result

    def _module_scores(self, x_test: Tensor, y_test: Tensor) -> dict[str, Tensor]:
        """Per module (one per Linear layer here): the layer's term of `factored_gram`, normalised and
        weighted as the total."""
        if getattr(self, "layers_", None) is None:
            return super()._module_scores(x_test, y_test)
        from modelsense.attribution.factored import LinearFactors, factored_gram, factored_sq_norms

        names = {id(mod): name for name, mod in self.model_.module.named_modules()}
        n, m = self.n_train, len(x_test)
        results = self._module_results((n, m))
        train_blocks, test_blocks = list(chunks(n, self.compute.block_size)), list(chunks(m, self.compute.block_size))
        for params, weight in self._factored_components():
            tr = self._factors(params, self.x_train_, self.y_train_)
            te = self._factors(params, x_test, y_test)
            tr_norm, te_norm = factored_sq_norms(self.layers_, tr).sqrt(), factored_sq_norms(self.layers_, te).sqrt()
            for k, layer in enumerate(self.layers_):
                out = results[names[id(layer.module)]]
                for rows in train_blocks:
                    for cols in test_blocks:
                        left = LinearFactors([tr.inputs[k][rows]], [tr.grads[k][rows]])
                        right = LinearFactors([te.inputs[k][cols]], [te.grads[k][cols]])
                        block = self._normalise(factored_gram([layer], left, right), tr_norm[rows], te_norm[cols])
                        out[rows, cols] += (weight * block).detach().to("cpu", out.dtype)
        return results

    def _self_scores(self) -> Tensor:
        if getattr(self, "layers_", None) is None:
            return super()._self_scores()
        from modelsense.attribution.factored import factored_sq_norms

        total = 0
        for params, weight in self._factored_components():
            sq = factored_sq_norms(self.layers_, self._factors(params, self.x_train_, self.y_train_))
            total = total + weight * self._self_value(sq)
        return total.detach().cpu()


@register("grad-dot")
class GradientDot(_FactoredGradients, FeatureAttributor):
    """score(i, j) = g_iᵀ g_j at the trained parameters (influence with H = I).

    Settings: factored (default True): for networks whose trained parameters all sit in nn.Linear
    layers with vector inputs, compute g_iᵀ g_j exactly from layer inputs and output gradients
    (`factored.py`) instead of materialising per-example gradients.
    """

    symmetric = True
    splits_by_module = True

    def __init__(self, factored: bool = True, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.factored = bool(factored)

    def _fit(self) -> None:
        self._setup_factored()

    def _set_state(self, state) -> None:
        super()._set_state(state)
        self._setup_factored()

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        return self._per_example_grads(self.params_, x, y)

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._grads(self.x_train_[rows], self.y_train_[rows])]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [self._grads(x, y)]


@register("grad-cos")
class GradientCosine(GradientDot):
    """score(i, j) = cos(g_i, g_j) (zero gradients give 0); the self-score is 1 for every example."""

    informative_self = False

    def _normalise(self, block: Tensor, left: Tensor, right: Tensor) -> Tensor:
        tiny = torch.finfo(block.dtype).tiny ** 0.5
        return block / (left.clamp_min(tiny).unsqueeze(1) * right.clamp_min(tiny).unsqueeze(0))

    def _self_value(self, sq_norm: Tensor) -> Tensor:
        return torch.ones_like(sq_norm)

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        g = super()._grads(x, y)
        return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny ** 0.5)


@register("randproj")
class RandomProjection(_Sketched, GradientDot):
    """score(i, j) = (G g_i)ᵀ (G g_j) with a Gaussian sketch G (d × P, entries N(0, 1/d)).

    Settings: proj_dim d (the original's `--randproj_dim`, default 20 there; 256 here).
    """

    supports_factored = False
    splits_by_module = False  # G mixes the parameters of every module

    def __init__(self, proj_dim: int = 256, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(factored=False, loss=loss, seed=seed, compute=compute)
        self.proj_dim = check_int("proj_dim", proj_dim)

    def _fit(self) -> None:
        self.projector_ = _projector(self, self.seed)

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        return self.projector_(self._per_example_grads(self.params_, x, y))


def checkpoints_from_fit(result) -> tuple[list[Params], list[float]]:
    """(parameters, learning rate) of every epoch checkpoint of a `modelsense.training.Fit`.

    The checkpoint after epoch E (key `epoch_E`, E >= 1) is weighted by the learning rate used in
    that epoch (its mean over the epoch's steps where the schedule changes within an epoch,
    `training.config.learning_rate`); `epoch_0` (the initialisation) is left out.
    """
    from modelsense.training.config import learning_rate, steps_per_epoch

    cfg = result.config
    steps = steps_per_epoch(result.n_train, cfg.bs)
    items = []
    for key, params in result.checkpoints.items():
        if key.startswith("epoch_") and int(key.split("_")[1]) >= 1:
            e = int(key.split("_")[1])
            rates = [
                learning_rate(cfg, e - 1, s, steps) for s in range(steps if cfg.schedule == "warmup_cosine" else 1)
            ]
            items.append((e, params, sum(rates) / len(rates)))
    if not items:
        raise ConfigError("the fit has no epoch checkpoints after epoch 0; train with checkpoint_epochs=(...)")
    items.sort(key=lambda t: t[0])
    return [p for _, p, _ in items], [lr for _, _, lr in items]


def tracin_checkpoint_epochs(epochs: int, num_ckpt: int = 5) -> tuple[int, ...]:
    """The original's schedule: num_ckpt checkpoints evenly over the second half of training."""
    half = epochs / 2
    return tuple(sorted({min(epochs, max(1, round(half + (k + 1) * half / num_ckpt))) for k in range(num_ckpt)}))


@register("tracin")
class TracIn(_FactoredGradients, FeatureAttributor):
    """TracInCP: score(i, j) = Σ_t η_t g_i(θ_t)ᵀ g_j(θ_t) over checkpoints θ_t with learning rates η_t.

    Settings:
        checkpoints: parameter dicts (name -> tensor) of the training trajectory (e.g. from
            `checkpoints_from_fit(fit_result)`); None: the trained parameters alone (= grad-dot).
        learning_rates: η_t per checkpoint (default 1 each).
        lr_weighted: False drops η_t (the GEX original's `tracinrp`).
    """

    needs = frozenset({"checkpoints"})
    splits_by_module = True

    def __init__(self, checkpoints: Sequence[Params] | None = None, learning_rates: Sequence[float] | None = None,
                 lr_weighted: bool = True, factored: bool = True, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.factored = bool(factored)
        if checkpoints is not None and len(checkpoints) == 0:
            raise ConfigError("checkpoints is empty; pass at least one parameter dict or None")
        if checkpoints is not None and not all(isinstance(c, Mapping) for c in checkpoints):
            raise ConfigError("checkpoints must be parameter dicts (name -> tensor), e.g. from checkpoints_from_fit")
        if learning_rates is not None:
            if checkpoints is None or len(learning_rates) != len(checkpoints):
                raise ConfigError(f"got {len(learning_rates)} learning rates for "
                                  f"{0 if checkpoints is None else len(checkpoints)} checkpoints")
            learning_rates = [
                check_positive("a checkpoint learning rate", lr, allow_zero=True) for lr in learning_rates
            ]
        self.checkpoints = None if checkpoints is None else list(checkpoints)
        self.learning_rates = learning_rates
        self.lr_weighted = bool(lr_weighted)

    def _trajectory(self) -> list[Params]:
        """The parameter snapshots θ_t: the `checkpoints` setting, else the trained parameters."""
        return self.checkpoints or [self.params_]

    def _fit(self) -> None:
        names = list(self.params_)
        dtype, device = param_dtype(self.params_), next(iter(self.params_.values())).device
        ckpts = self._trajectory()
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
        self._setup_factored()

    def _set_state(self, state) -> None:
        """Nothing fitted beyond the checkpoints (a setting, saved with the settings)."""
        self._fit()

    def _factored_components(self) -> list[tuple[Params, float]]:
        return list(zip(self.checkpoint_params_, self.weights_))

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
class TracInRandomProjection(_Sketched, TracIn):
    """TracIn on Gaussian sketches: score(i, j) = Σ_t η_t (G g_i(θ_t))ᵀ (G g_j(θ_t)), one G for all t."""

    supports_factored = False
    splits_by_module = False  # G mixes the parameters of every module

    def __init__(self, checkpoints: Sequence[Params] | None = None, learning_rates: Sequence[float] | None = None,
                 lr_weighted: bool = True, proj_dim: int = 256, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(
            checkpoints, learning_rates, lr_weighted, factored=False, loss=loss, seed=seed, compute=compute
        )
        self.proj_dim = check_int("proj_dim", proj_dim)

    def _fit(self) -> None:
        super()._fit()
        self.projector_ = _projector(self, self.seed)

    def _project(self, g: Tensor) -> Tensor:
        return self.projector_(g)
