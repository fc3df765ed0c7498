"""The memory-perturbation equation (MPE): LOO predictions and sensitivities from a Gaussian posterior.

    post = build_posterior("laplace", FunctionalModel(net), x, y, prior_precision=10.0, structure="kfac")
    res = mpe_scores(post, x, y, MPESettings(variant="diag"))
    res.sensitivity, res.estimated_loo_nll

`estimator` holds the numbers (e_i, Λ_i, V_i -> LOO logits, LOO-CV NLL, sensitivities; variants
diag/full/loo; group/LOCO; Monte-Carlo residual); `ground_truth` the true LOO/LOCO by warm-started
retraining (the retraining engine) or refits to convergence (L-BFGS).
"""

from modelsense.mpe.estimator import (
    LAPLACE_STRUCTURES,
    SOURCES,
    VARIANTS,
    MPEResult,
    MPESettings,
    build_posterior,
    group_logit_shift,
    group_loo_nll,
    logit_shift,
    mc_prediction_error,
    memory_perturbation,
    mpe_scores,
    output_hessian,
    per_example_nll,
    prediction_error,
    softmax_deviation,
)

__all__ = [
    "LAPLACE_STRUCTURES", "SOURCES", "VARIANTS", "MPEResult", "MPESettings", "build_posterior", "group_logit_shift",
    "group_loo_nll", "logit_shift", "mc_prediction_error", "memory_perturbation", "mpe_scores", "output_hessian",
    "per_example_nll", "prediction_error", "softmax_deviation",
]
