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

from modelsense.attribution.base import Attributor, ComputeOptions, check_choice, check_positive, register


@register("mpe")
class MemoryPerturbation(Attributor):
    """Settings: source (laplace | ivon | adam), structure (Laplace: kfac | diag | ekfac | full),
    prior_precision δ, variant (diag | full | loo), optimizer (for ivon/adam)."""

    def streams(self) -> bool:
        """Reads the training data in batches by position (posterior and MPE passes)."""
        return True


    pairwise = False
    needs_curvature = True
    needs = frozenset({"prior_precision", "optimizer_state"})
    state_attributes = ("result_",)

    def __init__(self, source: str = "laplace", structure: str = "kfac", prior_precision: float = 1.0,
                 variant: str = "diag", optimizer=None, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        from modelsense.mpe import LAPLACE_STRUCTURES, SOURCES, VARIANTS

        self.source = check_choice("mpe: source", source, SOURCES)
        self.structure = check_choice("mpe: structure", structure, LAPLACE_STRUCTURES)
        self.prior_precision = check_positive("prior_precision", prior_precision)
        self.variant = check_choice("mpe: variant", variant, VARIANTS)
        self.optimizer = optimizer

    def _fit(self) -> None:
        from modelsense.mpe import MPESettings, build_posterior, mpe_scores

        post = build_posterior(
            self.source,
            self.model_,
            self.x_train_,
            self.y_train_,
            prior_precision=self.prior_precision,
            structure=self.structure,
            optimizer=self.optimizer,
            n_train=len(self.x_train_),
            chunk_size=min(self.chunk_size_, 256),
        )
        self.result_ = mpe_scores(post, self.x_train_, self.y_train_, MPESettings(variant=self.variant),
                                  chunk_size=min(self.chunk_size_, 256))

    def _get_state(self):
        return {"result_": {k: getattr(self.result_, k) for k in type(self.result_).__dataclass_fields__}}

    def _set_state(self, state) -> None:
        from modelsense.mpe import MPEResult

        self.result_ = MPEResult(**state["result_"])

    def _self_scores(self) -> Tensor:
        return self.result_.sensitivity.detach().cpu()
