"""`gex`: influence as the covariance of loss deviations over a Geometric Ensemble
(Kim, Kim & Yang, NeurIPS 2023; the original's `la_fge`).

Ensemble: M members from *chained* fine-tuning of the trained solution θ*: member m starts where
member m−1 ended (member 1 at θ*), with a fresh SGD optimizer (momentum 0.9) run for `ft_step`
steps of the training objective  mean_batch l_i + δ/(2N)·||θ||²  on reshuffled minibatches, the
learning rate restarted each member: `cosine` (ft_lr → 0 over ft_step steps, optax's
cosine_decay_schedule) or `constant` (ft_lr, with gradient clipping at global norm 1, as the
original).

Scores (non-linearised loss deviations, uncentered second moment as in the original):

    Δl_m(z) = l(z; θ_m) − max(l(z; θ*), τ)          τ = gex_eps (0: no clipping)
    score(i, j) = (1/M) Σ_m Δl_m(z_i) Δl_m(z_j),     self_score(i) = (1/M) Σ_m Δl_m(z_i)²

`centered=True` subtracts each example's mean deviation over the members first (a covariance
instead of the original's second moment around θ*), which removes the common drift of a
fine-tuning chain that keeps lowering every training loss.

For a Gaussian ensemble θ_m − θ* ~ N(0, H⁻¹) and linearised losses Δl_m(z) ≈ g_zᵀ(θ_m − θ*) this is
g_iᵀ H⁻¹ g_j, the influence function — the package's sign convention. Unlike the original (which
returns the influence on the *average* test loss), `scores` gives one column per test example;
the average-test-loss vector is `scores(x, y).mean(1)`.

`EnsembleCovariance` is the shared machinery (also used by `la-kfac`): subclasses produce the
member deviations Δl (n, M) of any examples. `tracinrp-fge` scores with TracIn-RP over the same
members (the GEX code's `--tracinrp_fge`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modelsense.attribution.base import (
    ComputeOptions,
    FeatureAttributor,
    check_choice,
    check_int,
    check_positive,
    register,
)
from modelsense.attribution.gradient import TracInRandomProjection, _check_projection
from modelsense.core.functional import FunctionalModel, Params
from modelsense.errors import ConfigError

LR_SCHEDULES = ("cosine", "constant")


class EnsembleCovariance(FeatureAttributor):
    """score(i, j) = (1/M) Σ_m Δl_m(z_i) Δl_m(z_j) from member deviations `_deviations(x, y)` (n, M).

    Settings: gex_eps τ, the floor of the reference loss max(l(z; θ*), τ) (0: no clipping);
    centered: subtract each example's mean deviation over the members.
    """

    state_attributes = ("train_deviations_",)

    def __init__(self, gex_eps: float = 0.0, centered: bool = False, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.gex_eps = check_positive("gex_eps", gex_eps, allow_zero=True)
        self.centered = bool(centered)

    def _member_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """Losses of every member on (x, y), shape (n, M)."""
        raise NotImplementedError

    def _deviations(self, x: Tensor, y: Tensor) -> Tensor:
        ref = self._per_example_losses(self.params_, x, y)
        if self.gex_eps > 0:
            ref = ref.clamp_min(self.gex_eps)
        return self._member_losses(x, y) - ref.unsqueeze(1)

    def _scaled(self, d: Tensor) -> Tensor:
        if self.centered:
            d = d - d.mean(1, keepdim=True)
        return d / math.sqrt(d.shape[1])

    def _features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [self._scaled(self._deviations(x, y))]

    def _train_features(self, rows: slice) -> list[Tensor]:
        if getattr(self, "train_deviations_", None) is not None:
            return [self._scaled(self.train_deviations_[rows])]
        return self._features(self.x_train_[rows], self.y_train_[rows])

    def _test_features(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return self._features(x, y)

    def _self_scores(self) -> Tensor:
        return self._scaled(self.train_deviations_).pow(2).sum(1).detach().cpu()


def fine_tune_chain(
    model: FunctionalModel,
    params: Params,
    x: Tensor,
    y: Tensor,
    num_ens: int,
    ft_step: int,
    ft_lr: float,
    ft_lr_sched: str = "cosine",
    ft_bs: int = 64,
    delta: float = 1.0,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool = False,
    name: str = "gex",
) -> list[Params]:
    """Chained fine-tuning members θ_1..θ_M from θ* (see the module docstring); each a detached dict.

    Objective per step: mean_{i in batch} l_i(θ) + δ/(2N)·||θ||² with N = len(x); the batch order is a
    fresh permutation of the N examples whenever the previous one is used up (generator `seed`).
    """
    from modelsense.progress import progress_bar

    n = len(x)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    gen = torch.Generator().manual_seed(seed + 104729)
    order, pos = torch.randperm(n, generator=gen), 0
    members: list[Params] = []
    bs = min(int(ft_bs), n)
    with progress_bar(num_ens * ft_step, f"{name} fine-tuning", enabled=progress) as bar:
        for _ in range(num_ens):
            opt = torch.optim.SGD(list(theta.values()), lr=ft_lr, momentum=momentum)
            for t in range(ft_step):
                lr = ft_lr * 0.5 * (1 + math.cos(math.pi * t / ft_step)) if ft_lr_sched == "cosine" else ft_lr
                for group in opt.param_groups:
                    group["lr"] = lr
                if pos + bs > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + bs].to(x.device)
                pos += bs
                opt.zero_grad(set_to_none=True)
                loss = model.per_example_loss(theta, x[idx], y[idx]).mean()
                if delta > 0:
                    loss = loss + (delta / (2 * n)) * sum(p.pow(2).sum() for p in theta.values())
                loss.backward()
                if ft_lr_sched == "constant":
                    torch.nn.utils.clip_grad_norm_(list(theta.values()), 1.0)
                opt.step()
                bar.advance(1)
            members.append({k: v.detach().clone() for k, v in theta.items()})
    return members


class _FineTuned:
    """The settings of the chained fine-tuning (num_ens, ft_step, ft_lr, ft_lr_sched, ft_bs, delta) and its
    members, for the attributors over the geometric ensemble (`gex`, `tracinrp-fge`)."""

    def _check_fine_tuning(self, num_ens: int, ft_step: int, ft_lr: float, ft_lr_sched: str, ft_bs: int,
                           delta: float) -> None:
        self.num_ens = check_int("num_ens", num_ens)
        self.ft_step = check_int("ft_step", ft_step)
        self.ft_lr = check_positive("ft_lr", ft_lr)
        self.ft_lr_sched = check_choice("ft_lr_sched", ft_lr_sched, LR_SCHEDULES)
        self.ft_bs = check_int("ft_bs", ft_bs)
        self.delta = check_positive("delta", delta, allow_zero=True)

    def _fine_tune(self) -> list[Params]:
        """The members θ_1..θ_M of `fine_tune_chain` from the fitted θ* on the training data (generator `seed`)."""
        return fine_tune_chain(
            self.model_, self.params_, self.x_train_, self.y_train_, self.num_ens, self.ft_step, self.ft_lr,
            self.ft_lr_sched, self.ft_bs, self.delta, seed=self.seed, progress=self.compute.progress, name=self.name,
        )


@register("gex")
class GeometricEnsemble(_FineTuned, EnsembleCovariance):
    """GEX (`la_fge`): covariance of non-linearised loss deviations over chained fine-tuning members.

    Settings (flag names of the original): num_ens M, ft_step, ft_lr (peak), ft_lr_sched
    (cosine | constant), ft_bs (minibatch), delta (prior precision δ of the fine-tuning objective,
    the training's), gex_eps τ (0: no clipping of the reference loss; the original's default 0.05).

    Defaults chosen by measurement (digits, 10% symmetric label noise, MLP 64-128-128-10 trained with
    SGD lr 0.1 for 200 epochs to 99.9% train accuracy; AUC / AP of ranking the noisy labels):
    ft_lr 0.3 / ft_step 200 / 8 members gives 0.998 / 0.984 (seeds 0-2: AP 0.983-0.985; 4 or 32
    members, 800 steps, constant lr, or τ = 0.05 all within 0.995-0.998 AUC). The result is
    sensitive to the fine-tuning lr relative to the training lr: ft_lr 0.1 gives 0.96-0.98 / 0.81-0.92,
    0.05 0.93-0.98 / 0.67-0.86, and ft_lr >= 0.5 diverges (dead ReLUs, constant predictions) and
    inverts the ranking (AUC 0.07); with τ = 0.05 and ft_lr 0.05 the ranking inverts too (AUC 0.34),
    the failure the issue reports for the original's settings. A diverged ensemble raises.

    Pairwise scores are weak: LDS on digits (MLP trained on clean labels, 50 models on half-data
    subsets; `modelsense lds`) is 0.02 with the defaults, 0.04 centered, 0.07 with 32 centered members,
    and saturates near 0.15 with many short members (128 x 25 steps 0.154, 256 x 10 0.147, 512 x 5
    0.145), below grad-dot (0.22) and far below if-ekfac (0.55). A reason: near the optimum the SGD
    noise covariance is close to the curvature, so the stationary spread of the fine-tuning members is
    nearly isotropic rather than H⁻¹ (Mandt et al. 2017's Lyapunov equation), and with M members the
    score matrix has rank <= M. GEX is a self-influence method in practice (noisy labels, pruning).
    """

    needs = frozenset({"delta"})
    state_attributes = ("members_", "train_deviations_", "member_train_loss_")

    def __init__(self, num_ens: int = 8, ft_step: int = 200, ft_lr: float = 0.3, ft_lr_sched: str = "cosine",
                 ft_bs: int = 64, delta: float = 1.0, gex_eps: float = 0.0, centered: bool = False, *,
                 loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(gex_eps, centered, loss=loss, seed=seed, compute=compute)
        self._check_fine_tuning(num_ens, ft_step, ft_lr, ft_lr_sched, ft_bs, delta)

    def _fit(self) -> None:
        self.members_ = self._fine_tune()
        self.train_deviations_ = self._deviations(self.x_train_, self.y_train_)
        if not bool(torch.isfinite(self.train_deviations_).all()):
            raise ConfigError(f"gex: fine-tuning diverged (non-finite losses) at ft_lr={self.ft_lr}; lower --ft-lr")
        self._check_divergence()

    def _check_divergence(self) -> None:
        """Raise when the members' mean training loss reaches chance level ln C although θ*'s did not
        (a too large ft_lr kills the network and turns the ranking upside down)."""
        if self.model_.likelihood != "categorical" or self.loss != "cross_entropy":
            return
        ref = self._per_example_losses(self.params_, self.x_train_, self.y_train_)
        floor = ref.clamp_min(self.gex_eps) if self.gex_eps > 0 else ref
        member = (self.train_deviations_ + floor.unsqueeze(1)).mean(0)  # Δl + max(l*, τ) = member loss
        self.member_train_loss_ = member.detach().cpu()
        chance = math.log(self.model_(self.params_, self.x_train_[:1]).shape[-1])
        if float(ref.mean()) < 0.5 * chance and bool((member > 0.9 * chance).any()):
            worst = int(member.argmax())
            raise ConfigError(
                f"gex: fine-tuning diverged: member {worst} has mean training loss {float(member[worst]):.3g}, at "
                f"chance level ln C = {chance:.3g} (the trained model's is {float(ref.mean()):.3g}); lower --ft-lr "
                f"(now {self.ft_lr}) or --ft-step"
            )

    def _member_losses(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([self._per_example_losses(p, x, y) for p in self.members_], dim=1)



@register("tracinrp-fge")
class TracInRandomProjectionFge(_FineTuned, TracInRandomProjection):
    """TracIn-RP over the geometric ensemble (the GEX code's `tracinrp` with `--tracinrp_fge`):

        score(i, j) = Σ_m (G g_i(θ_m))ᵀ (G g_j(θ_m))

    over the chained fine-tuning members θ_1..θ_M of `gex` (`fine_tune_chain`, same settings and
    seed, so the members equal those of a `gex` fit with the same settings) instead of checkpoints
    of the training trajectory, with one Gaussian sketch G (d × P, N(0, 1/d)) and no learning-rate
    weights (the members have one peak learning rate). Settings: num_ens, ft_step, ft_lr,
    ft_lr_sched, ft_bs, delta (as `gex`), proj_dim d (the GEX code's `--tracinrp_dim` 20; 256 here,
    as `tracin-rp`).
    """

    needs = frozenset({"delta"})

    def __init__(
        self,
        num_ens: int = 8,
        ft_step: int = 200,
        ft_lr: float = 0.3,
        ft_lr_sched: str = "cosine",
        ft_bs: int = 64,
        delta: float = 1.0,
        proj_dim: int = 256,
        *,
        loss: str = "cross_entropy",
        seed: int = 0,
        compute: ComputeOptions | None = None,
    ) -> None:
        super().__init__(None, None, False, proj_dim, loss=loss, seed=seed, compute=compute)
        self._check_fine_tuning(num_ens, ft_step, ft_lr, ft_lr_sched, ft_bs, delta)

    def _trajectory(self) -> list[Params]:
        return self.members_

    def _fit(self) -> None:
        self.members_ = self._fine_tune()
        if not all(bool(torch.isfinite(v).all()) for member in self.members_ for v in member.values()):
            raise ConfigError(f"{self.name}: fine-tuning diverged (non-finite parameters) at ft_lr={self.ft_lr}; "
                              "lower --ft-lr")
        super()._fit()

    def _get_state(self):
        return {"members_": self.members_, **super()._get_state()}

    def _set_state(self, state) -> None:
        self.members_ = list(state["members_"])
        TracInRandomProjection._fit(self)  # the members are restored: no fine-tuning again
        _check_projection(self.projector_, state["projection_head"], self.name)
