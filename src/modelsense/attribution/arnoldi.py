"""`arnoldi`: influence through the top eigendirections of the curvature (Schioppa et al. 2022).

    score(i, j) = Σ_{k in kept} (u_kᵀ g_i)(u_kᵀ g_j) / (λ_k + damping)

with (λ_k, u_k) the top `rank` eigenpairs (largest algebraic) of K, the Hessian (default, as in
the original) or the GGN of the summed training loss, found by Lanczos with full
reorthogonalisation on exact full-batch products (the original runs Arnoldi on stochastic,
augmented minibatch HVPs). Guard: eigenpairs with λ_k + damping <= eig_floor · λ_max are dropped
(negative or tiny eigenvalues of the Hessian would blow up or turn NaN, as in the original's
sqrt(1/λ)); `dropped_` counts them. Self- and cross-influence use the same sum over k.
"""

from __future__ import annotations

from torch import Tensor

from modelsense.attribution.base import (
    ComputeOptions,
    FeatureAttributor,
    check_choice,
    check_int,
    check_positive,
    register,
)
from modelsense.errors import ConfigError


@register("arnoldi")
class ArnoldiInfluence(FeatureAttributor):
    """Settings: matrix (hessian | ggn | ef), rank (eigenpairs, the original's `--arnoldi_dim` 20),
    damping (added to every kept eigenvalue), eig_floor (relative guard), lanczos_tol."""

    def streams(self) -> bool:
        """Reads the training data in batches by position (a Dataset is never read whole)."""
        return True


    needs_curvature = True
    state_attributes = ("eigenvalues_", "eigenvectors_", "dropped_", "num_matvecs_")

    def __init__(self, matrix: str = "hessian", rank: int = 20, damping: float = 0.0, eig_floor: float = 1e-6,
                 lanczos_tol: float = 1e-4, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.matrix = check_choice("arnoldi: matrix", matrix, ("hessian", "ggn", "ef"))
        self.rank = check_int("arnoldi: rank", rank)
        self.damping = check_positive("damping", damping, allow_zero=True)
        self.eig_floor = check_positive("eig_floor", eig_floor)
        self.lanczos_tol = check_positive("lanczos_tol", lanczos_tol)

    def _fit(self) -> None:
        from modelsense.curvature.operators import ImplicitCurvature

        K = ImplicitCurvature(self.model_, self.x_train_, self.y_train_, self.matrix, self.params_,
                              chunk_size=self.chunk_size_)
        import torch

        K.generator = torch.Generator().manual_seed(self.seed)
        eig = K.eigen(self.rank, tol=self.lanczos_tol)
        lam = eig.eigenvalues + self.damping
        top = float(lam.max()) if lam.numel() else 0.0
        keep = lam > self.eig_floor * max(top, 0.0)
        if top <= 0 or not bool(keep.any()):
            raise ConfigError(
                f"arnoldi: no eigenvalue of the {self.matrix} (+ damping {self.damping}) is positive "
                f"(largest {top:.3g}); use matrix='ggn' or a positive damping"
            )
        self.eigenvalues_ = lam[keep]
        self.eigenvectors_ = eig.eigenvectors[:, keep]
        self.dropped_ = int((~keep).sum())
        self.num_matvecs_ = K.num_matvecs

    def _coords(self, x: Tensor, y: Tensor) -> Tensor:
        return self._per_example_grads(self.params_, x, y) @ self.eigenvectors_

    def _train_features(self, rows: slice) -> list[Tensor]:
        return [self._coords(self.x_train_[rows], self.y_train_[rows]) / self.eigenvalues_]

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [self._coords(x, y)]
