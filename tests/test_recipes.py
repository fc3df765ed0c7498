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

from conftest import small_data, small_mlp
from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.models import build_model
from modelsense.training.config import TrainConfig, learning_rate
from modelsense.training.ensemble import train_ensemble
from modelsense.training.fit import fit


def lrs_seen_by_fit(cfg: TrainConfig, data: Dataset) -> list[float]:
    """The learning rate of the optimizer at every step of `fit`."""
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        fit(small_mlp(0), data, cfg, progress=False)
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
    assert seen == pytest.approx(
        [learning_rate(cfg, e, s, 3) for e in range(4) for s in range(3)], rel=1e-12, abs=1e-15
    )
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
    res = fit(small_mlp(2), data, cfg, progress=False)
    ref = small_mlp(2)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, betas=(0.9, 0.999), weight_decay=30.0 / 90)
    for step in range(4):
        opt.param_groups[0]["lr"] = 0.005 + 0.045 * (1 + math.cos(math.pi * step / 4)) / 2
        opt.zero_grad()
        nn.functional.cross_entropy(ref(data.x_train), data.y_train).backward()
        opt.step()
        for k, v in ref.named_parameters():
            torch.testing.assert_close(res.checkpoints[f"iteration_{step + 1}"][k], v.detach(), rtol=1e-6, atol=1e-7)
    # not Adam with the L2 term: the decay is decoupled from the moments
    adam = fit(small_mlp(2), data, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam"}), progress=False)
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
    res = train_ensemble(small_mlp, data.x_train, data.y_train, masks, cfg, seeds=seeds, queries={}, progress=False,
                         return_params=True)
    tol = 1e-5 if optimizer == "sgd" else 2e-3
    for m, seed in enumerate(seeds):
        ref = fit(small_mlp(seed), data, TrainConfig(**{**cfg.to_dict(), "seed": seed, "eval_every": 0}),
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
    res = fit(small_mlp(0), data, TrainConfig(lr=0.1, epochs=2, bs=45, schedule="warmup_cosine", warmup_ratio=0.5,
                                        checkpoint_epochs=(1, 2), eval_every=0), progress=False)
    _, rates = checkpoints_from_fit(res)
    assert rates == pytest.approx([(0 + 0.05) / 2, (0.1 + 0.05) / 2])


# -- augmentation ---------------------------------------------------------------------------------
def slow_crop_flip(x: torch.Tensor, padding: int, offsets, flips) -> torch.Tensor:
    """One example at a time: zero-pad (C, H, W) by `padding`, cut H x W at (dy, dx), flip left-right."""
    out = []
    for i in range(len(x)):
        c, h, w = x[i].shape
        img = x[i]
        if offsets is not None:
            padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
            padded[:, padding:padding + h, padding:padding + w] = img
            dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
            img = padded[:, dy:dy + h, dx:dx + w]
        if flips is not None and bool(flips[i]):
            img = torch.stack([img[:, :, w - 1 - j] for j in range(w)], dim=-1)
        out.append(img)
    return torch.stack(out)


def test_crop_and_flip_equal_the_slow_reference():
    from modelsense.data.augment import crop_flip, draw_crop_flip

    x = torch.randn(7, 2, 5, 6)
    offsets, flips = draw_crop_flip(7, 2, True, torch.Generator().manual_seed(0))
    assert offsets.shape == (7, 2) and offsets.min() >= 0 and offsets.max() <= 4 and flips.dtype == torch.bool
    for off, fl in ((offsets, flips), (offsets, None), (None, flips)):
        torch.testing.assert_close(crop_flip(x, 2, off, fl), slow_crop_flip(x, 2, off, fl), rtol=0, atol=0)
    # a shift of (1, -2) keeps the pixel values: out[:, h, w] = x[:, h + 1, w - 2] where both are inside
    out = crop_flip(x, 2, torch.tensor([[3, 0]] * 7), None)
    torch.testing.assert_close(out[:, :, :4, 2:], x[:, :, 1:, :4], rtol=0, atol=0)
    assert (out[:, :, 4:] == 0).all() and (out[:, :, :, :2] == 0).all()
    # identity: no draws, the centre crop, no flips
    assert crop_flip(x, 0, None, None) is x
    torch.testing.assert_close(
        crop_flip(x, 2, torch.full((7, 2), 2), torch.zeros(7, dtype=torch.bool)), x, rtol=0, atol=0
    )
    assert draw_crop_flip(7, 0, False, torch.Generator()) == (None, None)


def image_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 10, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].sum((1, 2)) > x[:, 0, 3:].sum((1, 2))).long() + 2 * (x[:, 0, :, :3].sum((1, 2)) > 0).long()
    return Dataset("img", x[:n], y[:n] % 3, x[n:], y[n:] % 3, 3)


def cnn(seed):
    return build_model("cnn", (1, 6, 6), 3, width=2, depth=1, seed=seed)


def test_fit_feeds_the_augmented_batches_drawn_from_the_seed():
    """The inputs the model sees = crop_flip of each batch with the draws of augment_generator(seed)
    over the epoch's order; the batch order is the one without augmentation."""
    from modelsense.data.augment import draw_crop_flip
    from modelsense.training.config import (
        augment_generator,
        batch_generator,
        epoch_batches,
    )

    data = image_data()
    cfg = TrainConfig(lr=0.05, epochs=2, bs=16, crop_padding=2, hflip=True, seed=3, eval_every=0)
    module = cnn(0)
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    fit(module, data, cfg, progress=False)
    handle.remove()
    gen, aug = batch_generator(3), augment_generator(3)
    expected = []
    for _ in range(2):
        batches = epoch_batches(torch.arange(40), 16, gen)
        off, fl = draw_crop_flip(40, 2, True, aug)
        start = 0
        for b in batches:
            expected.append(slow_crop_flip(data.x_train[b], 2, off[start:start + len(b)], fl[start:start + len(b)]))
            start += len(b)
    assert len(seen) == len(expected) == 6
    for a, b in zip(seen, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # off by default: the data as they are, in the same batches
    plain = TrainConfig(lr=0.05, epochs=2, bs=16, seed=3, eval_every=0)
    assert plain.crop_padding == 0 and plain.hflip is False and plain.mixup_alpha == 0.0
    module, seen = cnn(0), []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    fit(module, data, plain, progress=False)
    handle.remove()
    gen = batch_generator(3)
    plain_batches = [data.x_train[b] for _ in range(2) for b in epoch_batches(torch.arange(40), 16, gen)]
    assert len(seen) == len(plain_batches) and all(torch.equal(a, b) for a, b in zip(seen, plain_batches))


def test_augmented_fit_is_deterministic_and_the_engine_matches_it():
    data = image_data()
    cfg = TrainConfig(lr=0.05, epochs=3, bs=16, crop_padding=1, hflip=True, eval_every=0)
    a = fit(cnn(0), data, TrainConfig(**{**cfg.to_dict(), "seed": 4}), progress=False).params
    b = fit(cnn(0), data, TrainConfig(**{**cfg.to_dict(), "seed": 4}), progress=False).params
    c = fit(cnn(0), data, TrainConfig(**{**cfg.to_dict(), "seed": 5}), progress=False).params
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["out.weight"], c["out.weight"])
    masks = torch.ones(2, 40, dtype=torch.bool)
    masks[1, 25:] = False
    res = train_ensemble(cnn, data.x_train, data.y_train, masks, cfg, seeds=[4, 7], queries={}, progress=False,
                         return_params=True)
    for m, seed in enumerate((4, 7)):
        ref = fit(cnn(seed), data, TrainConfig(**{**cfg.to_dict(), "seed": seed}),
                  train_indices=masks[m].nonzero().flatten(), progress=False)
        for k, v in ref.params.items():
            torch.testing.assert_close(res.params[k][m], v, atol=1e-5, rtol=1e-5)


def test_augmentation_and_mixup_refuse_what_they_cannot_do():
    data = small_data()  # vectors
    for bad in ({"crop_padding": 2}, {"hflip": True}):
        with pytest.raises(ConfigError, match=r"needs images of shape \(C, H, W\).*\(6,\)"):
            fit(small_mlp(0), data, TrainConfig(epochs=1, **bad), progress=False)
        with pytest.raises(ConfigError, match="needs images"):
            train_ensemble(small_mlp, data.x_train, data.y_train, torch.ones(1, 90, dtype=torch.bool),
                           TrainConfig(epochs=1, **bad), progress=False)
    with pytest.raises(ConfigError, match="does not train with mixup"):
        train_ensemble(small_mlp, data.x_train, data.y_train, torch.ones(1, 90, dtype=torch.bool),
                       TrainConfig(epochs=1, mixup_alpha=0.2), progress=False)
    for bad, msg in (
        ({"crop_padding": -1}, "crop_padding must be an int >= 0"),
        ({"crop_padding": 1.5}, "crop_padding"),
        ({"mixup_alpha": -0.1}, "mixup_alpha"),
        ({"mixup_alpha": float("nan")}, "mixup_alpha"),
    ):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="classification"):
        fit(nn.Linear(6, 1), Dataset("r", data.x_train, data.x_train[:, 0], data.x_test, data.x_test[:, 0], 0),
            TrainConfig(epochs=1, mixup_alpha=0.2), likelihood="gaussian", progress=False)


# -- mixup ----------------------------------------------------------------------------------------
def test_mixup_step_equals_the_mixed_objective():
    """One full-batch SGD step (no momentum) with mixup α: θ − lr (∇[λ CE(f(x̃), y) + (1 − λ) CE(f(x̃), y_π)]
    + δ/N θ), x̃ = λ x + (1 − λ) x_π, with λ and π drawn from mixup_rng(seed)."""
    from modelsense.data.augment import draw_mixup
    from modelsense.training.config import mixup_rng

    data = small_data()
    module = small_mlp(1)
    theta0 = {k: v.detach().clone() for k, v in module.named_parameters()}
    cfg = TrainConfig(lr=0.5, epochs=1, bs=90, delta=3.0, momentum=0.0, fixed_batches=True, mixup_alpha=0.4, seed=2,
                      eval_every=0)
    fit(module, data, cfg, progress=False)
    lam, pair = draw_mixup(90, 0.4, mixup_rng(2))
    assert 0 < lam < 1 and sorted(pair.tolist()) == list(range(90))
    ref = small_mlp(1)
    x = data.x_train
    out = ref(lam * x + (1 - lam) * x[pair])
    loss = lam * nn.functional.cross_entropy(out, data.y_train) + (1 - lam) * nn.functional.cross_entropy(
        out, data.y_train[pair]
    )
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (k, _), g in zip(ref.named_parameters(), grads):
        expected = theta0[k] - 0.5 * (g + 3.0 / 90 * theta0[k])
        torch.testing.assert_close(dict(module.named_parameters())[k].detach(), expected, atol=1e-6, rtol=1e-5)


# -- the recipe of a checkpoint -------------------------------------------------------------------
def test_the_recipe_records_the_new_options_and_checkpoint_runs_follow_it(tmp_path):
    from typer.testing import CliRunner

    from modelsense.cli.app import app
    from modelsense.experiments.source import checkpoint_recipe, recipe_differences
    from modelsense.retraining.store import RetrainRecipe

    runner = CliRunner()
    out = tmp_path / "t"
    args = ["train", "--dataset", "digits", "--n-train", "60", "--model", "resnet20", "--width", "2", "--epochs", "2",
            "--optimizer", "adamw", "--schedule", "step", "--milestones", "1", "--gamma", "0.5", "--crop-padding", "2",
            "--hflip", "--mixup-alpha", "0.2", "--quiet", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    recipe, _, _ = checkpoint_recipe(out / "model.pt")
    t = recipe.train
    assert (t.optimizer, t.schedule, t.milestones, t.gamma, t.crop_padding, t.hflip, t.mixup_alpha) == (
        "adamw", "step", (1,), 0.5, 2, True, 0.2)
    assert recipe.model.name == "resnet20" and recipe.model.width == 2
    plain = TrainConfig(**{**t.to_dict(), "crop_padding": 0, "hflip": False})
    assert {d[1] for d in recipe_differences(recipe, train_cfg=plain)} == {"crop_padding", "hflip"}
    # a command on the checkpoint takes its recipe, and refuses a contradicting option, writing nothing
    res = runner.invoke(app, ["influence", "--checkpoint", str(out / "model.pt"), "--crop-padding", "0", "--method",
                              "loss", "--self", "--quiet", "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, ConfigError) and "--crop-padding 0 (the checkpoint's: 2)" in str(res.exception)
    assert not (tmp_path / "x").exists()
    # retraining ground truth keys: the new options count when set, and leave older stores' keys alone at defaults
    no_mixup = TrainConfig(**{**t.to_dict(), "mixup_alpha": 0.0})
    key = RetrainRecipe(recipe.data, recipe.model, no_mixup).key()["train"]
    assert key["crop_padding"] == 2 and key["schedule"] == "step" and "mixup_alpha" not in key
    default_key = RetrainRecipe(recipe.data, recipe.model, TrainConfig()).key()["train"]
    assert not {"schedule", "warmup_ratio", "milestones", "gamma", "crop_padding", "hflip", "mixup_alpha"} & set(
        default_key
    )
    with pytest.raises(ConfigError, match="without mixup"):
        RetrainRecipe(recipe.data, recipe.model, t)
