"""The likelihood of a model's outputs: one object per output model, holding all its output-space maths.

For outputs f_i ∈ R^C of example i and its target y_i, each likelihood gives

    nll(f, y)                l_i = −log p(y_i | f_i) (up to a constant for `Gaussian`), shape (n,), no reduction
    output_grad(f, y)        g_i = ∂l_i/∂f_i, shape (n, C)
    output_hessian(f)        Λ_i = ∂²l_i/∂f_i², shape (n, C, C) (independent of y for all three)
    output_hessian_sqrt(f)   L_i with L_i L_iᵀ = Λ_i, shape (n, C, C): the GGN J_iᵀ Λ_i J_i = (L_iᵀ J_i)ᵀ (L_iᵀ J_i)
    output_hessian_diag(f)   diag Λ_i, shape (n, C)
    output_hvp(f, u)         Λ_i u_i without forming Λ_i, u of shape (..., n, C)
    mean(f)                  E[target | f_i]: the class probabilities of the classification likelihoods
    sample(f, generator)     targets drawn from p(y | f_i) (a Monte-Carlo Fisher draws its gradients at these)
    check_targets(f, y)      the validated targets, or a DataError that says what was expected

The three output models:

    Categorical   p = softmax(f),  l = −log p_y,                      g = p − e_y,       Λ = diag(p) − p pᵀ,
                  L = diag(√p) − p √pᵀ (L Lᵀ = Λ since Σ_k p_k = 1)
    Gaussian      l = τ/2 ‖f − y‖² (the constant C/2 log(2π/τ) left out; `nll_constant`),
                  g = τ (f − y),  Λ = τ I,  L = √τ I       (τ = noise precision, 1 by default)
    SigmoidBCE    s = sigmoid(f),  l = Σ_c [softplus(f_c) − t_c f_c]   (one Bernoulli per class, summed;
                  the per-class sigmoid loss of the GEX code, `problem_type=multitask` of Kim et al. 2023),
                  g = s − t,  Λ = diag(s ⊙ (1 − s)),  L = diag(√(s ⊙ (1 − s)));  t = onehot(y) for integer
                  labels y (n,), or a 0/1 target matrix (n, C) (what `sample` draws)

Per-example quantities only: a sum or mean over examples is the caller's (`FunctionalModel.loss`,
the curvature operators' `reduction`). `nll`, `output_grad` and the Hessians check shapes only (they run
inside `vmap`, where the labels' values cannot be read); `check_targets` also checks label values and is
called where data enters. `likelihood_for(likelihood, loss)` names the object a model trains with.

Example:
    >>> lik = likelihood_for("categorical")
    >>> f, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    >>> lik.nll(f, y).shape, lik.output_hessian_sqrt(f).shape
    (torch.Size([5]), torch.Size([5, 3, 3]))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from modelsense.errors import ConfigError, DataError

LIKELIHOODS = ("categorical", "gaussian")
LOSSES = ("cross_entropy", "sigmoid_bce")


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _one_hot(y: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    """onehot(y) (n, C) by comparison (F.one_hot reads its input's values, which vmap cannot)."""
    return (y.long().unsqueeze(-1) == torch.arange(c, device=y.device)).to(dtype)


class Likelihood(ABC):
    """The output model p(y | f): per-example NLL and its output-space derivatives (module docstring)."""

    #: the family's name (a model's `likelihood`: categorical or gaussian)
    family: str = ""
    #: the training loss it stands for (`LOSSES`)
    loss: str = "cross_entropy"

    @abstractmethod
    def nll(self, f: Tensor, y: Tensor) -> Tensor: ...

    @abstractmethod
    def output_grad(self, f: Tensor, y: Tensor) -> Tensor: ...

    @abstractmethod
    def output_hessian_diag(self, f: Tensor) -> Tensor: ...

    @abstractmethod
    def output_hessian(self, f: Tensor) -> Tensor: ...

    @abstractmethod
    def output_hessian_sqrt(self, f: Tensor) -> Tensor: ...

    @abstractmethod
    def output_hvp(self, f: Tensor, u: Tensor) -> Tensor: ...

    @abstractmethod
    def mean(self, f: Tensor) -> Tensor: ...

    @abstractmethod
    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    @abstractmethod
    def check_targets(self, f: Tensor, y: Tensor) -> Tensor: ...

    def nll_constant(self, numel: int) -> float:
        """The constant `nll` leaves out, summed over `numel` output entries (0 but for `Gaussian`)."""
        return 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    # --- shared checks -------------------------------------------------------------------------
    def _check_outputs(self, f: Tensor, min_classes: int = 1) -> None:
        if not isinstance(f, Tensor) or f.dim() != 2:
            raise DataError(
                f"the {self.family} likelihood ({self.loss}) expects outputs of shape (n, C), received {_shape(f)}"
            )
        if f.shape[-1] < min_classes:
            raise DataError(
                f"the {self.family} likelihood needs C >= {min_classes} outputs (a classification head), received "
                f"outputs of shape {tuple(f.shape)}; use likelihood='gaussian' for regression"
            )

    def _check_labels(self, f: Tensor, y: Tensor) -> None:
        """Integer labels (n,), one per row of the outputs (shapes and dtype only: vmap-safe)."""
        self._check_outputs(f, 2)
        if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
            dtype = y.dtype if isinstance(y, Tensor) else None
            raise DataError(
                f"{self.family} targets must be integer labels of shape (n,), received dtype {dtype} shape {_shape(y)}"
            )
        if len(y) != len(f):
            raise DataError(f"expected {len(f)} targets (one per row of the outputs), received {len(y)}")

    def _check_label_values(self, f: Tensor, y: Tensor) -> None:
        c = f.shape[-1]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= c):
            raise DataError(f"labels must lie in [0, {c}), received range [{int(y.min())}, {int(y.max())}]")


class Categorical(Likelihood):
    """Softmax cross-entropy: l_i = −log softmax(f_i)[y_i], integer labels y_i ∈ [0, C)."""

    family, loss = "categorical", "cross_entropy"

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        self._check_labels(f, y)
        return F.cross_entropy(f, y, reduction="none")

    def output_grad(self, f: Tensor, y: Tensor) -> Tensor:
        """p_i − onehot(y_i), (n, C)."""
        self._check_labels(f, y)
        p = torch.softmax(f, dim=-1)
        return p - _one_hot(y, f.shape[-1], p.dtype)

    def output_hessian_diag(self, f: Tensor) -> Tensor:
        """p_i − p_i², (n, C)."""
        p = torch.softmax(f, dim=-1)
        return p - p * p

    def output_hessian(self, f: Tensor) -> Tensor:
        """diag(p_i) − p_i p_iᵀ, (n, C, C)."""
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def output_hessian_sqrt(self, f: Tensor) -> Tensor:
        """diag(√p_i) − p_i √p_iᵀ, (n, C, C)."""
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)

    def output_hvp(self, f: Tensor, u: Tensor) -> Tensor:
        """p ⊙ u − p (pᵀu), u of shape (..., n, C)."""
        p = torch.softmax(f, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def mean(self, f: Tensor) -> Tensor:
        """softmax(f_i): the class probabilities (rows sum to 1)."""
        return f.softmax(-1)

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels y_i ~ Categorical(softmax(f_i)), (n,) int64."""
        self._check_outputs(f, 2)
        return torch.multinomial(self.mean(f.detach()), 1, generator=generator).squeeze(-1)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Integer labels (n,) in [0, C), as int64."""
        self._check_labels(f, y)
        self._check_label_values(f, y)
        return y.long()


class SigmoidBCE(Likelihood):
    """One Bernoulli per class, summed: l_i = Σ_c BCE(sigmoid(f_ic), t_ic), t = onehot(y) or a 0/1 (n, C) matrix."""

    family, loss = "categorical", "sigmoid_bce"

    def _target(self, f: Tensor, y: Tensor) -> Tensor:
        if isinstance(y, Tensor) and y.dim() == 2 and tuple(y.shape) == tuple(f.shape):
            self._check_outputs(f, 1)
            return y.to(f.dtype)
        self._check_labels(f, y)
        return _one_hot(y, f.shape[-1], f.dtype)

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(f, self._target(f, y), reduction="none").sum(-1)

    def output_grad(self, f: Tensor, y: Tensor) -> Tensor:
        """sigmoid(f_i) − t_i, (n, C)."""
        return f.sigmoid() - self._target(f, y)

    def output_hessian_diag(self, f: Tensor) -> Tensor:
        """s_i − s_i², s = sigmoid(f), (n, C)."""
        s = f.sigmoid()
        return s - s * s

    def output_hessian(self, f: Tensor) -> Tensor:
        """diag(s_i ⊙ (1 − s_i)), (n, C, C)."""
        return torch.diag_embed(self.output_hessian_diag(f))

    def output_hessian_sqrt(self, f: Tensor) -> Tensor:
        """diag(√(s_i ⊙ (1 − s_i))), (n, C, C)."""
        return torch.diag_embed(self.output_hessian_diag(f).sqrt())

    def output_hvp(self, f: Tensor, u: Tensor) -> Tensor:
        """s ⊙ (1 − s) ⊙ u, u of shape (..., n, C)."""
        return self.output_hessian_diag(f) * u

    def mean(self, f: Tensor) -> Tensor:
        """sigmoid(f_i): one probability per class (rows need not sum to 1)."""
        return f.sigmoid()

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """0/1 targets t_ic ~ Bernoulli(sigmoid(f_ic)), (n, C) in f's dtype."""
        self._check_outputs(f, 1)
        return torch.bernoulli(self.mean(f.detach()), generator=generator)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Integer labels (n,) in [0, C) as int64, or a (n, C) matrix of zeros and ones."""
        if isinstance(y, Tensor) and y.dim() == 2 and tuple(y.shape) == tuple(f.shape):
            if not bool(((y == 0) | (y == 1)).all()):
                raise DataError("sigmoid_bce target matrices must hold only 0 and 1")
            return y.to(f.dtype)
        self._check_labels(f, y)
        self._check_label_values(f, y)
        return y.long()


class Gaussian(Likelihood):
    """l_i = τ/2 ‖f_i − y_i‖² (without the constant), targets of the outputs' shape (or (n,) for C = 1)."""

    family, loss = "gaussian", "cross_entropy"

    def __init__(self, noise_precision: float = 1.0) -> None:
        tau = float(noise_precision)
        if not (math.isfinite(tau) and tau > 0):
            raise ConfigError(f"the gaussian noise precision must be a finite number > 0, received {noise_precision!r}")
        self.noise_precision = tau

    def __repr__(self) -> str:
        return f"Gaussian(noise_precision={self.noise_precision})"

    def _target(self, f: Tensor, y: Tensor) -> Tensor:
        if not isinstance(f, Tensor) or f.dim() < 1:
            raise DataError(f"the gaussian likelihood expects outputs of shape (n, C), received {_shape(f)}")
        if not isinstance(y, Tensor) or y.numel() != f.numel() or (y.dim() and len(y) != len(f)):
            raise DataError(
                f"gaussian targets must have shape {tuple(f.shape)} (or (n,) for C = 1), received {_shape(y)}"
            )
        return y.reshape(f.shape)

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """τ/2 Σ_c (f_ic − y_ic)² (summed over every output entry of the example)."""
        r = f - self._target(f, y)
        return 0.5 * self.noise_precision * r.pow(2).reshape(f.shape[0], -1).sum(-1)

    def output_grad(self, f: Tensor, y: Tensor) -> Tensor:
        """τ (f_i − y_i), shape of f."""
        r = f - self._target(f, y).to(f.dtype)
        return r if self.noise_precision == 1.0 else self.noise_precision * r

    def _eye(self, f: Tensor, scale: float) -> Tensor:
        n, c = f.shape[0], f.shape[-1]
        return (scale * torch.eye(c, dtype=f.dtype, device=f.device)).expand(n, c, c)

    def output_hessian_diag(self, f: Tensor) -> Tensor:
        return torch.full_like(f, self.noise_precision)

    def output_hessian(self, f: Tensor) -> Tensor:
        """τ I, (n, C, C) (an expanded view)."""
        return self._eye(f, self.noise_precision)

    def output_hessian_sqrt(self, f: Tensor) -> Tensor:
        """√τ I, (n, C, C) (an expanded view)."""
        return self._eye(f, math.sqrt(self.noise_precision))

    def output_hvp(self, f: Tensor, u: Tensor) -> Tensor:
        """τ u (u itself for τ = 1)."""
        return u if self.noise_precision == 1.0 else self.noise_precision * u

    def mean(self, f: Tensor) -> Tensor:
        """f itself (the identity link)."""
        return f

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y_i ~ N(f_i, I/τ), shape of f."""
        f = f.detach()
        eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + eps / math.sqrt(self.noise_precision)

    def nll_constant(self, numel: int) -> float:
        """½ numel log(2π/τ): what `nll` leaves out of the full Gaussian NLL, over `numel` entries."""
        const = 0.5 * numel * math.log(2 * math.pi)
        return const if self.noise_precision == 1.0 else const - 0.5 * numel * math.log(self.noise_precision)

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Floating targets of the outputs' shape (reshaped to it), in f's dtype."""
        t = self._target(f, y)
        if not bool(torch.isfinite(t.to(f.dtype)).all()):
            raise DataError("gaussian targets contain NaN or inf")
        return t.to(f.dtype)


def likelihood_for(
    likelihood: str = "categorical", loss: str = "cross_entropy", noise_precision: float = 1.0
) -> Likelihood:
    """The likelihood object of a model with `likelihood` (categorical | gaussian) trained with `loss`
    (cross_entropy: the likelihood's own NLL; sigmoid_bce: one sigmoid per class, classification only).
    ConfigError for an unknown name or a combination that does not fit."""
    if likelihood not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss == "sigmoid_bce":
        if likelihood != "categorical":
            raise ConfigError("loss 'sigmoid_bce' needs a classification model (likelihood 'categorical')")
        return SigmoidBCE()
    if likelihood == "gaussian":
        return Gaussian(noise_precision)
    return Categorical()


__all__ = ["LIKELIHOODS", "LOSSES", "Categorical", "Gaussian", "Likelihood", "SigmoidBCE", "likelihood_for"]
