"""Training recipes of the originals: learning-rate schedules, AdamW, image augmentation, mixup.

Each schedule against its closed form and against fit's optimizer at every step; AdamW against
torch.optim.AdamW step by step; the engine against fit; crops and flips against a slow per-example
reference; the recipe of a checkpoint carries the new options.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.models import build_model
from modelsense.training.config import TrainConfig, learning_rate
from modelsense.training.ensemble import train_ensemble
from modelsense.training.fit import fit


def small_data(n=120, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, c, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, c, generator=g)).argmax(1)
    return Dataset("toy", x[:90], y[:90], x[90:], y[90:], c)


def mlp(seed, d=6, c=3):
    return build_model("mlp", (d,), c, widths=(16,), seed=seed)


def lrs_seen_by_fit(cfg: TrainConfig, data: Dataset) -> list[float]:
    """The learning rate of the optimizer at every step of `fit`."""
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        fit(mlp(0), data, cfg, progress=False)
    finally:
        handle.remove()
    return seen


# -- schedules ------------------------------------------------------------------------------------
def test_step_schedule_is_multisteplr():
    cfg = TrainConfig(lr=0.1, epochs=6, schedule="step", milestones=(2, 4), gamma=0.5)
    assert [learning_rate(cfg, e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-12)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    for e in range(6):
        assert learning_rate(cfg, e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    assert [learning_rate(TrainConfig(lr=0.3, epochs=3, schedule="step"), e) for e in range(3)] == [0.3] * 3


def test_swag_schedule_closed_form():
    """swag.utils.schedule with budget E: constant to t = 0.5, linear to lrmin at t = 0.9, then lrmin."""
    cfg = TrainConfig(lr=0.1, lrmin=0.001, epochs=10, schedule="swag")
    expected = [0.1] * 6 + [0.1 * (1 - 0.99 * (t - 0.5) / 0.4) for t in (0.6, 0.7, 0.8)] + [0.001]
    assert [learning_rate(cfg, e) for e in range(10)] == pytest.approx(expected, rel=1e-12)
    assert learning_rate(cfg, 9) == pytest.approx(0.001) and learning_rate(cfg, 6) == pytest.approx(0.07525)


def test_warmup_cosine_closed_form():
    """optax.warmup_cosine_decay_schedule(0, lr, W, K, lrmin): linear from 0 over W steps, then cosine."""
    cfg = TrainConfig(lr=0.2, lrmin=0.02, epochs=2, schedule="warmup_cosine", warmup_ratio=0.2)
    per_step = [learning_rate(cfg, e, s, 5) for e in range(2) for s in range(5)]  # K = 10 steps, W = 2
    expected = [0.0, 0.1] + [0.02 + 0.18 * (1 + math.cos(math.pi * j / 8)) / 2 for j in range(8)]
    assert per_step == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert per_step[6] == pytest.approx(0.11)  # halfway through the decay
    no_warmup = TrainConfig(lr=0.2, epochs=2, schedule="warmup_cosine", warmup_ratio=0.0)
    assert learning_rate(no_warmup, 0, 0, 5) == pytest.approx(0.2)


@pytest.mark.parametrize("schedule,extra", [("cosine", {"lrmin": 0.01}), ("step", {"milestones": (1, 2), "gamma": 0.3}),
                                            ("swag", {"lrmin": 0.01}),
                                            ("warmup_cosine", {"lrmin": 0.01, "warmup_ratio": 0.3})])
def test_fit_uses_the_schedule_at_every_step(schedule, extra):
    """90 examples in batches of 32: 3 steps per epoch; fit's optimizer holds learning_rate(e, s, 3)."""
    data = small_data()
    cfg = TrainConfig(lr=0.1, epochs=4, bs=32, schedule=schedule, eval_every=0, **extra)
    seen = lrs_seen_by_fit(cfg, data)
    assert seen == pytest.approx([learning_rate(cfg, e, s, 3) for e in range(4) for s in range(3)], rel=1e-12, abs=1e-15)
    if schedule == "warmup_cosine":  # W = floor(0.3 · 12) = 3 warm-up steps from 0
        assert seen[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    if schedule == "step":
        assert seen == pytest.approx([0.1] * 3 + [0.03] * 3 + [0.009] * 6)


def test_default_schedule_is_unchanged():
    data = small_data()
    cfg = TrainConfig(lr=0.1, lrmin=0.001, epochs=3, bs=32, eval_every=0)
    assert cfg.schedule == "cosine"
    seen = lrs_seen_by_fit(cfg, data)
    assert seen == [0.1] * 3 + [0.001 + 0.099 * (1 + math.cos(math.pi * e / 3)) / 2 for e in (1, 2) for _ in range(3)]


@pytest.mark.parametrize("bad,msg", [({"schedule": "linear"}, "unknown schedule 'linear'"),
                                     ({"milestones": (3,)}, "--milestones are for --schedule step"),
                                     ({"schedule": "step", "milestones": (3, 2)}, "increasing epochs"),
                                     ({"schedule": "step", "milestones": (0,)}, "increasing epochs"),
                                     ({"schedule": "step", "gamma": 0.0}, "gamma must be"),
                                     ({"schedule": "step", "lrmin": 0.01}, "no final learning rate"),
                                     ({"schedule": "warmup_cosine", "warmup_ratio": 1.0}, "warmup_ratio"),
                                     ({"warmup_ratio": float("nan")}, "warmup_ratio")])
def test_schedule_options_are_checked(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**bad)


# -- AdamW ----------------------------------------------------------------------------------------
def test_adamw_equals_torch_adamw_step_by_step():
    """fit with adamw = torch.optim.AdamW(lr, betas (0.9, 0.999), weight_decay δ/N) on the mean loss
    with no L2 term, after every step (full batches: one step per epoch, cosine lr)."""
    data = small_data()
    cfg = TrainConfig(optimizer="adamw", lr=0.05, lrmin=0.005, epochs=4, bs=90, delta=30.0, fixed_batches=True,
                      checkpoint_iterations=(1, 2, 3, 4), eval_every=0)
    res = fit(mlp(2), data, cfg, progress=False)
    ref = mlp(2)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, betas=(0.9, 0.999), weight_decay=30.0 / 90)
    for step in range(4):
        opt.param_groups[0]["lr"] = 0.005 + 0.045 * (1 + math.cos(math.pi * step / 4)) / 2
        opt.zero_grad()
        nn.functional.cross_entropy(ref(data.x_train), data.y_train).backward()
        opt.step()
        for k, v in ref.named_parameters():
            torch.testing.assert_close(res.checkpoints[f"iteration_{step + 1}"][k], v.detach(), rtol=1e-6, atol=1e-7)
    # not Adam with the L2 term: the decay is decoupled from the moments
    adam = fit(mlp(2), data, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam"}), progress=False)
    assert not torch.allclose(adam.params["out.weight"], res.params["out.weight"], atol=1e-4)
    assert res.optimizer.param_groups[0]["weight_decay"] == pytest.approx(30.0 / 90)


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "cosine"), ("sgd", "warmup_cosine"), ("adam", "step"),
                                                ("adamw", "warmup_cosine")])
def test_engine_equals_fit_with_adamw_and_schedules(optimizer, schedule):
    """M models at once = fit one by one, with models of different steps per epoch (warmup_cosine then
    follows each model's own step count)."""
    data = small_data()
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 90, generator=g) < 0.6
    masks[2] = False
    masks[2, :20] = True  # 2 steps per epoch where the others have 4
    extra = {"step": {"milestones": (2,), "gamma": 0.5}, "warmup_cosine": {"warmup_ratio": 0.25, "lrmin": 0.001},
             "cosine": {"lrmin": 0.001}}[schedule]
    cfg = TrainConfig(optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01, epochs=4, bs=16, delta=2.0,
                      schedule=schedule, **extra)
    seeds = [5, 6, 7]
    res = train_ensemble(mlp, data.x_train, data.y_train, masks, cfg, seeds=seeds, queries={}, progress=False,
                         return_params=True)
    tol = 1e-5 if optimizer == "sgd" else 2e-3
    for m, seed in enumerate(seeds):
        ref = fit(mlp(seed), data, TrainConfig(**{**cfg.to_dict(), "seed": seed, "eval_every": 0}),
                  train_indices=masks[m].nonzero().flatten(), progress=False)
        for k, v in ref.params.items():
            torch.testing.assert_close(res.params[k][m], v, atol=tol, rtol=tol)


def test_schedule_reaches_the_relaxation_and_tracin_weights():
    """The retraining relaxation sums the schedule's rates over all steps; TracIn weighs an epoch
    checkpoint by the mean rate of that epoch."""
    from modelsense.attribution.gradient import checkpoints_from_fit
    from modelsense.mpe.ground_truth import retraining_relaxation

    cfg = TrainConfig(lr=0.1, epochs=4, bs=10, delta=2.0, momentum=0.5, schedule="step", milestones=(2,), gamma=0.5)
    assert retraining_relaxation(cfg, 95) == pytest.approx(2.0 * 10 * (0.1 + 0.1 + 0.05 + 0.05) / (0.5 * 95))
    warm = TrainConfig(lr=0.1, epochs=2, bs=50, delta=1.0, momentum=0.0, schedule="warmup_cosine", warmup_ratio=0.5)
    # 100 examples: 2 steps per epoch, K = 4, W = 2: rates 0, 0.05, 0.1, 0.05
    assert retraining_relaxation(warm, 100) == pytest.approx((0 + 0.05 + 0.1 + 0.05) / 100)
    data = small_data()
    res = fit(mlp(0), data, TrainConfig(lr=0.1, epochs=2, bs=45, schedule="warmup_cosine", warmup_ratio=0.5,
                                        checkpoint_epochs=(1, 2), eval_every=0), progress=False)
    _, rates = checkpoints_from_fit(res)
    assert rates == pytest.approx([(0 + 0.05) / 2, (0.1 + 0.05) / 2])
