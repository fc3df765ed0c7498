import pytest
import torch
from torch import nn

from conftest import small_data, small_mlp
from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.models import build_model
from modelsense.training.config import TrainConfig, batch_generator, cosine_lr, epoch_batches
from modelsense.training.ensemble import train_ensemble
from modelsense.training.fit import fit, l2_penalty, make_optimizer


def test_cosine_schedule_matches_torch():
    cfg = TrainConfig(lr=0.1, lrmin=0.001, epochs=7)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.001)
    for e in range(7):
        assert cosine_lr(cfg, e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_epoch_batches_reshuffle_and_fixed():
    idx = torch.arange(10)
    g = batch_generator(0)
    e1, e2 = torch.cat(epoch_batches(idx, 4, g)), torch.cat(epoch_batches(idx, 4, g))
    assert sorted(e1.tolist()) == list(range(10)) and not torch.equal(e1, e2)
    fixed = epoch_batches(idx, 4, g, fixed=True)
    assert [len(b) for b in fixed] == [4, 4, 2] and torch.equal(torch.cat(fixed), idx)


@pytest.mark.parametrize("bad,msg", [({"optimizer": "rmsprop"}, "unknown optimizer"), ({"lr": 0}, "lr must be"),
                                     ({"lrmin": 1.0, "lr": 0.1}, "lrmin"), ({"epochs": 0}, "epochs"),
                                     ({"bs": 0}, "batch size"), ({"delta": -1}, "delta"),
                                     ({"checkpoint_epochs": (5,), "epochs": 3}, "checkpoint epochs"),
                                     ({"lr": float("inf")}, "lr must be"), ({"lrmin": float("nan")}, "lrmin"),
                                     ({"delta": float("nan")}, "delta"), ({"delta": float("inf")}, "delta"),
                                     ({"optimizer": "ivon", "hess_init": float("nan")}, "hess_init"),
                                     ({"loss": "hinge"}, "unknown loss 'hinge'")])
def test_train_config_rejects_bad_values(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**bad)


@pytest.mark.parametrize("device,msg", [("cuda:999", "cuda:999"), ("gpu", "not a torch device")])
def test_train_config_rejects_a_device_torch_cannot_use(device, msg):
    # cuda:999 fails on every machine: a CPU-only torch has no CUDA, a GPU machine has fewer GPUs
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(device=device)
    assert TrainConfig(device="cpu").device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot be used")
def test_cuda_on_a_machine_without_it_says_why():
    with pytest.raises(ConfigError, match="CUDA is not available in this torch build|sees no GPU") as info:
        TrainConfig(device="cuda")
    assert "--device cpu" in str(info.value)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "ivon"])
def test_fit_learns_and_records_history(optimizer):
    data = small_data()
    lr = {"sgd": 0.1, "adam": 0.01, "ivon": 1.0}[optimizer]
    cfg = TrainConfig(optimizer=optimizer, lr=lr, epochs=15, bs=16, hess_init=1.0, checkpoint_epochs=(0, 5),
                      checkpoint_iterations=(3,))
    res = fit(small_mlp(0), data, cfg, progress=False)
    h = res.history
    assert h["epoch"] == list(range(1, 16))
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h["train_accuracy"][-1] > 0.8
    assert set(res.checkpoints) == {"epoch_0", "epoch_5", "iteration_3"}
    assert not torch.equal(res.checkpoints["epoch_0"]["out.weight"], res.params["out.weight"])
    if optimizer == "ivon":
        group = res.optimizer.param_groups[0]
        assert group["ess"] == 90 and group["weight_decay"] == pytest.approx(cfg.delta / 90)


def test_fit_objective_is_mean_loss_plus_scaled_l2():
    """One full-batch SGD step without momentum equals θ - lr (∇ mean NLL + δ/N θ)."""
    data = small_data()
    module = small_mlp(1)
    theta0 = {k: v.detach().clone() for k, v in module.named_parameters()}
    cfg = TrainConfig(lr=0.5, epochs=1, bs=90, delta=3.0, momentum=0.0, fixed_batches=True, eval_every=0)
    fit(module, data, cfg, progress=False)
    ref = small_mlp(1)
    loss = nn.functional.cross_entropy(ref(data.x_train), data.y_train)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (k, _p), g in zip(ref.named_parameters(), grads):
        expected = theta0[k] - 0.5 * (g + 3.0 / 90 * theta0[k])
        torch.testing.assert_close(dict(module.named_parameters())[k].detach(), expected, atol=1e-6, rtol=1e-5)


def test_fit_reaches_95_percent_on_digits(digits):
    res = fit(build_model("mlp", digits.input_shape, 10, seed=0), digits, TrainConfig(), progress=False)
    assert res.final["test_accuracy"] >= 0.95


def test_fit_objective_with_the_sigmoid_loss():
    """--loss sigmoid_bce: one full-batch SGD step equals θ - lr (∇ mean_i Σ_c BCE(σ(f_ic), e_ic) + δ/N θ)."""
    data = small_data()
    module = small_mlp(1)
    theta0 = {k: v.detach().clone() for k, v in module.named_parameters()}
    cfg = TrainConfig(lr=0.5, epochs=1, bs=90, delta=3.0, momentum=0.0, fixed_batches=True, loss="sigmoid_bce")
    res = fit(module, data, cfg, progress=False)
    ref = small_mlp(1)
    f, e = ref(data.x_train), nn.functional.one_hot(data.y_train, 3).float()
    per_example = -(e * torch.log(torch.sigmoid(f)) + (1 - e) * torch.log(1 - torch.sigmoid(f))).sum(1)
    grads = torch.autograd.grad(per_example.mean(), list(ref.parameters()))
    for (k, _p), g in zip(ref.named_parameters(), grads):
        expected = theta0[k] - 0.5 * (g + 3.0 / 90 * theta0[k])
        torch.testing.assert_close(dict(module.named_parameters())[k].detach(), expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the history reports the training loss
        f = module(data.x_train)
        loss = -(e * torch.log(torch.sigmoid(f)) + (1 - e) * torch.log(1 - torch.sigmoid(f))).sum(1).mean()
    assert res.history["train_loss"][-1] == pytest.approx(float(loss), rel=1e-5)
    with pytest.raises(ConfigError, match="classification model"):
        fit(nn.Linear(6, 1), Dataset("r", data.x_train, data.x_train[:, 0], data.x_test, data.x_test[:, 0], 0), cfg,
            likelihood="gaussian", progress=False)


@pytest.mark.parametrize("optimizer,tol,loss,sizes,fused", [
    ("sgd", 1e-5, "cross_entropy", "random", True), ("adam", 2e-3, "cross_entropy", "random", True),
    ("sgd", 1e-5, "sigmoid_bce", "random", True),
    ("sgd", 1e-5, "cross_entropy", "equal", True),  # one prior coefficient δ/n: the fused step's weight decay
    ("sgd", 1e-5, "cross_entropy", "random", False), ("sgd", 1e-5, "cross_entropy", "equal", False),  # no fused SGD
])
def test_ensemble_equals_one_by_one_loop(optimizer, tol, loss, sizes, fused, monkeypatch):
    """M models trained at once equal M calls of fit with the same seeds, masks and batch order."""
    from modelsense.training import ensemble

    if not fused:  # the step without PyTorch's fused SGD (torch < 2.4)
        monkeypatch.setattr(ensemble, "_FUSED_SGD", None)
    data = small_data()
    g = torch.Generator().manual_seed(3)
    if sizes == "random":
        masks = torch.rand(4, 90, generator=g) < 0.6
        masks[3] = False
        masks[3, :7] = True  # a model with fewer batches per epoch than the others
    else:  # 54 examples each (4 batches of 16, the last one short)
        masks = torch.zeros(4, 90, dtype=torch.bool)
        for row in masks:
            row[torch.randperm(90, generator=g)[:54]] = True
    cfg = TrainConfig(
        optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01, lrmin=0.001, epochs=4, bs=16, delta=2.0, loss=loss
    )
    seeds = [5, 6, 7, 8]
    res = train_ensemble(small_mlp, data.x_train, data.y_train, masks, cfg, seeds=seeds,
                         queries={"test": (data.x_test, data.y_test)}, progress=False, return_params=True)
    for m, seed in enumerate(seeds):
        ref = fit(small_mlp(seed), data, TrainConfig(**{**cfg.to_dict(), "seed": seed, "eval_every": 0}),
                  train_indices=masks[m].nonzero().flatten(), progress=False)
        with torch.no_grad():
            torch.testing.assert_close(res.outputs["test"]["logits"][m], ref.module(data.x_test), atol=tol, rtol=tol)
        for k, v in ref.params.items():
            torch.testing.assert_close(res.params[k][m], v, atol=tol, rtol=tol)


@pytest.mark.parametrize("activation,loss", [("relu", "cross_entropy"), ("tanh", "cross_entropy"),
                                             ("relu", "sigmoid_bce")])
def test_stacked_mlp_gradient_and_outputs_equal_autograd(activation, loss):
    """The engine's hand-written batched backward of an MLP equals autograd on each model's weighted loss."""
    from torch.func import functional_call

    from modelsense.core.likelihood import likelihood_for
    from modelsense.training.ensemble import _StackedMLP

    modules = [build_model("mlp", (2, 3), 4, widths=(5, 6), activation=activation, seed=s) for s in range(3)]
    names = [n for n, _ in modules[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in modules]) for n in names}
    objective = likelihood_for("categorical", loss)
    stacked = _StackedMLP.of(modules[0], names, {}, objective)
    assert stacked is not None
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 7, 2, 3, generator=g), torch.randint(0, 4, (3, 7), generator=g)
    w = torch.rand(3, 7, generator=g)
    w[1] = 0  # a skipped model: zero gradient
    w[2, :3] = 0
    batches = [(x, y, w), (x.flip(1), y.flip(1), w.flip(1))]  # the second call reuses the first one's workspace
    for xb, yb, wb in batches:
        got = stacked.grads(params, xb, yb, wb)
        for m in range(3):
            p = {k: v[m].clone().requires_grad_(True) for k, v in params.items()}
            f = functional_call(modules[0], p, (xb[m],))
            total = wb[m].sum()
            objective_m = (wb[m] * objective.nll(f, yb[m])).sum() / (total if total > 0 else 1)
            for k, ref in zip(p, torch.autograd.grad(objective_m, list(p.values()))):
                torch.testing.assert_close(got[k][m], ref, atol=1e-6, rtol=1e-5)
    outputs = stacked.forward(params, x[0])
    stacked.FORWARD_FLOATS = 1  # one model at a time
    torch.testing.assert_close(stacked.forward(params, x[0]), outputs, atol=0, rtol=0)
    for m in range(3):
        with torch.no_grad():
            torch.testing.assert_close(outputs[m], functional_call(modules[0], {k: v[m] for k, v in params.items()},
                                                                   (x[0],)))
    for other in (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)),
                  nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)),
                  nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())):
        assert _StackedMLP.of(other, [n for n, _ in other.named_parameters()], {}, objective) is None


def test_ensemble_with_labels_per_model_equals_fit_on_the_relabeled_data():
    """labels (M, N): model m trains on its own labels (a relabeled training set); queries keep theirs."""
    data = small_data()
    labels = torch.stack([data.y_train, (data.y_train + 1) % 3, torch.where(torch.arange(90) < 20, 0, data.y_train)])
    cfg = TrainConfig(lr=0.1, epochs=3, bs=16, delta=2.0)
    masks = torch.ones(3, 90, dtype=torch.bool)
    res = train_ensemble(
        small_mlp,
        data.x_train,
        data.y_train,
        masks,
        cfg,
        seeds=[4, 4, 4],
        labels=labels,
        return_params=True,
        queries={"train": (data.x_train, data.y_train)},
        progress=False,
    )
    for m in range(3):
        relabeled = Dataset("toy", data.x_train, labels[m], data.x_test, data.y_test, 3)
        ref = fit(small_mlp(4), relabeled, TrainConfig(**{**cfg.to_dict(), "seed": 4, "eval_every": 0}), progress=False)
        for k, v in ref.params.items():
            torch.testing.assert_close(res.params[k][m], v, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # the train query is scored against y, not the model's labels
            expected = nn.functional.cross_entropy(ref.module(data.x_train), data.y_train, reduction="none")
        torch.testing.assert_close(res.outputs["train"]["loss"][m], expected, atol=1e-5, rtol=1e-5)
    for bad in (labels[:2], labels.float(), labels[:, :10]):
        with pytest.raises(ConfigError, match="labels must be integer class labels of shape"):
            train_ensemble(small_mlp, data.x_train, data.y_train, masks, cfg, labels=bad, progress=False)


def shared_plan_reference(module, x, y, keep, cfg):
    """One model on the subset `keep` (bool (N,)) with the batches of all N examples, the slow way:
    each batch of epoch_batches(arange(N)) cut to the subset, an empty cut skipped (no step at all),
    torch.optim on mean loss over the cut + δ/(2|S|)·||θ||²."""
    n = int(keep.sum())
    opt = make_optimizer(module, cfg, n)
    params = [p for p in module.parameters() if p.requires_grad]
    gen = batch_generator(cfg.seed)
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg, epoch)
        for batch in epoch_batches(torch.arange(len(x)), cfg.bs, gen, cfg.fixed_batches):
            batch = batch[keep[batch]]
            if len(batch) == 0:
                continue
            opt.zero_grad()
            loss = nn.functional.cross_entropy(module(x[batch]), y[batch]) + l2_penalty(params, cfg.delta, n)
            loss.backward()
            opt.step()
    return module


@pytest.mark.parametrize("optimizer,tol", [("sgd", 1e-5), ("adam", 2e-3)])
def test_shared_batch_plan_equals_subset_training_with_the_full_schedule(optimizer, tol):
    """batch_plan="shared": a weight-0 example stays in the batches but does not count; each model
    equals training on its subset with the batches of all N examples (empty batches skipped)."""
    data = small_data()
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(4, 90, generator=g) < 0.7
    masks[2] = True  # the control: all examples
    masks[3] = False
    masks[3, [5, 40, 41, 80]] = True  # most of its batches hold none of its examples: skipped steps
    cfg = TrainConfig(
        optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01, lrmin=0.001, epochs=3, bs=8, delta=2.0
    )
    seeds = [5, 5, 5, 6]
    res = train_ensemble(
        small_mlp,
        data.x_train,
        data.y_train,
        masks,
        cfg,
        seeds=seeds,
        queries={"test": (data.x_test, data.y_test)},
        progress=False,
        return_params=True,
        batch_plan="shared",
    )
    for m, seed in enumerate(seeds):
        ref = shared_plan_reference(small_mlp(seed), data.x_train, data.y_train, masks[m],
                                    TrainConfig(**{**cfg.to_dict(), "seed": seed}))
        for k, v in ref.named_parameters():
            torch.testing.assert_close(res.params[k][m], v.detach(), atol=tol, rtol=tol)
    # all weights 1: the shared plan is the model's own plan
    own = train_ensemble(small_mlp, data.x_train, data.y_train, masks[2:3], cfg, seeds=[5], return_params=True,
                         queries={}, progress=False)
    for k, v in own.params.items():
        torch.testing.assert_close(res.params[k][2], v[0], atol=1e-6, rtol=1e-6)


def test_ensemble_outputs_chunks_and_warm_start():
    data = small_data()
    masks = torch.ones(5, 90, dtype=torch.bool)
    cfg = TrainConfig(lr=0.05, epochs=2, bs=32)
    full = train_ensemble(small_mlp, data.x_train, data.y_train, masks, cfg, progress=False)
    chunked = train_ensemble(small_mlp, data.x_train, data.y_train, masks, cfg, chunk_models=2, progress=False)
    for k in ("logits", "loss", "correct", "margin"):
        torch.testing.assert_close(full.outputs["train"][k], chunked.outputs["train"][k], atol=1e-5, rtol=1e-5)
    out = full.outputs["train"]
    assert out["logits"].shape == (5, 90, 3) and out["correct"].dtype == torch.bool
    f = out["logits"]
    true = f.gather(-1, data.y_train.expand(5, 90).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(out["correct"], f.argmax(-1) == data.y_train)
    assert torch.all((out["margin"] > 0) == out["correct"]) and torch.all(
        out["margin"] <= true - f.min(-1).values + 1e-6
    )
    # warm start with zero epochs of change: lr tiny -> outputs equal the initial model's
    base = small_mlp(0)
    init = {k: v.detach() for k, v in base.named_parameters()}
    warm = train_ensemble(small_mlp, data.x_train, data.y_train, masks[:2], TrainConfig(lr=1e-12, epochs=1),
                          init_params=init, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(warm.outputs["train"]["logits"][1], base(data.x_train), atol=1e-5, rtol=1e-5)


def test_ensemble_bad_input():
    data = small_data()
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ConfigError, match="masks must have shape"):
        train_ensemble(small_mlp, data.x_train, data.y_train, torch.ones(2, 5, dtype=torch.bool), cfg, progress=False)
    with pytest.raises(ConfigError, match="no training example"):
        train_ensemble(small_mlp, data.x_train, data.y_train, torch.zeros(2, 90, dtype=torch.bool), cfg, progress=False)
    with pytest.raises(ConfigError, match="unknown batch_plan 'common'; expected one of"):
        train_ensemble(small_mlp, data.x_train, data.y_train, torch.ones(2, 90, dtype=torch.bool), cfg, progress=False,
                       batch_plan="common")
    with pytest.raises(ConfigError, match="use fit"):
        train_ensemble(
            small_mlp,
            data.x_train,
            data.y_train,
            torch.ones(2, 90, dtype=torch.bool),
            TrainConfig(optimizer="ivon"),
            progress=False,
        )
    bn = lambda s: nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))  # noqa: E731
    with pytest.raises(ConfigError, match="batch norm"):
        train_ensemble(bn, data.x_train, data.y_train, torch.ones(2, 90, dtype=torch.bool), cfg, progress=False)


def test_engine_trains_models_with_dropout_reproducibly():
    """Dropout inside the vmapped engine: each model draws its own masks (vmap refused random ops
    before), from the chunk's seeds, so the same chunk retrains the same; the queries are evaluated
    without dropout (eval mode), and the caller's global generator is left as it was."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    def make(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    masks = torch.ones(3, 40, dtype=torch.bool)
    masks[1, :10] = False
    cfg = TrainConfig(optimizer="sgd", lr=0.1, epochs=3, bs=8)
    state = torch.get_rng_state()
    runs = [train_ensemble(make, x, y, masks, cfg, queries={"train": (x, y)}, return_params=True) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    for name in runs[0].params:
        assert torch.equal(runs[0].params[name], runs[1].params[name])
    a, b = runs[0].params["0.weight"], runs[0].params["0.weight"][[1, 0, 2]]
    assert not torch.equal(a, b)  # the models differ (their own masks, subsets and seeds)
    # the queries are the eval-mode outputs of the trained parameters (no dropout)
    module = make(0).eval()
    logits = torch.func.functional_call(module, {k: v[2] for k, v in runs[0].params.items()}, (x,))
    expected = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(runs[0].outputs["train"]["loss"][2], expected, atol=1e-6)


def test_ivon_training_repeats_exactly_whatever_the_global_generator_and_leaves_it_as_it_was():
    # IVON draws its weight noise from torch's global generator: fit seeds it from cfg.seed inside a fork,
    # so two runs agree whatever state the caller's generator is in, and that state is not consumed
    data = small_data()
    cfg = TrainConfig(optimizer="ivon", lr=0.5, epochs=2, bs=30, seed=3)
    runs = []
    for caller_seed in (0, 1):
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        runs.append(fit(small_mlp(0), data, cfg, progress=False).params)
        assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = fit(small_mlp(0), data, TrainConfig(optimizer="ivon", lr=0.5, epochs=2, bs=30, seed=4),
                progress=False).params
    assert not all(torch.equal(runs[0][k], other[k]) for k in runs[0])  # the seed draws the noise
