"""`trak`: TRAK (Park et al. 2023) with a pure-PyTorch Gaussian projection and an ensemble of
independently trained models from the retraining engine (`modelsense.training.train_ensemble`).

For each model θ_m (m = 1..M) and example z = (x, y) with margin f(z) = f_y(x) − logsumexp_{c≠y} f_c(x)
(the TRAK model output for classification; l = −log σ(f), so ∇l = −(1 − p_y)∇f exactly):

    φ_i = G_m ∇_θ f(z_i; θ_m) ∈ R^d      (projected margin gradient, G_m ~ N(0, 1/d), own seed per model)
    ψ_z = G_m ∇_θ l(z; θ_m) = −(1 − p_y(z)) φ_z      (projected loss gradient)
    K_m = Φ_mᵀ Φ_m + λ_m I                (the projected Gauss-Newton kernel over the N training examples)
    score(i, j) = (1/M) Σ_m ψ_iᵀ K_m⁻¹ ψ_j

which is TRAK's estimate Q_i φ_iᵀ K⁻¹ φ_j (Q_i = 1 − p_i) expressed as a change of the test *loss*
(TRAK's test output is the margin; the two differ by the factor (1 − p_j) per test column) and
averaged over models (TRAK averages before sparsifying; no soft-thresholding here).
λ_m = damping · tr(Φ_mᵀΦ_m)/d (damping_mode relative) or damping (absolute).

Defaults by measurement (digits, MLP 64-128-128-10, LDS over 100 half-data retrainings): one model
d = 1024: damping 1e-5 → 0.10, 1e-3 → 0.16, 0.1 → 0.38; ten models: (d 1024, 0.1) → 0.50,
(512, 0.1) → 0.52, (512, 0.3) → 0.544, (512, 1.0) → 0.533, (256, 0.3) → 0.524; twenty models
(512, 0.3) → 0.562. The ridge matters more than d; TRAK's own tiny ridge is too small here.
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
    flat_per_example_grads,
    param_dtype,
    register,
)
from modelsense.attribution.gradient import _check_projection, _projector
from modelsense.attribution.members import reinitialised_copy, train_members  # noqa: F401
from modelsense.core.functional import FunctionalModel, Params, chunks, map_inputs
from modelsense.errors import ConfigError


def margin_grads(
    model: FunctionalModel, params: Params, x: Tensor, y: Tensor, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Flat per-example gradients of the margin f_y − logsumexp_{c≠y} f_c, (n, P), and p_y, (n,)."""

    def margin(p: Params, xi: Tensor, yi: Tensor):
        logits = model(p, map_inputs(lambda t: t.unsqueeze(0), xi))[0]
        is_label = torch.arange(logits.shape[-1], device=logits.device) == yi
        others = logits.masked_fill(is_label, float("-inf"))
        m = (logits * is_label).sum() - torch.logsumexp(others, dim=-1)
        return m, torch.sigmoid(m).detach()

    return flat_per_example_grads(model, margin, params, x, y, chunk_size, has_aux=True)


def _ridge_inverse(K: Tensor, lam: float) -> Tensor:
    """(K + λI)⁻¹ for a symmetric PSD K (float64): Cholesky when λ > 0, else a pseudo-inverse
    through numpy's eigh (torch's float64 eigh is very slow on some CPU builds)."""
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    if lam > 0:
        L, info = torch.linalg.cholesky_ex(K + lam * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
    import numpy as np

    evals, Q = np.linalg.eigh(K.cpu().numpy())
    floor = max(lam, 1e-12 * max(float(evals.max()), 1e-300))
    inv = (Q / (np.clip(evals, 0, None) + floor)) @ Q.T
    return torch.from_numpy(inv).to(K.device)


@register("trak")
class Trak(FeatureAttributor):
    """Settings:
        n_models M: models trained from scratch at once by the retraining engine.
        proj_dim d: projection dimension.
        damping, damping_mode: ridge λ of the kernel (relative: multiple of tr(ΦᵀΦ)/d).
        train_config: `TrainConfig` of the ensemble (default: TrainConfig()); use the trained model's.
        model_fn: seed -> fresh module (default: the fitted module re-initialised with `reset_parameters`).
        subset_ratio: each model trains on a random subset of this fraction (1: all examples).
        include_fitted: use the fitted model as one of the M members.
    """

    def streams(self) -> bool:
        """Reads the training data in batches by position, unless models are trained from scratch on it
        (n_models > 1: the engine takes tensors)."""
        return self.n_models == 1


    needs = frozenset({"recipe"})
    state_attributes = ("members_", "kernel_inverses_", "damping_")

    def __init__(self, n_models: int = 10, proj_dim: int = 512, damping: float = 0.3, damping_mode: str = "relative",
                 train_config=None, model_fn: Callable[[int], nn.Module] | None = None, subset_ratio: float = 1.0,
                 include_fitted: bool = False, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.n_models = check_int("n_models", n_models)
        self.proj_dim = check_int("proj_dim", proj_dim)
        self.damping = check_positive("damping", damping, allow_zero=True)
        self.damping_mode = check_choice("damping_mode", damping_mode, ("absolute", "relative"))
        self.train_config, self.model_fn = train_config, model_fn
        self.subset_ratio = check_positive("subset_ratio", subset_ratio)
        if self.subset_ratio > 1:
            raise ConfigError(f"subset_ratio must lie in (0, 1], received {subset_ratio}")
        self.include_fitted = bool(include_fitted)

    def _fit(self) -> None:
        if self.model_.likelihood != "categorical" or self.loss != "cross_entropy":
            raise ConfigError(
                "trak uses the classification margin; it needs a categorical model with loss='cross_entropy'"
            )
        members = [self.params_] if self.include_fitted else []
        n_new = self.n_models - len(members)
        if n_new > 0:
            members += self._train_members(n_new)
        self.members_ = members
        dtype, device = param_dtype(self.params_), next(iter(self.params_.values())).device
        self.projectors_ = [_projector(self, self.seed + 31 * m) for m in range(len(members))]
        self.kernel_inverses_ = []
        self.damping_ = []
        for params, proj in zip(self.members_, self.projectors_):
            K = torch.zeros(self.proj_dim, self.proj_dim, dtype=torch.float64, device=device)
            for rows in chunks(self.n_train, self.compute.block_size):
                g, _ = margin_grads(self.model_, params, self.x_train_[rows], self.y_train_[rows], self.chunk_size_)
                phi = proj(g).double()
                K += phi.T @ phi
            lam = (
                self.damping * float(torch.trace(K)) / self.proj_dim
                if self.damping_mode == "relative"
                else self.damping
            )
            self.kernel_inverses_.append(_ridge_inverse(K, lam).to(dtype))
            self.damping_.append(lam)

    def _get_state(self):
        return {**super()._get_state(), "projection_heads": [p.head() for p in self.projectors_]}

    def _set_state(self, state) -> None:
        heads = state.pop("projection_heads")
        super()._set_state(state)
        self.projectors_ = [_projector(self, self.seed + 31 * m) for m in range(len(self.members_))]
        for proj, head in zip(self.projectors_, heads):
            _check_projection(proj, head, self.name)

    def _train_members(self, n_new: int) -> list[Params]:
        return train_members(self.model_, self.params_, self.x_train_, self.y_train_, n_new, self.train_config,
                             self.model_fn, self.subset_ratio, self.seed, self.compute.progress)

    def _loss_projections(self, m: int, x: Tensor, y: Tensor) -> Tensor:
        g, p = margin_grads(self.model_, self.members_[m], x, y, self.chunk_size_)
        return -(1 - p).unsqueeze(1) * self.projectors_[m](g)

    def _train_component(self, rows: slice, c: int) -> Tensor:
        return self._loss_projections(c, self.x_train_[rows], self.y_train_[rows])

    def _test_component(self, x: Tensor, y: Tensor, c: int) -> Tensor:
        return self._loss_projections(c, x, y) @ (self.kernel_inverses_[c] / len(self.members_))

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._loss_projections(m, self.x_train_[rows], self.y_train_[rows]) for m in range(len(self.members_))]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """K_m⁻¹ ψ_j / M (the ensemble mean's 1/M on the test side)."""
        M = len(self.members_)
        return [self._loss_projections(m, x, y) @ (Kinv / M) for m, Kinv in enumerate(self.kernel_inverses_)]
