"""The memory-perturbation equation (MPE): LOO predictions and sensitivities from a Gaussian posterior.

    post = build_posterior("laplace", FunctionalModel(net), x, y, prior_precision=10.0, structure="kfac")
    res = mpe_scores(post, x, y, MPESettings(variant="diag"))
    res.sensitivity, res.estimated_loo_nll

`estimator` holds the numbers (e_i, Λ_i, V_i -> LOO logits, LOO-CV NLL, sensitivities; variants
diag/full/loo; group/LOCO; Monte-Carlo residual); `ground_truth` the true LOO/LOCO by warm-started
retraining (the retraining engine) or refits to convergence (L-BFGS); `predictive` the posterior at a
model's parameters and its predictive covariances; `evaluation` the estimates over grids (δ, training
snapshots) and against the truth; `plots` the figures of the `modelsense mpe` commands.

Conventions of the `modelsense mpe` commands and where their results differ from the original code
(Nickl et al. 2023; SEEDS.md 0.7):
  * objective: mean minibatch NLL + δ/(2N)‖θ‖² (IVON: ess = N, weight_decay = δ/N); posterior
    precision Σ_i J_iᵀΛ_iJ_i + δI (Laplace) or N·h + δ (IVON), N·sqrt(v) + δ (Adam).
  * minibatches are reshuffled every epoch (the original never reshuffles; `--fixed-batches` restores it).
  * `--optimizer adamw` is AdamW with decoupled weight decay δ/N and no L2 term in the loss (the
    original's first script); the original's loo-l2reg built `AdamW(params, lr)`, whose default weight
    decay 0.01 came on top of the L2 term: that is not reproduced.
  * output sizes follow the data (the original hard-coded 10 classes for LeNet/ResNet).
  * evolving: a checkpoint labelled t is taken after t optimizer steps (the original labelled it t+1),
    and the last default checkpoint is the end of training; bins use `np.array_split`, so N need not be
    divisible by the number of bins.
  * validation/loco ground truth: the retraining engine trains all leave-out models at once, with
    shared minibatches and a control model retrained on all data (`--reference control`); the
    original retrained one model at a time with its own shuffling and compared with θ*.
    `validation --truth scratch` trains them from the initialisation with the training recipe instead
    of warm-starting them.
  * loo-l2reg: `--smooth 4` draws both curves after the original's moving average of window 4 (at the
    geometric mean of each window's δ) and reports the smoothed best δ beside the raw one. The
    retraining must run long enough to converge: validation reports its relaxation R
    (`mpe.ground_truth.retraining_relaxation`) and warns below 3; the defaults give R ≈ 3.3.
  * `--optim-var` with `--optimizer sgd` is an error (the original silently fell back to Laplace).
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
