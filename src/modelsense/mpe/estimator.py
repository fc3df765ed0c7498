"""The memory-perturbation equation (MPE): leave-one-out predictions and sensitivities.

Nickl, Xu, Tailor, Möllenhoff, Khan, "The Memory-Perturbation Equation" (NeurIPS 2023).
For a model trained on N examples with posterior q(θ) = N(θ*, Σ) (Σ the inverse of the precision of
the *summed* objective Σ_i l_i(θ) + δ/2 ‖θ‖²), removing example i moves the parameters by
θ^{\\i} − θ* ≈ Σ ∇_θ l_i = Σ J_iᵀ e_i, hence its outputs by

    f_i^{\\i} − f_i ≈ V_i e_i,        V_i = J_i Σ J_iᵀ  (C x C, the predictive covariance of f_i),

with J_i = ∂f_i/∂θ (C x P) and the prediction error e_i = ∂l_i/∂f_i:
    categorical:  e_i = softmax(f_i) − onehot(y_i),   Λ_i = diag(p_i) − p_i p_iᵀ
    gaussian:     e_i = τ (f_i − y_i),                Λ_i = τ I        (τ = noise precision; l_i = τ/2 ‖f_i − y_i‖²)

Everything here takes the predictive covariances V (n, C, C) as an input, so it is independent of
where the posterior comes from (Laplace diag/KFAC/full, IVON, Adam; see `build_posterior`).

Variants (`variant=`):
    diag  the paper's code: only diag V_i and diag Λ_i:  Δf_i = v_i ⊙ e_i,  deviation λ_i ⊙ v_i ⊙ e_i.
    full  Δf_i = V_i e_i,  deviation Λ_i V_i e_i (the linearised change of softmax(f_i)).
    loo   the covariance of the model *without* example i (its precision lacks J_iᵀ Λ_i J_i), by
          Sherman-Morrison-Woodbury:  Δf_i = (I − α V_i Λ_i)^{-1} V_i e_i,  computed as
          V e + α V L (I − α H)^{-1} Lᵀ V e with Λ = L Lᵀ and the leverage H = Lᵀ V L (C x C,
          symmetric); α = `loo_damping` ∈ [0, 1] (1: the plain correction, 0: `full`). Along an
          eigenvector of H with eigenvalue h the correction multiplies by 1/(1 − αh); where αh exceeds
          `max_leverage` = c < 1 (an approximate V that overshoots) by 1/(1 − c) instead.
          The deviation is taken through the exact link:
          softmax(f_i + Δf_i) − softmax(f_i) (gaussian: Λ Δf, exact). For a linear model with a
          gaussian likelihood and the exact posterior this is exact LOO; for logistic regression it is
          one Newton step from θ* of the LOO objective.

Outputs per example: the LOO logits f_i + Δf_i, the LOO NLL −log softmax(f_i + Δf_i)[y_i]
(gaussian: τ/2 ‖f_i + Δf_i − y_i‖², without the constant), the deviation vector (n, C) and the
sensitivity s_i = ‖deviation_i‖₁ (for `diag`: Σ_k |e_ik λ_ik v_ik| as in the paper's code).
The estimated LOO-CV NLL is the mean of the per-example LOO NLLs.

Differences to the original code (SEEDS.md 0.2/0.7): no clamping of e and λ to [1e-10, 1 − 1e-10]
(it changes nothing but round-off) and log-softmax instead of log of clamped probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from modelsense.core.functional import FunctionalModel, chunks, n_rows
from modelsense.core.likelihood import LIKELIHOODS, Categorical, Likelihood, likelihood_for
from modelsense.data.stream import is_stream
from modelsense.errors import ConfigError, DataError

VARIANTS = ("diag", "full", "loo")


@dataclass(frozen=True)
class MPESettings:
    """How the MPE turns (e_i, Λ_i, V_i) into LOO predictions.

    variant: full (default) | diag | loo (see the module docstring). Chosen by measurement on the
        digits MLP 64-128-128-10 (δ = 10, 200 examples refitted by warm-started SGD + L-BFGS):
        Pearson between estimated and true softmax deviation, KFAC Laplace: full 0.970, diag 0.944,
        loo 0.894; diagonal-GGN Laplace: 0.932 / 0.861 / 0.399; `full` also gave the closest LOO NLL.
        `loo` is exact only for exact posteriors (linear models with the full GGN).
    loo_damping: α ∈ [0, 1] of the `loo` variant, Δf = (I − α V Λ)^{-1} V e (1 = exact Woodbury).
        On the approximate posteriors above Pearson rises monotonically as α falls to 0 (KFAC 0.894 ->
        0.961) without reaching `full`, so damping does not rescue `loo` there; keep α = 1 for exact
        posteriors and use `full` otherwise.
    max_leverage: cap c < 1 on the eigenvalues of α Lᵀ V L (the amplification 1/(1 − αh) becomes at
        most 1/(1 − c)), so that an approximate posterior whose V overshoots cannot blow up or flip
        the sign of the correction.
    noise_precision: τ of the gaussian likelihood (ignored for categorical).
    """

    variant: str = "full"
    loo_damping: float = 1.0
    max_leverage: float = 0.99
    noise_precision: float = 1.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown MPE variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if not 0.0 <= float(self.loo_damping) <= 1.0:
            raise ConfigError(
                f"loo_damping must lie in [0, 1] (1 = plain Sherman-Morrison), received {self.loo_damping}"
            )
        if not 0.0 < float(self.max_leverage) < 1.0:
            raise ConfigError(f"max_leverage must lie in (0, 1), received {self.max_leverage}")
        if not (math.isfinite(self.noise_precision) and self.noise_precision > 0):
            raise ConfigError(f"noise_precision must be > 0, received {self.noise_precision}")


@dataclass
class MPEResult:
    """Per-example MPE quantities for n examples with C outputs.

    Attributes:
        logits: f_i (n, C).  error: e_i (n, C).  shift: Δf_i (n, C).
        loo_logits: f_i + Δf_i (n, C).  loo_nll: per-example LOO NLL (n,).
        deviation: predicted change of the mean output (probabilities) (n, C).
        sensitivity: s_i = ‖deviation_i‖₁ (n,).
    """

    logits: Tensor
    error: Tensor
    shift: Tensor
    loo_logits: Tensor
    loo_nll: Tensor
    deviation: Tensor
    sensitivity: Tensor

    @property
    def estimated_loo_nll(self) -> float:
        """The estimated LOO-CV NLL, (1/n) Σ_i loo_nll_i."""
        return float(self.loo_nll.mean())

    @staticmethod
    def concat(parts: list[MPEResult]) -> MPEResult:
        return MPEResult(*(torch.cat([getattr(p, k) for p in parts]) for k in MPEResult.__dataclass_fields__))


# --- building blocks -------------------------------------------------------------------------
def _likelihood(likelihood: str, noise_precision: float = 1.0) -> Likelihood:
    """The likelihood object (`core.likelihood`) of `likelihood` with noise precision τ (gaussian)."""
    if likelihood not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {likelihood!r}; expected one of {', '.join(LIKELIHOODS)}")
    return likelihood_for(likelihood, noise_precision=noise_precision)


def _checked(logits: Tensor, y: Tensor, likelihood: str, noise_precision: float = 1.0) -> tuple[Likelihood, Tensor]:
    """The likelihood object and the validated targets: int labels (n,) in [0, C) (categorical) or
    float (n, C) (gaussian); DataError otherwise."""
    lik = _likelihood(likelihood, noise_precision)
    return lik, lik.check_targets(logits, y)


def prediction_error(
    logits: Tensor, y: Tensor, likelihood: str = "categorical", noise_precision: float = 1.0
) -> Tensor:
    """e_i = ∂l_i/∂f_i, shape (n, C): softmax(f_i) − onehot(y_i), or τ (f_i − y_i) for gaussian
    (`Likelihood.output_grad`, targets checked)."""
    lik, y = _checked(logits, y, likelihood, noise_precision)
    return lik.output_grad(logits, y)


def output_hessian(logits: Tensor, likelihood: str = "categorical", noise_precision: float = 1.0) -> Tensor:
    """Λ_i = ∂²l_i/∂f_i², shape (n, C, C): diag(p_i) − p_i p_iᵀ, or τ I for gaussian (`Likelihood.output_hessian`)."""
    return _likelihood(likelihood, noise_precision).output_hessian(logits)


def per_example_nll(logits: Tensor, y: Tensor, likelihood: str = "categorical", noise_precision: float = 1.0) -> Tensor:
    """−log softmax(f_i)[y_i], or τ/2 ‖f_i − y_i‖² (no constant) for gaussian; shape (n,) (`Likelihood.nll`,
    targets checked)."""
    lik, y = _checked(logits, y, likelihood, noise_precision)
    return lik.nll(logits, y)


def softmax_deviation(logits: Tensor, other_logits: Tensor) -> Tensor:
    """‖softmax(other_i) − softmax(f_i)‖₁ per example, shape (n,): the paper's true deviation."""
    return (torch.softmax(other_logits, -1) - torch.softmax(logits, -1)).abs().sum(-1)


def _check_covariance(V: Tensor, logits: Tensor) -> None:
    n, c = logits.shape
    if not isinstance(V, Tensor) or V.shape != (n, c, c):
        got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
        raise DataError(f"expected predictive covariances V of shape (n, C, C) = ({n}, {c}, {c}), received {got}")
    if not bool(torch.isfinite(V).all()):
        raise DataError("predictive covariances contain NaN or inf")


def logit_shift(
    error: Tensor, V: Tensor, logits: Tensor, settings: MPESettings, likelihood: str = "categorical"
) -> Tensor:
    """Δf_i (n, C) of removing example i, per `settings.variant` (see the module docstring)."""
    if settings.variant == "diag":
        return torch.diagonal(V, dim1=-2, dim2=-1) * error
    Ve = (V @ error.unsqueeze(-1)).squeeze(-1)
    if settings.variant == "full" or settings.loo_damping == 0:
        return Ve
    a = float(settings.loo_damping)
    dtype = torch.float64
    L = _likelihood(likelihood, settings.noise_precision).output_hessian_sqrt(logits.to(dtype))
    Vd = 0.5 * (V + V.transpose(-1, -2)).to(dtype)
    H = L.transpose(-1, -2) @ Vd @ L  # leverage, (n, C, C) symmetric PSD for PSD V
    h, Q = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
    h = h.clamp(min=0.0)
    # α/(1 − αh) per leverage direction; where αh exceeds the cap c, c/((1 − c) h), so that the
    # total factor along that direction, 1 + h · factor, is 1/(1 − c) instead of 1/(1 − αh)
    cap = settings.max_leverage
    clipped = a * h > cap
    factor = torch.where(clipped, cap / ((1.0 - cap) * h.clamp(min=1e-300)), a / (1.0 - (a * h).clamp(max=cap)))
    u = L.transpose(-1, -2) @ Ve.to(dtype).unsqueeze(-1)  # Lᵀ V e
    u = Q @ ((Q.transpose(-1, -2) @ u) * factor.unsqueeze(-1))  # α (I − αH)^{-1} Lᵀ V e
    corr = (Vd @ (L @ u)).squeeze(-1)
    return (Ve.to(dtype) + corr).to(logits.dtype)


def memory_perturbation(
    logits: Tensor,
    y: Tensor,
    V: Tensor,
    settings: MPESettings | None = None,
    likelihood: str = "categorical",
    error: Tensor | None = None,
) -> MPEResult:
    """MPE leave-one-out quantities for n examples (see the module docstring).

    Args:
        logits: f_i at the posterior mean, (n, C).
        y: labels (n,) (categorical) or targets (n, C) (gaussian).
        V: predictive covariances J_i Σ J_iᵀ, (n, C, C).
        settings: variant, damping, noise precision.
        error: optional replacement for e_i (n, C), e.g. the Monte-Carlo residual of
            `mc_prediction_error` (the evolving-sensitivities experiment).
    """
    settings = settings or MPESettings()
    tau = settings.noise_precision
    lik = _likelihood(likelihood, tau)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise DataError(
            "expected logits of shape (n, C), received "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    _check_covariance(V, logits)
    V = V.to(logits.dtype)
    y = lik.check_targets(logits, y)
    e = lik.output_grad(logits, y) if error is None else error.to(logits.dtype)
    if e.shape != logits.shape:
        raise DataError(f"error must have the shape of logits {tuple(logits.shape)}, received {tuple(e.shape)}")
    shift = logit_shift(e, V, logits, settings, likelihood)
    loo_logits = logits + shift
    loo_nll = lik.nll(loo_logits, y)
    if settings.variant == "loo":
        if likelihood == "categorical":  # through the exact link
            deviation = lik.mean(loo_logits) - lik.mean(logits)
        else:
            deviation = tau * shift
    elif settings.variant == "diag":
        deviation = lik.output_hessian_diag(logits) * shift
    else:
        deviation = (lik.output_hessian(logits) @ shift.unsqueeze(-1)).squeeze(-1)
    return MPEResult(logits, e, shift, loo_logits, loo_nll, deviation, deviation.abs().sum(-1))


def mc_prediction_error(
    logits: Tensor,
    y: Tensor,
    V: Tensor,
    n_samples: int = 150,
    diagonal: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo prediction error of the evolving-sensitivities script (categorical only):

        ē_i = (1/S) Σ_s softmax(f̃_is) − onehot(y_i),   f̃_is ~ N(f_i, diag(v_i)) (diagonal=True, the
        original) or N(f_i, V_i);   shape (n, C).
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, received {n_samples}")
    lik = Categorical()
    y = lik.check_targets(logits, y)
    _check_covariance(V, logits)
    n, c = logits.shape
    eps = torch.randn(n_samples, n, c, generator=generator, dtype=torch.float64).to(logits.dtype)
    if diagonal:
        noise = eps * torch.diagonal(V, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    else:
        lam, Q = torch.linalg.eigh(0.5 * (V + V.transpose(-1, -2)).double())
        root = (Q * lam.clamp(min=0).sqrt().unsqueeze(-2)).to(logits.dtype)  # (n, C, C), root rootᵀ = V
        noise = torch.einsum("ncd,snd->snc", root, eps)
    probs = lik.mean(logits + noise).mean(0)
    return probs - F.one_hot(y, c).to(logits.dtype)


def group_loo_nll(loo_nll: Tensor, groups: Tensor, num_groups: int | None = None) -> Tensor:
    """Mean per-example LOO NLL of each group (the original's leave-one-class-out estimate), (G,).

    groups: (n,) int group id of each example (e.g. its class). Empty groups give NaN.
    """
    if loo_nll.shape != groups.shape:
        raise DataError(
            f"loo_nll {tuple(loo_nll.shape)} and groups {tuple(groups.shape)} must have the same shape (n,)"
        )
    g = int(num_groups if num_groups is not None else int(groups.max()) + 1)
    total = torch.zeros(g, dtype=torch.float64).index_add_(0, groups.long(), loo_nll.double())
    count = torch.zeros(g, dtype=torch.float64).index_add_(
        0, groups.long(), torch.ones_like(loo_nll, dtype=torch.float64)
    )
    return (total / count).to(loo_nll.dtype)


def group_logit_shift(
    model: FunctionalModel,
    params: dict[str, Tensor],
    covariance_mv,
    x: Tensor,
    error: Tensor,
    group: Tensor,
    x_eval: Tensor | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Joint MPE of removing a whole group G of examples at once, on the outputs of `x_eval`:

        Δθ_G = Σ Σ_{j∈G} J_jᵀ e_j,      Δf_i = J_i Δθ_G   (i in x_eval; default the group itself)

    (the per-example `memory_perturbation` ignores the coupling J_i Σ J_jᵀ between group members).
    `covariance_mv`: v ↦ Σ v on flat (P,) vectors (e.g. `GaussianPosterior.covariance_mv`). Shape (n_eval, C).
    """
    idx = group.nonzero().flatten() if group.dtype == torch.bool else group.long()
    xg, eg = x[idx], error[idx]
    grad_sum = torch.zeros(model.n_params, dtype=error.dtype, device=error.device)
    for s in chunks(len(xg), chunk_size):
        _, vjp_fn = torch.func.vjp(lambda p, s=s: model(p, xg[s]), params)
        grad_sum += model.spec.flatten(vjp_fn(eg[s].to(error.dtype))[0])
    delta = model.spec.unflatten(covariance_mv(grad_sum).to(error.dtype))
    xe = xg if x_eval is None else x_eval
    out = []
    for s in chunks(len(xe), chunk_size):
        out.append(torch.func.jvp(lambda p, s=s: model(p, xe[s]), (params,), (delta,))[1])
    return torch.cat(out).detach()


# --- posteriors by name, and the MPE over a data set in chunks ----------------------------------
SOURCES = ("laplace", "ivon", "adam")
LAPLACE_STRUCTURES = ("diag", "kfac", "full", "ekfac")


def build_posterior(
    source: str,
    model: FunctionalModel,
    x: Tensor | None = None,
    y: Tensor | None = None,
    *,
    prior_precision: float | None = None,
    structure: str = "kfac",
    optimizer=None,
    n_train: int | None = None,
    chunk_size: int = 256,
):
    """A Gaussian posterior of the curvature layer, selected by name.

    laplace  K = GGN of Σ_i l_i over (x, y) at the model's parameters in `structure`
             (diag | kfac | full | ekfac), Σ = (K + δ I)^{-1}, δ = `prior_precision`.
    ivon     σ_p² = 1/(N h_p + δ) from an `ivon.IVON` optimizer's state (ess = N, weight_decay = δ/N).
    adam     σ_p² = 1/(N sqrt(v_p) + δ) from a torch Adam optimizer (v = exp_avg_sq).
    """
    from modelsense.curvature import adam_posterior, ivon_posterior, laplace

    if source not in SOURCES:
        raise ConfigError(f"unknown posterior source {source!r}; expected one of {', '.join(SOURCES)}")
    if source != "ivon":
        if prior_precision is None or not (math.isfinite(float(prior_precision)) and float(prior_precision) > 0):
            raise ConfigError(
                f"the prior precision δ (--delta) must be > 0 for a {source} posterior, received {prior_precision}"
            )
    if source == "laplace":
        if structure not in LAPLACE_STRUCTURES:
            raise ConfigError(
                f"unknown Laplace structure (--var-version) {structure!r}; expected one of "
                f"{', '.join(LAPLACE_STRUCTURES)}"
            )
        if x is None or (y is None and not is_stream(x)):
            raise ConfigError("a Laplace posterior needs the training data (x, y), or a Dataset / DataLoader as x")
        return laplace(model, x, y, structure=structure, prior_precision=float(prior_precision), chunk_size=chunk_size)
    if optimizer is None:
        raise ConfigError(
            f"the {source} posterior reads the optimizer state: pass the optimizer that trained the model"
        )
    if source == "ivon":
        if not all("hess" in g for g in optimizer.param_groups):
            raise ConfigError("the ivon posterior needs an ivon.IVON optimizer (train with --optimizer ivon)")
        return ivon_posterior(model, optimizer)
    if n_train is None:
        raise ConfigError("the adam posterior needs n_train (the number of training examples)")
    if any("hess" in g for g in optimizer.param_groups):
        raise ConfigError("the adam posterior needs a torch.optim.Adam optimizer, received IVON")
    return adam_posterior(model, optimizer, int(n_train), float(prior_precision))


def mpe_scores(
    posterior,
    x: Tensor,
    y: Tensor | None = None,
    settings: MPESettings | None = None,
    chunk_size: int = 500,
    return_covariance: bool = False,
) -> MPEResult | tuple[MPEResult, Tensor]:
    """`memory_perturbation` for every (x_i, y_i), with logits at the posterior mean and
    V_i = `posterior.predictive_covariance`, computed in chunks of `chunk_size` (--bs-jacs).

    Returns the concatenated MPEResult (and V (n, C, C) when `return_covariance`).
    """
    from modelsense.curvature._common import resolve_data

    x, y = resolve_data(x, y)
    model = posterior.model
    parts, covs = [], []
    for s in chunks(n_rows(x), chunk_size):
        xb = x[s]
        with torch.no_grad():
            logits = model(posterior.mean, xb).detach()
        V = posterior.predictive_covariance(xb, chunk_size=chunk_size).detach()
        parts.append(memory_perturbation(logits, y[s], V, settings, model.likelihood))
        if return_covariance:
            covs.append(V)
    if not parts:
        raise DataError("no examples given")
    result = MPEResult.concat(parts)
    return (result, torch.cat(covs)) if return_covariance else result
