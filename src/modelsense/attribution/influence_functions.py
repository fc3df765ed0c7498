"""Influence functions (Koh & Liang 2017) on the curvature layer:
`if-explicit`, `if-cg`, `if-lissa`, `if-kfac`, `if-ekfac`.

    score(i, j) = g_iᵀ (K + λ I)⁻¹ g_j,     g_i = ∇_θ l_i(θ*)

K is the curvature of the *summed* training loss Σ_i l_i (the GGN by default, `matrix="hessian"`
for the Hessian) and λ the damping, which plays the role of the prior precision δ of the summed
objective L = Σ_i l_i + (δ/2)||θ||²: with K = ∇²Σ_i l_i and λ = δ this is the first-order
leave-one-out change l_j(θ*_{-i}) − l_j(θ*) (Newton step θ*_{-i} − θ* ≈ (K + δI)⁻¹ g_i).
`damping_mode="relative"` (default) sets λ = damping · tr(K)/P, a multiple of the mean eigenvalue
(kronfluence's heuristic, whose factor 0.1 is our default); "absolute" uses λ = damping as given.
Measured on digits (MLP 64-128-128-10, LDS over 100 half-data retrainings, if-ekfac): relative
damping 0.001 → LDS 0.48, 0.01 → 0.51, 0.1 → 0.546, 0.2 → 0.550, 0.4 → 0.549, 1.0 → 0.538.

Ensembles (`n_models` > 1): the fitted model and n_models − 1 models trained from scratch by the
retraining engine (`train_config`, `model_fn`), each with its own curvature;
score(i, j) = (1/M) Σ_m g_i(θ_m)ᵀ (K_m + λ_m I)⁻¹ g_j(θ_m) (TRAK's ensembling applied to influence
functions; on digits it lifts the LDS of if-ekfac from 0.55 to 0.58 with 5 models).

How (K + λ I)⁻¹ is applied (to the test-side gradients; train-side features are the raw g_i):

    if-explicit  dense K (P x P), eigendecomposition; small models only (max_params)
    if-cg        conjugate gradients on exact matrix-free products (column-batched)
    if-lissa     the LiSSA recursion h_t = v + (I − (K̂_t + λ)/s) h_{t−1}, result h_T / s, with
                 K̂_t = (N/b)·K on a random minibatch of b examples (Agarwal et al. 2017)
    if-kfac      Kronecker-factored K (per Linear/Conv2d layer)
    if-ekfac     KFAC eigenbasis with refitted eigenvalues (George et al. 2018; kronfluence)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from modelsense.attribution.base import (
    ComputeOptions,
    FeatureAttributor,
    check_choice,
    check_int,
    check_positive,
    param_dtype,
    register,
)
from modelsense.core.functional import chunks
from modelsense.errors import ConfigError
from modelsense.progress import progress_bar

DAMPING_MODES = ("absolute", "relative")


class InfluenceFunction(FeatureAttributor):
    """Base of the `if-*` methods: a = g_i (train side), b = (K + λ I)⁻¹ g_j (test side).

    Settings:
        matrix: ggn (default) | hessian | ef (empirical Fisher) — the curvature K of Σ_i l_i.
        damping: λ (absolute) or its multiple of tr(K)/P (relative), see damping_mode.
        damping_mode: absolute | relative.
    """

    def streams(self) -> bool:
        """Reads the training data in batches by position, unless models are trained from scratch on it
        (n_models > 1: the engine takes tensors)."""
        return self.n_models == 1


    needs_curvature = True
    needs = frozenset({"recipe"})
    structure = "implicit"
    matrices: tuple[str, ...] = ("ggn", "hessian", "ef")
    curvature_chunk = 1024  # examples per pass of the curvature (matrix-free products batch many columns)
    state_attributes = ("members_", "dampings_", "curvatures_")

    def __init__(self, matrix: str = "ggn", damping: float = 0.1, damping_mode: str = "relative", n_models: int = 1,
                 train_config=None, model_fn: Callable[[int], nn.Module] | None = None, *,
                 loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.matrix = check_choice(f"method {self.name!r}: matrix", matrix, self.matrices)
        self.damping = check_positive("damping", damping, allow_zero=True)
        self.damping_mode = check_choice("damping_mode", damping_mode, DAMPING_MODES)
        self.n_models = check_int("n_models", n_models)
        self.train_config, self.model_fn = train_config, model_fn

    def _build_curvature(self, params):
        from modelsense.curvature.operators import build_curvature

        return build_curvature(self.model_, self.x_train_, self.y_train_, params=params, matrix=self.matrix,
                               structure=self.structure, chunk_size=min(self.chunk_size_, self.curvature_chunk),
                               seed=self.seed)

    def _fit(self) -> None:
        from modelsense.attribution.members import train_members

        self.members_ = [self.params_] + train_members(
            self.model_, self.params_, self.x_train_, self.y_train_, self.n_models - 1, self.train_config,
            self.model_fn, seed=self.seed, progress=self.compute.progress)
        self.curvatures_, self.dampings_ = [], []
        for params in self.members_:
            K = self._build_curvature(params)
            if self.damping_mode == "relative":
                damping = self.damping * float(K.trace()) / K.n_params
            else:
                damping = self.damping
            self.curvatures_.append(K)
            self.dampings_.append(damping)
        self.curvature_, self.damping_ = self.curvatures_[0], self.dampings_[0]

    def _get_state(self):
        from modelsense.attribution.state import curvature_state

        state = super()._get_state()
        state["members_"] = self.members_[1:]  # members_[0] is the fitted model's parameters
        state["curvatures_"] = [curvature_state(K) for K in self.curvatures_]
        return state

    def _set_state(self, state) -> None:
        from modelsense.attribution.state import restore_curvature

        self.members_ = [self.params_, *state.pop("members_")]
        self.curvatures_ = [restore_curvature(d, self.model_, self.x_train_, self.y_train_, params, self.seed)
                            for d, params in zip(state.pop("curvatures_"), self.members_)]
        super()._set_state(state)
        self.curvature_, self.damping_ = self.curvatures_[0], self.dampings_[0]

    def _inverse(self, G: Tensor, m: int = 0) -> Tensor:
        """(K_m + λ_m I)⁻¹ applied to the rows of G (n, P) -> (n, P)."""
        return self.curvatures_[m].inverse_mv(G.T.contiguous(), self.dampings_[m]).T

    def _grads(self, m: int, x: Tensor, y: Tensor) -> Tensor:
        return self._per_example_grads(self.members_[m], x, y)

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._grads(m, self.x_train_[rows], self.y_train_[rows]) for m in range(len(self.members_))]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """(K_m + λ_m I)⁻¹ g_j(θ_m) / M: the ensemble mean's 1/M on the (smaller) test side."""
        M = len(self.members_)
        return [self._inverse(self._grads(m, x, y), m) / M if M > 1 else self._inverse(self._grads(m, x, y), m)
                for m in range(M)]

    def _train_component(self, rows: slice, c: int) -> Tensor:
        return self._grads(c, self.x_train_[rows], self.y_train_[rows])

    def _test_component(self, x: Tensor, y: Tensor, c: int) -> Tensor:
        M = len(self.members_)
        b = self._inverse(self._grads(c, x, y), c)
        return b / M if M > 1 else b

    def _self_feature_pair(self, rows: slice) -> tuple[list[Tensor], list[Tensor]]:
        a = self._train_features(rows)
        M = len(self.members_)
        return a, [self._inverse(g, m) / M if M > 1 else self._inverse(g, m) for m, g in enumerate(a)]


@register("if-explicit")
class ExplicitInfluence(InfluenceFunction):
    """K exactly, as a dense P x P matrix (eigendecomposition), or — when the GGN / EF has fewer factor
    rows m than parameters (m = N·C for the GGN, N for the EF) — through the m x m Gram matrix of its
    factor rows (curvature structure `gram`: the same matrix, exact, at O(m²P) cost). The exact
    reference. Digits MLP 64-128-128-10 (P = 26122, m = 12970 rows, rank 9146): the fit takes 8-11 min
    on 2 CPU cores (float64 Gram eigendecomposition). Exact is not best at the default damping: LDS
    (50 half-data retrainings) against relative damping 0.001 / 0.01 / 0.1 / 1 / 10 / 100 is
    0.16 / 0.22 / 0.32 / 0.47 / 0.59 / 0.51, while if-ekfac gets 0.55 at 0.1; at 0.1 the two agree on
    self-influence (Spearman 0.999) but not pairwise (per test example 0.30).

    Settings: max_params (refuse when min(P, m) exceeds it; the matrix needs min(P, m)²·8 bytes).
    """

    structure = "full"
    state_attributes = (*InfluenceFunction.state_attributes, "structure_")

    def __init__(self, matrix: str = "ggn", damping: float = 0.1, damping_mode: str = "relative",
                 max_params: int = 20_000, n_models: int = 1, train_config=None,
                 model_fn: Callable[[int], nn.Module] | None = None, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(matrix, damping, damping_mode, n_models, train_config, model_fn, loss=loss, seed=seed,
                         compute=compute)
        self.max_params = check_int("max_params", max_params)

    def _build_curvature(self, params):
        from modelsense.curvature.operators import build_curvature

        P = self.model_.n_params
        rows = len(self.x_train_)
        if self.matrix == "ggn":
            with torch.no_grad():
                rows *= self.model_(params, self.x_train_[:1]).reshape(1, -1).shape[1]
        structure = "gram" if self.matrix != "hessian" and rows < P else "full"
        if min(P, rows) > self.max_params or (self.matrix == "hessian" and P > self.max_params):
            raise ConfigError(
                f"if-explicit stores a dense {'P x P' if structure == 'full' else 'm x m'} matrix; the model has "
                f"P = {P} parameters and the {self.matrix} m = {rows} factor rows, above max_params={self.max_params}. "
                "Use if-cg, if-ekfac or arnoldi, or raise max_params"
            )
        self.structure_ = structure
        return build_curvature(self.model_, self.x_train_, self.y_train_, params=params, matrix=self.matrix,
                               structure=structure, chunk_size=min(self.chunk_size_, self.curvature_chunk),
                               seed=self.seed, max_full_params=self.max_params)


@register("if-cg")
class ConjugateGradientInfluence(InfluenceFunction):
    """(K + λ I)⁻¹ g_j by conjugate gradients on exact products (all test columns at once).

    Settings: cg_tol (relative residual), cg_max_iter (None: 10·P).
    """

    structure = "implicit"
    curvature_chunk = 128

    def __init__(self, matrix: str = "ggn", damping: float = 0.1, damping_mode: str = "relative",
                 cg_tol: float = 1e-6, cg_max_iter: int | None = 200, n_models: int = 1, train_config=None,
                 model_fn: Callable[[int], nn.Module] | None = None, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(matrix, damping, damping_mode, n_models, train_config, model_fn, loss=loss, seed=seed,
                         compute=compute)
        self.cg_tol = check_positive("cg_tol", cg_tol)
        self.cg_max_iter = check_int("cg_max_iter", cg_max_iter, allow_none=True)

    def _inverse(self, G: Tensor, m: int = 0) -> Tensor:
        return self.curvatures_[m].inverse_mv(G.T.contiguous(), self.dampings_[m], tol=self.cg_tol,
                                              max_iter=self.cg_max_iter).T


@register("if-lissa")
class LissaInfluence(InfluenceFunction):
    """LiSSA: (K + λ I)⁻¹ v ≈ h_T / s with h_0 = v, h_t = v + h_{t−1} − (K̂_t h_{t−1} + λ h_{t−1}) / s.

    K̂_t = (N / b) · K(minibatch of b examples) is an unbiased estimate of K (sum reduction).
    The recursion converges when s > λ_max(K̂) + λ; `lissa_scale=None` takes s = 2·(λ_max(K) + λ)
    with λ_max from a few Lanczos steps. Settings: lissa_depth T, lissa_batch b, lissa_scale s.
    """

    structure = "implicit"
    state_attributes = (*InfluenceFunction.state_attributes, "scales_")

    def __init__(self, matrix: str = "ggn", damping: float = 0.1, damping_mode: str = "relative",
                 lissa_depth: int = 200, lissa_batch: int = 256, lissa_scale: float | None = None, n_models: int = 1,
                 train_config=None, model_fn: Callable[[int], nn.Module] | None = None, *,
                 loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(matrix, damping, damping_mode, n_models, train_config, model_fn, loss=loss, seed=seed,
                         compute=compute)
        self.lissa_depth = check_int("lissa_depth", lissa_depth)
        self.lissa_batch = check_int("lissa_batch", lissa_batch)
        self.lissa_scale = None if lissa_scale is None else check_positive("lissa_scale", lissa_scale)

    def _fit(self) -> None:
        super()._fit()
        self.scales_ = []
        for K, damping in zip(self.curvatures_, self.dampings_):
            if self.lissa_scale is None:
                top = float(K.eigen(1, tol=1e-3).eigenvalues[0])
                self.scales_.append(2.0 * (max(top, 0.0) + damping))
            else:
                self.scales_.append(float(self.lissa_scale))
        self.scale_ = self.scales_[0]

    def _set_state(self, state) -> None:
        super()._set_state(state)
        self.scale_ = self.scales_[0]

    def _inverse(self, G: Tensor, m: int = 0) -> Tensor:
        from modelsense.curvature.operators import ImplicitCurvature

        V = G.T.contiguous()
        n, b = len(self.x_train_), min(self.lissa_batch, len(self.x_train_))
        gen = torch.Generator().manual_seed(self.seed + 17)
        h = V.clone()
        for _ in range(self.lissa_depth):
            idx = torch.randperm(n, generator=gen)[:b].to(self.x_train_.device)
            K = ImplicitCurvature(self.model_, self.x_train_[idx], self.y_train_[idx], self.matrix, self.members_[m],
                                  chunk_size=min(self.chunk_size_, 128))
            h = V + h - ((n / b) * K.mv(h) + self.dampings_[m] * h) / self.scales_[m]
            if not bool(torch.isfinite(h).all()):
                raise ConfigError(f"LiSSA diverged; increase lissa_scale (now {self.scales_[m]:.3g}) or the damping")
        return (h / self.scales_[m]).T


class KroneckerInfluence(InfluenceFunction):
    """Base of `if-kfac` / `if-ekfac`: K block-diagonal, K = Q diag(vec S) Qᵀ with Q = ⊕ (Q_G ⊗ Q_A).

    score(i, j) = g̃_iᵀ diag(1 / (vec S + λ)) g̃_j with g̃ = Qᵀ g the gradients in the eigenbasis (the same
    number as g_iᵀ (K + λ I)⁻¹ g_j; each block's coordinates stay at its parameters' positions, so
    `by_module` splits exactly). The per-example gradients come straight in the eigenbasis from one
    forward and one backward pass per chunk through layer hooks (`KroneckerCurvature.example_gradients`:
    Γ_i = Σ_t g_it a_itᵀ per layer, rotated as Q_Gᵀ Γ_i Q_A), not from a vmapped gradient; with
    compute precision other than `full` the vmapped gradients (in that precision) are rotated instead.

    Settings: mc_samples (GGN only): 0 (default) the exact GGN, whose factors take C backward passes
    per example (one per column of L_i, C = classes); k >= 1 the Monte-Carlo Fisher of kronfluence,
    k backward passes per example at targets drawn from the model's predictive distribution (an
    unbiased estimate of the GGN of the likelihoods here; seeded by `seed`).
    """

    structure = "kfac"
    matrices = ("ggn", "ef")
    splits_by_module = True  # one block per layer, fallback blocks per parameter tensor: within a module

    def __init__(self, matrix: str = "ggn", damping: float = 0.1, damping_mode: str = "relative", n_models: int = 1,
                 train_config=None, model_fn: Callable[[int], nn.Module] | None = None, mc_samples: int = 0, *,
                 loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(matrix, damping, damping_mode, n_models, train_config, model_fn, loss=loss, seed=seed,
                         compute=compute)
        from modelsense.curvature.kfac import check_mc_samples

        check_mc_samples(mc_samples, self.matrix)
        self.mc_samples = int(mc_samples)

    def _build_curvature(self, params):
        from modelsense.curvature.operators import build_curvature

        return build_curvature(self.model_, self.x_train_, self.y_train_, params=params, matrix=self.matrix,
                               structure=self.structure, chunk_size=min(self.chunk_size_, self.curvature_chunk),
                               seed=self.seed, mc_samples=self.mc_samples)

    def _grads(self, m: int, x: Tensor, y: Tensor) -> Tensor:
        """g̃ = Qᵀ g per example (n, P), in the eigenbasis of member m's curvature."""
        K = self.curvatures_[m]
        if self.compute.precision != "full":
            return K.to_eigenbasis(super()._grads(m, x, y))
        return K.example_gradients(x, y, chunk_size=self.chunk_size_)

    def _inverse_eigenvalues(self, m: int) -> Tensor:
        """1 / (vec S + λ) of member m, flat (P,) (cached)."""
        K, damping = self.curvatures_[m], self.dampings_[m]
        cache = self.__dict__.setdefault("_inverse_eigenvalue_cache", {})
        key = (id(K), damping)
        if key not in cache:  # K kept with its entry, so its id is not reused while cached
            cache[key] = (K, 1.0 / (K.flat_eigenvalues() + K._shift(damping)))
        return cache[key][1]

    def _inverse(self, G: Tensor, m: int = 0) -> Tensor:
        """diag(1 / (vec S + λ)) on rows already in the eigenbasis (`_grads`)."""
        return G * self._inverse_eigenvalues(m)

    def _self_scores(self) -> Tensor:
        """(1/M) Σ_m Σ_k g̃_ik² / (S_k + λ_m), without forming the test-side rows."""
        n, M = self.n_train, len(self.members_)
        out = torch.zeros(n, dtype=param_dtype(self.params_))
        blocks = list(chunks(n, self._block_rows(self.model_.n_params * out.element_size())))
        with progress_bar(len(blocks), f"{self.name} self-influence", enabled=self.compute.progress) as bar:
            for rows in blocks:
                for m in range(M):
                    g = self._grads(m, self.x_train_[rows], self.y_train_[rows])
                    out[rows] += (g.square_() @ self._inverse_eigenvalues(m)).cpu() / M
                bar.advance(1)
        return out


@register("if-kfac")
class KfacInfluence(KroneckerInfluence):
    """K ≈ KFAC (Kronecker factors per Linear / Conv / Embedding layer; GGN or empirical Fisher)."""

    structure = "kfac"


@register("if-ekfac")
class EkfacInfluence(KroneckerInfluence):
    """K ≈ EK-FAC (KFAC eigenbasis, eigenvalues refitted to the exact per-example gradients)."""

    structure = "ekfac"
