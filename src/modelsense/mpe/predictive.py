"""Logits and predictive covariances V_i = J_i Σ J_iᵀ of a Gaussian posterior over a data set, the MPE of
every variant from them, and the NLL of groups removed at once."""

from __future__ import annotations

import torch
from torch import Tensor

from modelsense.mpe.estimator import (
    VARIANTS,
    MPEResult,
    MPESettings,
    group_logit_shift,
    memory_perturbation,
    per_example_nll,
)


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

