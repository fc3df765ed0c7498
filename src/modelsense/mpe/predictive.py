"""The posterior at a module's parameters, its logits and predictive covariances V_i = J_i Σ J_iᵀ over a
data set, the MPE of every variant from them, and the NLL of groups removed at once."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modelsense.core.functional import FunctionalModel
from modelsense.errors import ConfigError
from modelsense.mpe.estimator import (
    VARIANTS,
    MPEResult,
    MPESettings,
    build_posterior,
    group_logit_shift,
    group_loo_nll,
    memory_perturbation,
    per_example_nll,
)


def check_classification_head(module: nn.Module, x: Tensor, num_classes: int) -> None:
    """ConfigError unless `module` gives one logit per class on inputs like `x` (two of them are run):
    outputs (n, num_classes) with num_classes >= 2, as the MPE's categorical likelihood needs."""
    with torch.no_grad():
        out = module(x[:2].to(next(module.parameters()).device))
    if out.dim() != 2 or out.shape[-1] != num_classes or num_classes < 2:
        raise ConfigError(f"the MPE experiments need a classification head with one logit per class: {num_classes} "
                          f"classes, but the model outputs shape {tuple(out.shape[1:])}")


def posterior_at(module: nn.Module, x: Tensor, y: Tensor, *, source: str = "laplace", prior_precision: float | None,
                 structure: str = "kfac", chunk_size: int = 500, optimizer=None, n_train: int | None = None):
    """The Gaussian posterior `build_posterior(source, ...)` at the module's current parameters.

    laplace: the GGN of Σ_i l_i over (x, y) (moved to the module's device) in `structure`, retried in
    float64 when float32 fails (`curvature.posterior.in_float64_on_failure`; the module is left as it
    is). ivon | adam: read from `optimizer` (an optimizer, or `training.recorder.stand_in_optimizer`
    of a snapshot), with N = `n_train` (default len(x)).
    """
    from modelsense.curvature.posterior import in_float64_on_failure

    if source != "laplace":
        return build_posterior(source, FunctionalModel(module), prior_precision=prior_precision, optimizer=optimizer,
                               n_train=n_train or len(x), chunk_size=chunk_size)
    device = next(module.parameters()).device
    y = y.to(device)
    return in_float64_on_failure(
        lambda model, xs: build_posterior("laplace", model, xs, y, prior_precision=prior_precision,
                                          structure=structure, chunk_size=chunk_size),
        module, x.to(device))


def predictive_covariances(posterior, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Logits at the posterior mean (n, C) and V = J Σ Jᵀ (n, C, C), float32 on the CPU, in chunks of
    `chunk_size` examples."""
    device = posterior.mean_flat.device
    logits, covs = [], []
    for start in range(0, len(x), chunk_size):
        xb = x[start : start + chunk_size].to(device)
        with torch.no_grad():
            logits.append(posterior.model(posterior.mean, xb.to(posterior.mean_flat.dtype)).detach().cpu().float())
        covs.append(posterior.predictive_covariance(xb, chunk_size=chunk_size).detach().cpu().float())
    return torch.cat(logits), torch.cat(covs)


def all_variants(logits: Tensor, y: Tensor, V: Tensor, loo_damping: float = 1.0,
                 error: Tensor | None = None) -> dict[str, MPEResult]:
    """`memory_perturbation` of each variant in VARIANTS (the `loo` variant with damping `loo_damping`,
    the others undamped), variant -> MPEResult."""
    return {v: memory_perturbation(logits, y, V, MPESettings(v, loo_damping if v == "loo" else 1.0), error=error)
            for v in VARIANTS}


def loo_estimates(posterior, x: Tensor, y: Tensor, chunk_size: int,
                  loo_damping: float = 1.0) -> tuple[Tensor, Tensor, dict[str, MPEResult]]:
    """Logits (n, C) and V (n, C, C) of `predictive_covariances`, and the MPE of every variant from them
    (`all_variants`): (logits, V, variant -> MPEResult)."""
    logits, V = predictive_covariances(posterior, x, chunk_size)
    return logits, V, all_variants(logits, y, V, loo_damping)


def group_removal_nll(posterior, x: Tensor, logits: Tensor, y: Tensor, error: Tensor, groups: list[Tensor],
                      chunk_size: int) -> list[float]:
    """For each group G (indices into x), the mean NLL of its examples after removing the whole group at
    once: logits f_G + `group_logit_shift` (Δθ = Σ Σ_{j∈G} J_jᵀ e_j), with `error` e (N, C) and `logits`
    (N, C) at the posterior mean; one float per group."""
    like = posterior.mean_flat
    x, error = x.to(like.device, like.dtype), error.to(like.device, like.dtype)
    out = []
    for group in groups:
        shift = group_logit_shift(posterior.model, posterior.mean, posterior.covariance_mv, x, error, group,
                                  chunk_size=chunk_size).cpu().float()
        out.append(float(per_example_nll(logits[group] + shift, y[group]).mean()))
    return out



def class_removal_estimates(posterior, x: Tensor, y: Tensor, num_classes: int, settings: MPESettings,
                            chunk_size: int) -> dict[str, object]:
    """The MPE of removing each class c present in y (leave one class out, Nickl et al. 2023 Fig. 3a):
    `estimated_nll`, the mean per-example MPE LOO NLL of the examples of c (`group_loo_nll`, as the
    original), and `estimated_nll_joint`, their mean NLL with the whole class removed at once
    (`group_removal_nll`: Δθ = Σ Σ_{j∈c} J_jᵀ e_j). Returns {"classes": present classes (list),
    "removed": their example indices (list of tensors), "estimated_nll": (K,) tensor,
    "estimated_nll_joint": K floats}."""
    logits, V = predictive_covariances(posterior, x, chunk_size)
    mpe = memory_perturbation(logits, y, V, settings)
    present = [c for c in range(num_classes) if bool((y == c).any())]
    removed = [(y == c).nonzero().flatten() for c in present]
    return {"classes": present, "removed": removed,
            "estimated_nll": group_loo_nll(mpe.loo_nll, y, num_classes)[present],
            "estimated_nll_joint": group_removal_nll(posterior, x, logits, y, mpe.error, removed, chunk_size)}
