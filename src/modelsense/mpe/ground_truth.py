"""Ground truth for the MPE: the model retrained without one example (LOO) or one class (LOCO).

Two ways, both warm-started from the trained parameters θ* and both vectorised over the removed
sets (one model per row of a mask matrix):

`retrain_without` (the original's procedure, SEEDS.md 0.5 scripts 3 and 5): minibatch SGD/Adam on
    the N − |G| remaining examples with the cosine schedule of `cfg`, minimising
    mean_batch l + δ/(2(N − |G|)) ‖θ‖², by the retraining engine `train_ensemble` (M models at once).
    All models share one seed. With `shared_batches=True` (default) the engine's shared batch plan
    (`train_ensemble(..., batch_plan="shared")`) keeps the removed examples in the batches with
    weight 0, so every model sees exactly the control's minibatches minus the removed examples, each
    step the mean loss over the rest of its batch (a batch of removed examples only is skipped), with
    prior δ/(2(N − |G|)) (common random numbers: the SGD noise is the same in all models and cancels
    in differences); with False they are dropped from the index list and the batches after them
    shift. A *control* model retrained the same way on all N examples measures the drift of the
    procedure itself (SGD noise, unfinished convergence); deviations measured against the control
    isolate the effect of the removal. `retrain_without_in_store` trains the same models (shared
    batches, control last) as jobs of the resumable ground-truth store, locally or on Ray, also from
    the initialisation instead of θ* (`mpe_recipe`); the `modelsense mpe` commands use it.

`refit_without_lbfgs` (convergence): full-batch L-BFGS on Σ_{j∉G} l_j(θ) + δ/2 ‖θ‖² for all M models
    jointly (the objectives are separable, so the joint minimiser is the tuple of minimisers), until
    every entry of the (divided) gradient falls below `tol` in magnitude, then, for small models, a
    few exact Newton steps per model in float64. L-BFGS alone stalls once the objective's changes
    reach its rounding error (its line search compares objective values), at a gradient that depends
    on the CPU and thread count; Newton steps use the gradient and Hessian only and converge
    quadratically to the float64 floor. For convex models (linear/logistic) this is the exact LOO refit.

How long warm-started retraining must run (`retraining_relaxation`): removing example i moves the
optimum by about H^{-1} ∇l_i (H = Σ_j ∇²l_j + δI, the summed objective's Hessian), which weighs most
the directions of smallest curvature, where the data constrain little and H ≈ δI. Momentum SGD on
the mean objective (curvature H/N) contracts a component of curvature λ by exp(−η λ / ((1 − β) N))
per step, so the slowest components of the retrained deviation reach only 1 − e^{−R} of the
converged one, R = δ Σ_t η_t / ((1 − β) N). On the digits MLP 64-64-10 (δ = 10, N = 1297, tanh,
48 examples) warm-started retraining recovered 14 % of the L-BFGS-converged deviation at R = 0.03
(5 epochs, lr 0.01, bs 128), 82 % at R = 0.9 and 102 % at R = 6.4 (Pearson 0.998); with ReLU,
against R = 6.4: 15 % at R = 0.03, 80 % at R = 0.9, 96-106 % at R = 3.2-3.3 (Pearson >= 0.997).
R >= 3 is needed (`MIN_RELAXATION`); below it the retrained deviations, not the estimates, are too
small. The cosine decay matters: a constant lr (R = 4.9) ends in SGD noise (184 %, Pearson 0.95).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from modelsense.core.functional import Params
from modelsense.core.likelihood import likelihood_for
from modelsense.data import DataConfig, Dataset
from modelsense.errors import ConfigError
from modelsense.models import ModelConfig
from modelsense.retraining.store import RetrainOptions, RetrainRecipe, jobs_from, params_digest, retrain
from modelsense.training.config import TrainConfig, learning_rate
from modelsense.training.ensemble import EnsembleResult, train_ensemble

#: warm-started retraining shorter than this (`retraining_relaxation`) underestimates the true deviations
MIN_RELAXATION = 3.0


def retraining_relaxation(cfg: TrainConfig, n: int) -> float:
    """R = δ Σ_t η_t / ((1 − β) n): e-folds by which SGD retraining with `cfg` (momentum β, lr η_t of
    step t on its schedule, ceil(n / bs) steps per epoch) on n examples contracts the slowest
    (prior-only, curvature δ) component of its distance to the optimum (see the module docstring).
    The distance left is about e^{−R} of the start: R >= MIN_RELAXATION for a converged ground truth.
    """
    if cfg.optimizer != "sgd":
        raise ConfigError(f"the relaxation of retraining is defined for sgd, received {cfg.optimizer!r}")
    if n < 1:
        raise ConfigError(f"n must be >= 1, received {n}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"the relaxation of retraining needs a momentum in [0, 1), received {cfg.momentum}")
    steps = math.ceil(n / cfg.bs)
    if cfg.schedule == "warmup_cosine":  # changes within an epoch
        lr_sum = sum(learning_rate(cfg, e, s, steps) for e in range(cfg.epochs) for s in range(steps))
    else:
        lr_sum = steps * sum(learning_rate(cfg, epoch) for epoch in range(cfg.epochs))
    return float(cfg.delta * lr_sum / ((1.0 - cfg.momentum) * n))


def leave_out_masks(n: int, removed: list[Tensor] | Tensor) -> Tensor:
    """(M, N) bool masks, row m False exactly at the examples of removed[m].

    `removed`: a (M,) tensor of single example indices (LOO) or a list of index tensors (groups).
    """
    if isinstance(removed, Tensor) and removed.dim() == 1:
        removed = [r.reshape(1) for r in removed]
    masks = torch.ones(len(removed), n, dtype=torch.bool)
    for m, idx in enumerate(removed):
        idx = torch.as_tensor(idx).long().flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ConfigError(
                f"removed indices must lie in [0, {n}), received range [{int(idx.min())}, {int(idx.max())}]"
            )
        masks[m, idx] = False
    return masks


def retrain_without_in_store(recipe: RetrainRecipe, data: Dataset, removed: list[Tensor] | Tensor,
                             options: RetrainOptions, run_path: str | Path, *, init_params: Params | None = None,
                             progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """The retraining of `retrain_without` as jobs of the ground-truth store (resumable, local or Ray;
    `retraining.store.retrain`): one model without each removed set and a control model on all N
    examples as the last row, all with the seed `recipe.train.seed`, warm-started from `init_params`
    (`recipe.init` = "warm:<their digest>", `mpe_recipe`) or trained from the initialisation.

    Returns the store's tables over the M + 1 models (e.g. `train_logits` (M + 1, N, C), `test_loss`
    (M + 1, n_test), `test_correct`).
    """
    masks = torch.cat([leave_out_masks(data.n_train, removed), torch.ones(1, data.n_train, dtype=torch.bool)])
    return retrain(recipe, jobs_from(masks.numpy(), [recipe.train.seed] * len(masks)), options, run_path, data=data,
                   init_params=init_params, progress=progress, log=log)


def mpe_recipe(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
               init_params: Params | None = None) -> RetrainRecipe:
    """The recipe of the MPE's ground truth: shared minibatches (the control's minus the removed
    examples), logits kept, warm-started from `init_params` or (None) trained from the initialisation."""
    init = "scratch" if init_params is None else f"warm:{params_digest(init_params)}"
    return RetrainRecipe(data_cfg, model_cfg, train_cfg, batch_plan="shared", init=init, logits=True)


@dataclass
class RetrainResult:
    """Outputs of the retrained models.

    Attributes:
        outputs: query name -> {"logits": (M, n, C), "loss": (M, n), ...} (see EnsembleResult).
        control: the same for the control model trained on all examples ((1, n, C) ...), or None.
        seconds: wall time of the retraining.
    """

    outputs: dict[str, dict[str, Tensor]]
    control: dict[str, dict[str, Tensor]] | None
    seconds: float


def retrain_without(
    model_fn: Callable[[int], nn.Module],
    x: Tensor,
    y: Tensor,
    removed: list[Tensor] | Tensor,
    cfg: TrainConfig,
    init_params: Params,
    queries: dict[str, tuple[Tensor, Tensor]],
    *,
    control: bool = True,
    shared_batches: bool = True,
    chunk_models: int | None = None,
    likelihood: str = "categorical",
    progress: bool = True,
) -> RetrainResult:
    """Warm-started minibatch retraining without each removed set, M = len(removed) models at once.

    Every model (and the control, trained on all N examples, appended as the last row) uses the
    seed `cfg.seed`; see the module docstring for `shared_batches`.
    """
    masks = leave_out_masks(len(x), removed)
    if control:
        masks = torch.cat([masks, torch.ones(1, len(x), dtype=torch.bool)])
    seeds = torch.full((len(masks),), int(cfg.seed), dtype=torch.long)
    start = time.perf_counter()
    res: EnsembleResult = train_ensemble(
        model_fn, x, y, masks, cfg, seeds=seeds, queries=queries, init_params=init_params,
        chunk_models=chunk_models, likelihood=likelihood, progress=progress,
        batch_plan="shared" if shared_batches else "own",
    )
    seconds = time.perf_counter() - start
    if not control:
        return RetrainResult(res.outputs, None, seconds)
    outs = {q: {k: v[:-1] for k, v in o.items()} for q, o in res.outputs.items()}
    ctrl = {q: {k: v[-1:] for k, v in o.items()} for q, o in res.outputs.items()}
    return RetrainResult(outs, ctrl, seconds)


def true_loo_logits(
    model_fn: Callable[[int], nn.Module],
    x: Tensor,
    y: Tensor,
    indices: Tensor,
    cfg: TrainConfig,
    init_params: Params,
    *,
    shared_batches: bool = True,
    chunk_models: int | None = None,
    likelihood: str = "categorical",
    progress: bool = True,
) -> tuple[Tensor, Tensor, float]:
    """Logits of each removed example i under the model retrained without it, (M, C), the control
    model's logits on the same examples (M, C), and the seconds the retraining took."""
    indices = torch.as_tensor(indices).long().flatten()
    res = retrain_without(
        model_fn,
        x,
        y,
        indices,
        cfg,
        init_params,
        {"removed": (x[indices], y[indices])},
        shared_batches=shared_batches,
        chunk_models=chunk_models,
        likelihood=likelihood,
        progress=progress,
    )
    logits = res.outputs["removed"]["logits"]  # (M, M, C): model m on removed example j
    diag = logits[torch.arange(len(indices)), torch.arange(len(indices))]
    return diag, res.control["removed"]["logits"][0], res.seconds


def true_loo_logits_loop(
    model_fn: Callable[[int], nn.Module],
    data,
    indices: Tensor,
    cfg: TrainConfig,
    init_params: Params,
    likelihood: str = "categorical",
) -> tuple[Tensor, float]:
    """The same as `true_loo_logits` one model at a time with `fit` (the original's loop), for timing
    and cross-checks: (M, C) logits and seconds."""
    from modelsense.training.fit import fit

    indices = torch.as_tensor(indices).long().flatten()
    start = time.perf_counter()
    out = []
    for i in indices.tolist():
        module = model_fn(cfg.seed)
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(init_params[n])
        keep = torch.cat([torch.arange(i), torch.arange(i + 1, data.n_train)])
        cfg_i = TrainConfig(**{**cfg.to_dict(), "eval_every": 0})
        f = fit(module, data, cfg_i, train_indices=keep, likelihood=likelihood, progress=False)
        with torch.no_grad():
            out.append(f.module(data.x_train[i : i + 1])[0])
    return torch.stack(out), time.perf_counter() - start


def refit_without_lbfgs(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    removed: list[Tensor] | Tensor,
    delta: float,
    init_params: Params,
    *,
    likelihood: str = "categorical",
    max_iter: int = 500,
    tol: float = 1e-6,
    history_size: int = 50,
    newton_steps: int | None = None,
) -> tuple[Params, dict]:
    """Refit M models to convergence, model m minimising Σ_{j ∉ removed[m]} l_j(θ) + δ/2 ‖θ‖².

    Full-batch L-BFGS (strong Wolfe line search) on the sum of the M separable objectives, divided
    by N; stops when every gradient entry is below `tol` in magnitude or after `max_iter` iterations.
    Then up to `newton_steps` Newton steps θ_m ← θ_m − H_m⁻¹ ∇_m per model, in float64 with the exact
    Hessian H_m of model m's divided objective (see `_newton_finish`); None (default) means
    `NEWTON_STEPS` when a model has at most `NEWTON_MAX_PARAMS` parameters and none otherwise.
    Returns the stacked parameters name -> (M, *shape) and {"iterations" (L-BFGS), "newton_steps"
    (taken), "max_grad_norm" (max_m ‖∇_m‖, at the precision of `init_params`), "seconds"}.
    `init_params`: one start shared by all models (name -> shape) or one per model (name -> (M, *shape)).
    Precision follows `init_params` (use float64 for exactness tests).
    """
    if delta < 0:
        raise ConfigError(f"delta must be >= 0, received {delta}")
    if newton_steps is not None and newton_steps < 0:
        raise ConfigError(f"newton_steps must be >= 0 or None, received {newton_steps}")
    masks = leave_out_masks(len(x), removed)
    dtype = next(iter(init_params.values())).dtype
    w = masks.to(dtype)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    consts = {n: b for n, b in module.named_buffers()}
    n_total = float(len(x))
    if dtype.is_floating_point and x.is_floating_point():
        x = x.to(dtype)
    M = len(masks)
    shapes = [p.shape for n, p in module.named_parameters() if n in names]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    per_model = all(init_params[n].shape == (M, *s) for n, s in zip(names, shapes))
    if per_model:
        theta = torch.cat([init_params[n].detach().reshape(M, -1) for n in names], dim=1).to(dtype).clone()
    else:
        theta = torch.cat([init_params[n].detach().reshape(-1) for n in names]).to(dtype).expand(M, -1).clone()
    theta.requires_grad_(True)

    def unflat(t: Tensor) -> Params:
        return {n: c.reshape(s) for n, c, s in zip(names, t.split(sizes), shapes)}

    nll = likelihood_for(likelihood).nll

    def objective(t: Tensor, wm: Tensor) -> Tensor:
        out = functional_call(module, {**consts, **unflat(t)}, (x,))
        return ((wm * nll(out, y)).sum() + 0.5 * delta * t.pow(2).sum()) / n_total

    batched = vmap(objective)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, history_size=history_size, tolerance_grad=tol,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = batched(theta, w).sum()
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    out = theta.detach()
    if newton_steps is None:
        newton_steps = NEWTON_STEPS if sum(sizes) <= NEWTON_MAX_PARAMS else 0
    taken = 0
    if newton_steps:
        def objective64(t: Tensor, wm: Tensor) -> Tensor:
            c64 = {n: b.double() if b.is_floating_point() else b for n, b in consts.items()}
            x64 = x.double() if x.is_floating_point() else x
            out64 = functional_call(module, {**c64, **unflat(t)}, (x64,))
            return ((wm * nll(out64, y)).sum() + 0.5 * delta * t.pow(2).sum()) / n_total

        theta64, taken = _newton_finish(objective64, out.double(), w.double(), newton_steps, tol)
        out = theta64.to(dtype)
    g = torch.func.grad(lambda t: batched(t, w).sum())(out)
    info = {"iterations": int(opt.state[theta].get("n_iter", 0)), "newton_steps": taken,
            "max_grad_norm": float(g.norm(dim=1).max()), "seconds": time.perf_counter() - start}
    return {n: c.reshape(M, *s) for n, c, s in zip(names, out.split(sizes, dim=1), shapes)}, info


NEWTON_STEPS = 5
"""Newton steps `refit_without_lbfgs` takes by default after L-BFGS (quadratic convergence: from an
L-BFGS result two or three reach the float64 floor)."""
NEWTON_MAX_PARAMS = 1024
"""Largest parameter count per model for which `refit_without_lbfgs` takes Newton steps by default
(the dense Hessian is P × P per model)."""


def _newton_finish(objective: Callable[[Tensor, Tensor], Tensor], theta: Tensor, w: Tensor, steps: int,
                   tol: float) -> tuple[Tensor, int]:
    """Up to `steps` Newton steps θ_m ← θ_m − H_m⁻¹ ∇_m on each row of theta (M, P), model m minimising
    objective(θ_m, w_m); returns the new theta and the number of steps taken.

    A model whose gradient entries are all below `tol` in magnitude, whose Hessian is not positive
    definite (Cholesky fails: a non-convex model away from a minimum) or whose step does not reduce
    ‖∇_m‖ keeps its parameters; the loop ends when no model moves. The Hessians are built for
    chunks of models, at most 2^24 Hessian entries at a time.
    """
    grad = vmap(torch.func.grad(objective))
    hess = vmap(torch.func.hessian(objective))
    M, P = theta.shape
    chunk = max(1, 2**24 // (P * P))
    g = grad(theta, w)
    taken = 0
    for _ in range(steps):
        active = g.abs().amax(dim=1) > tol
        if not active.any():
            break
        step = torch.zeros_like(theta)
        for lo in range(0, M, chunk):
            sl = slice(lo, lo + chunk)
            L, fail = torch.linalg.cholesky_ex(hess(theta[sl], w[sl]))
            ok = active[sl] & (fail == 0)
            step[sl] = torch.where(ok[:, None], torch.cholesky_solve(g[sl, :, None], L)[..., 0], 0.0)
        new_theta = theta - step
        new_g = grad(new_theta, w)
        better = step.abs().amax(dim=1).gt(0) & (new_g.norm(dim=1) < g.norm(dim=1))
        if not better.any():
            break
        theta = torch.where(better[:, None], new_theta, theta)
        g = torch.where(better[:, None], new_g, g)
        taken += 1
    return theta, taken


def stacked_logits(module: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Outputs of M stacked models on x, (M, n, C)."""
    consts = {n: b for n, b in module.named_buffers()}
    dtype = next(iter(params.values())).dtype
    x = x.to(dtype) if x.is_floating_point() else x
    with torch.no_grad():
        return vmap(lambda p: functional_call(module, {**consts, **p}, (x,)))(params)
