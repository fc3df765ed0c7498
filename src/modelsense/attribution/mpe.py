"""`mpe`: the memory-perturbation sensitivity (Nickl et al. 2023) as a self-influence.

    self_score(i) = s_i = || Λ_i V_i e_i ||₁     (variant `full`; `diag`: Σ_k |e_ik λ_ik v_ik|, the
                                                 paper's code; `loo`: through the exact softmax)

with e_i = softmax(f_i) − onehot(y_i), Λ_i the softmax Hessian and V_i = J_i Σ J_iᵀ the linearised
predictive covariance under the posterior N(θ*, Σ): Laplace Σ = (K + δI)⁻¹ with K the GGN of the
summed loss in `structure` (diag | kfac | ekfac | full), or the diagonal posterior read from an IVON
or Adam optimizer's state (`source`, with `optimizer=` the one that trained the model). The
sensitivity is the predicted L1 change of example i's predicted probabilities when it is removed;
large = memorised / atypical. All the numbers come from `modelsense.mpe.mpe_scores`.
"""

from __future__ import annotations

from torch import Tensor

from modelsense.attribution.base import Attributor, check_positive, register
from modelsense.errors import ConfigError


@register("mpe")
class MemoryPerturbation(Attributor):
    """Settings: source (laplace | ivon | adam), structure (Laplace: kfac | diag | ekfac | full),
    prior_precision δ, variant (diag | full | loo), optimizer (for ivon/adam)."""

    pairwise = False
    needs_curvature = True

    def __init__(self, source: str = "laplace", structure: str = "kfac", prior_precision: float = 1.0,
                 variant: str = "diag", optimizer=None, **common) -> None:
        super().__init__(**common)
        from modelsense.mpe import LAPLACE_STRUCTURES, SOURCES, VARIANTS

        if source not in SOURCES:
            raise ConfigError(f"mpe: source must be one of {SOURCES}, received {source!r}")
        if structure not in LAPLACE_STRUCTURES:
            raise ConfigError(f"mpe: structure must be one of {LAPLACE_STRUCTURES}, received {structure!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"mpe: variant must be one of {VARIANTS}, received {variant!r}")
        check_positive("prior_precision", prior_precision)
        self.source, self.structure, self.variant = source, structure, variant
        self.prior_precision, self.optimizer = float(prior_precision), optimizer

    def _fit(self) -> None:
        from modelsense.mpe import MPESettings, build_posterior, mpe_scores

        post = build_posterior(self.source, self.model_, self.x_train_, self.y_train_,
                               prior_precision=self.prior_precision, structure=self.structure,
                               optimizer=self.optimizer, n_train=len(self.x_train_), chunk_size=min(self.chunk_size_, 256))
        self.result_ = mpe_scores(post, self.x_train_, self.y_train_, MPESettings(variant=self.variant),
                                  chunk_size=min(self.chunk_size_, 256))

    def _self_scores(self) -> Tensor:
        return self.result_.sensitivity.detach().cpu()
