"""Influence estimators against their definitions on tiny problems (float64, dense references)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, hessian

from modelsense.attribution import (
    GaussianProjector,
    make_attributor,
    method_names,
    parse_methods,
)
from modelsense.core.functional import FunctionalModel, ParamSpec
from modelsense.errors import ConfigError, DataError

QUIET = {"progress": False}


def toy_data(n=24, m=6, d=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    y = (x @ w + 0.8 * torch.randn(n + m, c, generator=g, dtype=torch.float64)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def linear_model(d=3, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def tiny_mlp(d=3, c=3, h=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()


def trained(module, x, y, delta=0.1, steps=200):
    """Minimise Σ_i l_i + δ/2 ||θ||² with L-BFGS (the summed objective of the package convention)."""
    opt = torch.optim.LBFGS(module.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y, reduction="sum") + 0.5 * delta * sum(
            p.pow(2).sum() for p in module.parameters()
        )
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return module.eval()


def loop_grads(module, x, y, params=None):
    """Per-example loss gradients, one autograd call per example, flat (n, P)."""
    names = [n for n, _ in module.named_parameters()]
    params = params or dict(module.named_parameters())
    rows = []
    for xi, yi in zip(x, y):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(functional_call(module, p, (xi[None],)), yi[None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p[n] for n in names])]))
    return torch.stack(rows)


def dense_hessian(module, x, y):
    """Hessian of Σ_i l_i w.r.t. the flat parameters, by torch.func.hessian."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    spec = ParamSpec.of(params)

    def total(flat):
        return F.cross_entropy(functional_call(module, spec.unflatten(flat), (x,)), y, reduction="sum")

    return hessian(total)(spec.flatten(params))


@pytest.fixture(scope="module")
def problem():
    x, y, xt, yt = toy_data()
    return trained(linear_model(), x, y), x, y, xt, yt


def test_registry_lists_every_method_and_rejects_unknown_names():
    names = method_names()
    for m in ("grad-dot", "grad-cos", "randproj", "tracin", "tracin-rp", "if-explicit", "if-cg", "if-lissa", "if-kfac",
              "if-ekfac", "arnoldi", "gex", "la-kfac", "trak", "el2n", "loss"):
        assert m in names
    with pytest.raises(ConfigError, match="unknown attribution method 'nope'"):
        make_attributor("nope")
    with pytest.raises(ConfigError, match="does not take settings"):
        make_attributor("grad-dot", num_ens=3)
    assert make_attributor("grad-dot", {"num_ens": 3}, strict=False).name == "grad-dot"
    assert parse_methods("gex, loss") == ["gex", "loss"]
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("gex,gex")


def test_a_setting_no_asked_method_takes_is_refused_naming_the_methods_that_take_it():
    from modelsense.attribution import ComputeOptions

    with pytest.raises(ConfigError, match="'num_ens' is a setting of gex, tracinrp-fge, la-kfac"):
        make_attributor("grad-dot", num_ens=3)
    # one settings dict shared by the methods asked for (the CLI's): passed over where another takes it ...
    assert make_attributor("grad-dot", {"num_ens": 3}, strict=False, shared_with=["grad-dot", "gex"]).name == "grad-dot"
    # ... refused where none of them does, and a misspelt setting is refused even without the list
    with pytest.raises(
        ConfigError,
        match=r"not taken by the methods asked for \(grad-dot, loss\) \('num_ens' is a setting "
        r"of gex, tracinrp-fge, la-kfac\)",
    ):
        make_attributor("grad-dot", {"num_ens": 3}, strict=False, shared_with=["grad-dot", "loss"])
    with pytest.raises(ConfigError, match="'num_ensembles' is a setting of no method"):
        make_attributor("gex", {"num_ensembles": 3}, strict=False)
    # compute options: flat (the CLI's dict) or one ComputeOptions, flat ones override, validated once
    assert make_attributor("grad-dot", {"block_size": 7, "progress": False}).compute == ComputeOptions(
        block_size=7, progress=False
    )
    att = make_attributor("grad-dot", compute=ComputeOptions(block_size=5), memory_budget=100)
    assert (att.compute.block_size, att.compute.memory_budget, att.compute.progress) == (5, 100, True)
    for bad in ({"memory_budget": 0}, {"chunk_size": 2.5}, {"block_size": float("nan")}, {"scratch_dir": 3}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ComputeOptions(**bad)


def test_grad_dot_and_cos_match_explicit_per_example_gradients(problem):
    model, x, y, xt, yt = problem
    G, Gt = loop_grads(model, x, y), loop_grads(model, xt, yt)
    att = make_attributor("grad-dot", **QUIET).fit(model, x, y)
    torch.testing.assert_close(att.scores(xt, yt), G @ Gt.T)
    torch.testing.assert_close(att.self_scores(), G.pow(2).sum(1))
    cos = make_attributor("grad-cos", **QUIET).fit(model, x, y)
    torch.testing.assert_close(
        cos.scores(xt, yt), (G / G.norm(dim=1, keepdim=True)) @ (Gt / Gt.norm(dim=1, keepdim=True)).T
    )
    torch.testing.assert_close(cos.self_scores(), torch.ones(len(x), dtype=torch.float64))


def test_randproj_is_the_gaussian_sketch_of_grad_dot(problem):
    model, x, y, xt, yt = problem
    G, Gt = loop_grads(model, x, y), loop_grads(model, xt, yt)
    att = make_attributor("randproj", proj_dim=7, seed=3, **QUIET).fit(model, x, y)
    P = att.projector_.matrix()
    assert P.shape == (7, G.shape[1])
    torch.testing.assert_close(att.scores(xt, yt), (G @ P.T) @ (Gt @ P.T).T)
    torch.testing.assert_close(att.self_scores(), (G @ P.T).pow(2).sum(1))
    # unbiased: E[GᵀG] = I, so a wide sketch approaches grad-dot
    wide = make_attributor("randproj", proj_dim=20000, **QUIET).fit(model, x, y).scores(xt, yt)
    exact = G @ Gt.T
    assert (wide - exact).norm() / exact.norm() < 0.05


def test_projector_blocks_and_cache_give_the_same_matrix():
    a = GaussianProjector(50, 4, seed=1, block_cols=7)
    b = GaussianProjector(50, 4, seed=1, block_cols=7, cache_bytes=0)
    v = torch.randn(3, 50)
    torch.testing.assert_close(a(v), b(v))
    torch.testing.assert_close(a(v), v @ a.matrix().T)


def test_tracin_is_the_lr_weighted_sum_over_checkpoints(problem):
    model, x, y, xt, yt = problem
    base = {k: v.detach() for k, v in model.named_parameters()}
    ckpts = [{k: v + 0.3 * torch.randn_like(v) for k, v in base.items()}, base]
    lrs = [0.5, 0.1]
    ref = sum(lr * loop_grads(model, x, y, c) @ loop_grads(model, xt, yt, c).T for c, lr in zip(ckpts, lrs))
    att = make_attributor("tracin", checkpoints=ckpts, learning_rates=lrs, **QUIET).fit(model, x, y)
    torch.testing.assert_close(att.scores(xt, yt), ref)
    unweighted = make_attributor("tracin", checkpoints=ckpts, learning_rates=lrs, lr_weighted=False, **QUIET).fit(
        model, x, y
    )
    ref1 = sum(loop_grads(model, x, y, c) @ loop_grads(model, xt, yt, c).T for c in ckpts)
    torch.testing.assert_close(unweighted.scores(xt, yt), ref1)
    rp = make_attributor("tracin-rp", checkpoints=ckpts, learning_rates=lrs, proj_dim=5, **QUIET).fit(model, x, y)
    P = rp.projector_.matrix()
    ref_rp = sum(
        lr * (loop_grads(model, x, y, c) @ P.T) @ (loop_grads(model, xt, yt, c) @ P.T).T for c, lr in zip(ckpts, lrs)
    )
    torch.testing.assert_close(rp.scores(xt, yt), ref_rp)
    with pytest.raises(ConfigError, match="learning rates for"):
        make_attributor("tracin", checkpoints=ckpts, learning_rates=[1.0])


def test_if_explicit_equals_dense_inverse_hessian():
    x, y, xt, yt = toy_data(n=20, m=5)
    model = trained(tiny_mlp(), x, y, delta=1.0)
    H = dense_hessian(model, x, y)
    lam = 1.0 + max(0.0, -float(torch.linalg.eigvalsh(H).min()))
    G, Gt = loop_grads(model, x, y), loop_grads(model, xt, yt)
    Hinv = torch.linalg.inv(H + lam * torch.eye(len(H), dtype=H.dtype))
    att = make_attributor("if-explicit", matrix="hessian", damping=lam, damping_mode="absolute", **QUIET).fit(
        model, x, y
    )
    torch.testing.assert_close(att.scores(xt, yt), G @ Hinv @ Gt.T)
    torch.testing.assert_close(att.self_scores(), ((G @ Hinv) * G).sum(1))


@pytest.mark.parametrize("matrix", ["ggn", "ef"])
def test_if_explicit_through_the_gram_matrix_when_rows_are_fewer_than_parameters(matrix):
    """5 examples x 3 classes = 15 GGN factor rows (5 for the EF) < P = 31: the `gram` structure."""
    from modelsense.curvature.dense import dense_matrix

    x, y, xt, yt = toy_data(n=5, m=4)
    model = trained(tiny_mlp(), x, y, delta=1.0)
    K = dense_matrix(FunctionalModel(model), x, y, matrix=matrix)
    lam = 0.3
    G, Gt = loop_grads(model, x, y), loop_grads(model, xt, yt)
    Kinv = torch.linalg.inv(K + lam * torch.eye(len(K), dtype=K.dtype))
    att = make_attributor("if-explicit", matrix=matrix, damping=lam, damping_mode="absolute", **QUIET).fit(model, x, y)
    assert att.structure_ == "gram" and att.curvature_.structure == "gram"
    torch.testing.assert_close(att.scores(xt, yt), G @ Kinv @ Gt.T)
    torch.testing.assert_close(att.self_scores(), ((G @ Kinv) * G).sum(1))
    rel = make_attributor("if-explicit", matrix=matrix, damping=0.1, **QUIET).fit(model, x, y)
    assert math.isclose(rel.damping_, 0.1 * float(torch.trace(K)) / len(K), rel_tol=1e-9)
    with pytest.raises(ConfigError, match="m = 15 factor rows|m = 5 factor rows"):
        make_attributor("if-explicit", matrix=matrix, max_params=4, **QUIET).fit(model, x, y)


def test_if_cg_equals_if_explicit_at_convergence(problem):
    model, x, y, xt, yt = problem
    common = dict(matrix="ggn", damping=0.05, damping_mode="relative", **QUIET)
    exact = make_attributor("if-explicit", **common).fit(model, x, y)
    cg = make_attributor("if-cg", cg_tol=1e-13, cg_max_iter=500, **common).fit(model, x, y)
    assert cg.damping_ == pytest.approx(exact.damping_, rel=1e-12)
    torch.testing.assert_close(cg.scores(xt, yt), exact.scores(xt, yt), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cg.self_scores(), exact.self_scores(), rtol=1e-9, atol=1e-10)


def test_lissa_full_batch_converges_to_if_explicit(problem):
    model, x, y, xt, yt = problem
    common = dict(matrix="ggn", damping=1.0, damping_mode="absolute", **QUIET)
    exact = make_attributor("if-explicit", **common).fit(model, x, y).scores(xt, yt)
    lissa = make_attributor("if-lissa", lissa_depth=400, lissa_batch=len(x), **common).fit(model, x, y)
    torch.testing.assert_close(lissa.scores(xt, yt), exact, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_kfac_influence_equals_if_explicit_where_kfac_is_exact(method):
    """A linear layer under the gaussian likelihood: GGN = Σ_i x_i x_iᵀ ⊗ I is a Kronecker product."""
    x, _, xt, _ = toy_data(n=30, m=5)
    w = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, yt = x @ w + 0.1 * torch.randn(30, 2, dtype=torch.float64), xt @ w
    model = FunctionalModel(nn.Linear(3, 2).double(), likelihood="gaussian")
    common = dict(matrix="ggn", damping=0.1, damping_mode="relative", **QUIET)
    exact = make_attributor("if-explicit", **common).fit(model, x, y)
    approx = make_attributor(method, **common).fit(model, x, y)
    torch.testing.assert_close(approx.scores(xt, yt), exact.scores(xt, yt))
    torch.testing.assert_close(approx.self_scores(), exact.self_scores())
    rho = spearmanr(exact.scores(xt, yt).flatten().numpy(), approx.scores(xt, yt).flatten().numpy())[0]
    assert rho >= 0.95


def test_kfac_is_exact_for_one_training_example():
    x, y, xt, yt = toy_data(n=1, m=4)
    model = linear_model()
    for method in ("if-kfac", "if-ekfac"):
        common = dict(matrix="ggn", damping=0.3, damping_mode="absolute", **QUIET)
        exact = make_attributor("if-explicit", **common).fit(model, x, y).scores(xt, yt)
        torch.testing.assert_close(make_attributor(method, **common).fit(model, x, y).scores(xt, yt), exact)


def test_arnoldi_at_full_rank_equals_if_explicit_and_guards_negative_eigenvalues(problem):
    model, x, y, xt, yt = problem
    P = sum(p.numel() for p in model.parameters())
    exact = make_attributor("if-explicit", matrix="ggn", damping=0.5, damping_mode="absolute", **QUIET).fit(model, x, y)
    arn = make_attributor("arnoldi", matrix="ggn", rank=P, damping=0.5, lanczos_tol=1e-10, **QUIET).fit(model, x, y)
    torch.testing.assert_close(arn.scores(xt, yt), exact.scores(xt, yt), rtol=1e-6, atol=1e-8)
    # Hessian of an MLP away from a minimum: indefinite; the guard drops the non-positive eigenvalues
    mlp = tiny_mlp(seed=1).eval()
    H = dense_hessian(mlp, x, y)
    assert float(torch.linalg.eigvalsh(H).min()) < 0
    n_params = H.shape[0]
    hess = make_attributor("arnoldi", matrix="hessian", rank=n_params, lanczos_tol=1e-8, **QUIET).fit(mlp, x, y)
    assert hess.dropped_ >= 1 and bool((hess.eigenvalues_ > 0).all())
    assert bool(torch.isfinite(hess.scores(xt, yt)).all()) and bool(torch.isfinite(hess.self_scores()).all())


def test_gex_is_the_hand_computed_ensemble_covariance(problem):
    model, x, y, xt, yt = problem
    tau = 0.3
    att = make_attributor("gex", num_ens=3, ft_step=5, ft_lr=0.05, ft_bs=8, gex_eps=tau, **QUIET).fit(model, x, y)
    assert len(att.members_) == 3
    assert all((att.members_[0][k] - att.members_[1][k]).abs().max() > 0 for k in att.members_[0])

    def losses(params, xx, yy):
        return torch.stack(
            [F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None]) for xi, yi in zip(xx, yy)]
        )

    star = {k: v.detach() for k, v in model.named_parameters()}
    dev_tr = torch.stack([losses(m, x, y) - losses(star, x, y).clamp_min(tau) for m in att.members_], 1)
    dev_te = torch.stack([losses(m, xt, yt) - losses(star, xt, yt).clamp_min(tau) for m in att.members_], 1)
    torch.testing.assert_close(att.scores(xt, yt), dev_tr @ dev_te.T / 3)
    torch.testing.assert_close(att.self_scores(), dev_tr.pow(2).mean(1))


def test_gex_members_are_chained_fine_tuning_runs(problem):
    from modelsense.attribution import fine_tune_chain

    model, x, y, _, _ = problem
    fm = FunctionalModel(model)
    one = fine_tune_chain(fm, fm.params, x, y, num_ens=1, ft_step=6, ft_lr=0.1, ft_bs=8)
    two = fine_tune_chain(fm, fm.params, x, y, num_ens=2, ft_step=6, ft_lr=0.1, ft_bs=8)
    for k in one[0]:
        torch.testing.assert_close(one[0][k], two[0][k])  # the first member is the same run
    # a chained member starts at its predecessor: restarting SGD from θ* instead gives another point
    restart = fine_tune_chain(fm, two[0], x, y, num_ens=1, ft_step=6, ft_lr=0.1, ft_bs=8)
    assert all(torch.isfinite(v).all() for v in restart[0].values())


def test_la_kfac_with_small_samples_is_a_monte_carlo_influence_function(problem):
    model, x, y, xt, yt = problem
    s, delta = 1e-3, 2.0
    att = make_attributor("la-kfac", structure="full", num_ens=4000, sample_scale=s, prior_precision=delta,
                          **QUIET).fit(model, x, y)
    ref = make_attributor("if-explicit", matrix="ggn", damping=delta, damping_mode="absolute", **QUIET).fit(model, x, y)
    est, exact = att.scores(xt, yt), ref.scores(xt, yt)
    assert (est - exact).norm() / exact.norm() < 0.1


def test_trak_matches_its_formula(problem):
    from modelsense.training import TrainConfig

    model, x, y, xt, yt = problem
    cfg = TrainConfig(epochs=3, lr=0.1, bs=8)
    att = make_attributor("trak", n_models=2, proj_dim=5, damping=0.01, train_config=cfg,
                          model_fn=lambda s: linear_model(seed=s).float(), **QUIET).fit(model, x, y)
    ref = 0
    for params, proj in zip(att.members_, att.projectors_):
        def margin_grad(xx, yy, params=params):
            rows, probs = [], []
            for xi, yi in zip(xx, yy):
                p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
                f = functional_call(model, p, (xi[None],))[0]
                m = f[yi] - torch.logsumexp(torch.cat([f[:yi], f[yi + 1:]]), 0)
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(m, [p["weight"], p["bias"]])]))
                probs.append(torch.softmax(f.detach(), 0)[yi])
            return torch.stack(rows), torch.stack(probs)

        G, p = margin_grad(x, y)
        Gt, pt = margin_grad(xt, yt)
        Pm = proj.matrix()
        phi, phit = G @ Pm.T, Gt @ Pm.T
        K = phi.T @ phi
        K = K + 0.01 * torch.trace(K) / 5 * torch.eye(5, dtype=K.dtype)
        psi, psit = -(1 - p)[:, None] * phi, -(1 - pt)[:, None] * phit
        ref = ref + psi @ torch.linalg.solve(K, psit.T) / 2
    torch.testing.assert_close(att.scores(xt, yt), ref)


def test_sparse_sketch_is_a_block_count_sketch():
    from modelsense.attribution.trak import SparseSketch

    slices = {"a": slice(0, 7), "b": slice(7, 10)}
    sketch = SparseSketch(slices, dim=12, seed=3, nnz=3, dtype=torch.float64)
    S = sketch.matrix()
    assert S.shape == (12, 10)
    for block in S.split(4):  # one entry ±1/√3 per column in each of the 3 blocks of 4 rows
        assert torch.equal((block != 0).sum(0), torch.ones(10, dtype=torch.long))
        torch.testing.assert_close(block.abs().sum(0), torch.full((10,), 3**-0.5, dtype=torch.float64))
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(sketch(x), x @ S.T)
    torch.testing.assert_close(sketch.project_columns({k: x[:, c].T for k, c in slices.items()}).T, x @ S.T)
    assert torch.equal(SparseSketch(slices, 12, 3, 3, torch.float64).matrix(), S)  # drawn again from the seed
    assert not torch.equal(SparseSketch(slices, 12, 4, 3, torch.float64).matrix(), S)
    with pytest.raises(ConfigError, match="nnz"):
        SparseSketch(slices, dim=2, nnz=3)


def test_trak_factored_projections_match_per_example_gradients(problem):
    from modelsense.training import TrainConfig

    model, x, y, xt, yt = problem
    mlp = tiny_mlp(seed=1)
    att = make_attributor("trak", n_models=2, proj_dim=6, train_config=TrainConfig(epochs=2, lr=0.1, bs=8),
                          model_fn=lambda s: tiny_mlp(seed=s).float(), **QUIET).fit(mlp, x, y)
    assert att.layers_ is not None  # an MLP of nn.Linear layers: the factored path
    factored = [att._projections(m, xt, yt) for m in range(2)]
    att.layers_ = None  # per-example gradients (vmap) instead
    for m, (phi, p) in enumerate(factored):
        phi2, p2 = att._projections(m, xt, yt)
        torch.testing.assert_close(phi, phi2)
        torch.testing.assert_close(p, p2)


def test_trak_projects_the_training_examples_once(problem, monkeypatch):
    from modelsense.attribution.trak import Trak
    from modelsense.training import TrainConfig

    model, x, y, xt, yt = problem
    att = make_attributor("trak", n_models=2, proj_dim=5, train_config=TrainConfig(epochs=2, lr=0.1, bs=8),
                          model_fn=lambda s: linear_model(seed=s).float(), **QUIET).fit(model, x, y)
    expected = att.scores(xt, yt)
    rows = []
    original = Trak._projections
    monkeypatch.setattr(Trak, "_projections", lambda self, m, xx, yy: rows.append(len(yy)) or original(self, m, xx, yy))
    torch.testing.assert_close(att.scores(xt, yt), expected)
    assert sum(rows) == 2 * len(yt)  # the test examples of each model, the training projections kept from fit


def test_trak_streams_only_when_no_member_is_trained():
    """A Dataset is read in batches only when the ensemble is the fitted model alone: any trained member
    needs the engine's tensors (n_models=1 without the fitted model trains one)."""
    assert make_attributor("trak", n_models=1, **QUIET).streams()
    assert not make_attributor("trak", n_models=1, include_fitted=False, **QUIET).streams()
    assert not make_attributor("trak", **QUIET).streams()
    assert make_attributor("trak", **QUIET).include_fitted  # M − 1 trained, as the if-* ensembles


def test_loss_and_el2n_self_scores(problem):
    from modelsense.training import TrainConfig

    model, x, y, xt, yt = problem
    loss = make_attributor("loss", **QUIET).fit(model, x, y)
    torch.testing.assert_close(loss.self_scores(), F.cross_entropy(model(x), y, reduction="none").detach())
    with pytest.raises(ConfigError, match="self-influence only"):
        loss.scores(xt, yt)
    el2n = make_attributor("el2n", el2n_repeat=2, train_config=TrainConfig(epochs=3, lr=0.1, bs=8),
                           model_fn=lambda s: linear_model(seed=s).float(), **QUIET).fit(model, x, y)
    s = el2n.self_scores()
    assert s.shape == (len(x),) and bool(((s >= 0) & (s <= 2 + 1e-6)).all())  # Σ_c (p_c − e_c)² <= 2


def test_memmap_path_with_a_budget_smaller_than_the_matrix(problem, tmp_path):
    model, x, y, xt, yt = problem
    ref = make_attributor("grad-dot", **QUIET).fit(model, x, y).scores(xt, yt)
    small = make_attributor("grad-dot", memory_budget=200, block_size=5, scratch_dir=tmp_path, factored=False,
                            **QUIET).fit(model, x, y)
    got = small.scores(xt, yt)
    assert ref.numel() * 8 > 200 and small.scores_path_.parent == tmp_path
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.from_numpy(np.load(small.scores_path_)), ref)
    out = tmp_path / "scores.npy"
    make_attributor("grad-dot", block_size=4, **QUIET).fit(model, x, y).scores(xt, yt, out=out)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), ref)


def test_signs_agree_with_actual_leave_one_out_retraining():
    """Removing a helpful example (positive score) raises the test loss: compare with exact LOO."""
    x, y, xt, yt = toy_data(n=16, m=4, seed=2)
    delta = 0.5
    model = trained(linear_model(), x, y, delta=delta)
    base = F.cross_entropy(model(xt), yt, reduction="none").detach()
    actual = torch.zeros(len(x), len(xt), dtype=torch.float64)
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        m = linear_model()
        m.load_state_dict(model.state_dict())
        trained(m, x[keep], y[keep], delta=delta)
        actual[i] = F.cross_entropy(m(xt), yt, reduction="none").detach() - base
    inf = make_attributor("if-explicit", matrix="hessian", damping=delta, damping_mode="absolute", **QUIET).fit(
        model, x, y
    )
    est = inf.scores(xt, yt)
    assert np.corrcoef(est.flatten(), actual.flatten())[0, 1] > 0.98
    big = actual.abs() > 0.2 * actual.abs().max()
    assert bool((torch.sign(est[big]) == torch.sign(actual[big])).all())
    for method in ("grad-dot", "randproj", "if-kfac", "if-cg"):
        s = make_attributor(method, **QUIET).fit(model, x, y).scores(xt, yt)
        assert np.corrcoef(s.flatten(), actual.flatten())[0, 1] > 0.5, method
    # ensembles: same sign convention (a noisy estimate from 64 fine-tuning members / 200 Laplace samples)
    g = make_attributor("gex", num_ens=64, ft_step=20, ft_lr=0.05, ft_bs=4, delta=delta, **QUIET).fit(model, x, y)
    gs = g.scores(xt, yt)
    assert np.corrcoef(gs.flatten(), actual.flatten())[0, 1] > 0.3
    assert float((torch.sign(gs[big]) == torch.sign(actual[big])).double().mean()) >= 0.75
    la = make_attributor(
        "la-kfac", structure="full", num_ens=200, sample_scale=1.0, prior_precision=delta, **QUIET
    ).fit(model, x, y)
    assert np.corrcoef(la.scores(xt, yt).flatten(), actual.flatten())[0, 1] > 0.8


def test_block_sizes_do_not_change_scores(problem):
    model, x, y, xt, yt = problem
    a = make_attributor("if-ekfac", block_size=3, chunk_size=2, **QUIET).fit(model, x, y)
    b = make_attributor("if-ekfac", **QUIET).fit(model, x, y)
    torch.testing.assert_close(a.scores(xt, yt), b.scores(xt, yt))
    torch.testing.assert_close(a.self_scores(), b.self_scores())


def test_sigmoid_bce_option_changes_the_loss(problem):
    model, x, y, xt, yt = problem
    att = make_attributor("loss", loss="sigmoid_bce", **QUIET).fit(model, x, y)
    ref = F.binary_cross_entropy_with_logits(model(x), F.one_hot(y, 3).double(), reduction="none").sum(1).detach()
    torch.testing.assert_close(att.self_scores(), ref)
    with pytest.raises(ConfigError, match="loss='cross_entropy' only"):
        make_attributor("if-cg", loss="sigmoid_bce")


def test_bad_input_gives_clear_errors(problem):
    model, x, y, xt, yt = problem
    att = make_attributor("grad-dot", **QUIET)
    with pytest.raises(ConfigError, match="not fitted"):
        att.self_scores()
    att.fit(model, x, y)
    with pytest.raises(DataError, match="shape"):
        att.scores(torch.randn(4, 5, dtype=torch.float64), yt[:4])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\)"):
        att.scores(xt, yt + 5)
    with pytest.raises(DataError, match="same number"):
        att.scores(xt, yt[:2])
    with pytest.raises(DataError, match="integers"):
        att.scores(xt, yt.double())
    with pytest.raises(DataError, match="torch tensors"):
        att.scores(xt.numpy(), yt)
    with pytest.raises(ConfigError, match="max_params"):
        make_attributor("if-explicit", max_params=5, **QUIET).fit(model, x, y)
    with pytest.raises(ConfigError, match="proj_dim"):
        make_attributor("randproj", proj_dim=0)
    with pytest.raises(ConfigError, match="ft_lr_sched"):
        make_attributor("gex", ft_lr_sched="linear")


def test_self_influence_tasks_refuse_grad_cos(tmp_path):
    from modelsense.data import DataConfig
    from modelsense.experiments.command import execute
    from modelsense.experiments.influence import NOISY_LABELS, PRUNE, NoisyLabelsSpec, PruneSpec
    from modelsense.models import ModelConfig
    from modelsense.training import TrainConfig

    args = dict(data=DataConfig("digits", n_train=50, corruption_ratio=0.1), model=ModelConfig("mlp", widths=(8,)),
                train=TrainConfig(epochs=1), methods=("loss", "grad-cos"))
    for command, spec in ((NOISY_LABELS, NoisyLabelsSpec), (PRUNE, PruneSpec)):
        with pytest.raises(ConfigError, match="same self-influence"):
            execute(command, spec(**args), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_mpe_self_scores_are_the_mpe_sensitivities(problem):
    from modelsense.mpe import MPESettings, build_posterior, mpe_scores

    model, x, y, _, _ = problem
    att = make_attributor("mpe", structure="full", prior_precision=2.0, variant="full", **QUIET).fit(model, x, y)
    post = build_posterior("laplace", FunctionalModel(model), x, y, prior_precision=2.0, structure="full")
    ref = mpe_scores(post, x, y, MPESettings(variant="full")).sensitivity
    torch.testing.assert_close(att.self_scores(), ref)
    with pytest.raises(ConfigError, match="variant"):
        make_attributor("mpe", variant="nope")


def test_lds_and_detection_metrics_on_constructed_examples():
    from modelsense.attribution.evaluation import auc_ap, detection_curve, linear_datamodeling_score

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 4))
    masks = rng.random((20, 30)) < 0.5
    losses = 3.0 - masks @ scores  # removing i raises the loss by scores[i]: the convention, exactly
    lds, per_test = linear_datamodeling_score(scores, masks, losses)
    assert lds == pytest.approx(1.0) and per_test.shape == (4,)
    assert linear_datamodeling_score(-scores, masks, losses)[0] == pytest.approx(-1.0)
    s = np.arange(10.0)
    assert auc_ap(s, np.array([8, 9])) == (pytest.approx(1.0), pytest.approx(1.0))
    frac, found = detection_curve(s, np.array([8, 9]))
    assert found[1] == 1.0 and frac[-1] == 1.0


def test_most_influential_by_hand():
    from modelsense.attribution.evaluation import most_influential

    helpful, harmful = most_influential(np.array([[1.0, -1], [3, 0], [2, 5]]), 2)
    assert helpful.tolist() == [[1, 2], [2, 1]] and harmful.tolist() == [[0, 2], [0, 1]]


def test_method_settings_names_flags_and_checks():
    from modelsense.attribution.settings import MethodSettings, check_pairwise

    settings = MethodSettings(arnoldi_rank=4, bs_jacs=8, memory_gb=0.5, loss="sigmoid_bce")
    assert settings.as_dict() == {"rank": 4, "chunk_size": 8, "memory_budget": 2**29, "loss": "sigmoid_bce"}
    flags = MethodSettings.flags()
    assert flags["rank"] == "--arnoldi-rank" and flags["loss"] == "--score-loss" and flags["proj_dim"] == "--proj-dim"
    assert MethodSettings().for_methods(["grad-dot"], "sigmoid_bce")["loss"] == "sigmoid_bce"  # the training loss
    with pytest.raises(ConfigError, match="--proj-dim") as err:
        MethodSettings(proj_dim=8).for_methods(["grad-dot"])  # a setting no asked-for method takes
    assert "'proj_dim'" not in str(err.value)
    with pytest.raises(ConfigError, match="--memory-gb must be > 0, received 0"):
        MethodSettings(memory_gb=0)
    with pytest.raises(ConfigError, match="loss, el2n give a self-influence only: drop them or use x"):
        check_pairwise(["grad-dot", "loss", "el2n"], "y", "drop {it} or use x")
    check_pairwise(["grad-dot", "if-ekfac"], "y", "z")


def test_noisy_labels_lds_and_influence_runs_write_their_directories(tmp_path):
    import json

    from modelsense.data import DataConfig
    from modelsense.experiments.command import execute
    from modelsense.experiments.influence import (
        INFLUENCE,
        LDS,
        NOISY_LABELS,
        PRUNE,
        InfluenceSpec,
        LdsSpec,
        MethodSettings,
        NoisyLabelsSpec,
        PruneSpec,
    )
    from modelsense.models import ModelConfig
    from modelsense.training import TrainConfig

    data = DataConfig("digits", n_train=120, corruption_ratio=0.1)
    model = ModelConfig("mlp", widths=(8,))
    train = TrainConfig(lr=0.1, epochs=4, bs=32)
    m = execute(NOISY_LABELS, NoisyLabelsSpec(data, model, train, methods=("loss", "grad-dot", "tracin", "gex"),
                                              settings=MethodSettings(ft_step=3, num_ens=2)),
                tmp_path / "nl", progress=False)
    assert set(m["auc"]) == {"loss", "grad-dot", "tracin", "gex"} and all(0 <= v <= 1 for v in m["ap"].values())
    assert (tmp_path / "nl" / "figures" / "self_influence_histograms.png").exists()
    assert json.loads((tmp_path / "nl" / "metrics.json").read_text())["n_corrupted"] == m["n_corrupted"]
    lds = execute(LDS, LdsSpec(DataConfig("digits", n_train=100), model, train, methods=("grad-dot", "if-ekfac"),
                               n_models=4, n_test=10), tmp_path / "lds", progress=False)
    assert set(lds["lds"]) == {"grad-dot", "if-ekfac"} and list((tmp_path / "lds" / "store").glob("*/chunks/*.npz"))
    inf = execute(INFLUENCE, InfluenceSpec(DataConfig("digits", n_train=100), model, train, method="grad-dot", n_test=7,
                                           top_k=2, n_show=2), tmp_path / "inf", progress=False)
    assert np.load(tmp_path / "inf" / "scores.npy").shape == (100, 7) and len(inf["top_helpful"]) == 2
    assert (tmp_path / "inf" / "figures" / "top_influential.png").exists()
    pr = execute(
        PRUNE,
        PruneSpec(
            DataConfig("digits", n_train=100), model, train, methods=("loss", "grad-dot"), ks=(10, 50), n_random=2
        ),
        tmp_path / "prune",
        progress=False,
    )
    assert len(pr["accuracy"]["loss"]) == 2 and len(pr["random_accuracy"]) == 2
    masks = np.load(tmp_path / "prune" / "prune_masks.npz")["masks"]
    assert masks.shape == (2 * 2 + 2 * 2, 100) and set(masks.sum(1)) == {90, 50}
    loss_si = np.load(tmp_path / "prune" / "self_influence.npz")["loss"]
    assert set(np.flatnonzero(~masks[0])) == set(np.argsort(loss_si, kind="stable")[:10])  # lowest removed first
    si = execute(INFLUENCE, InfluenceSpec(DataConfig("digits", n_train=100, corruption_ratio=0.2), model, train,
                                          method="loss", self_only=True), tmp_path / "self", progress=False)
    assert np.load(tmp_path / "self" / "self_influence.npy").shape == (100,) and 0 <= si["auc"] <= 1
    with pytest.raises(ConfigError, match="corruption-ratio"):
        execute(NOISY_LABELS, NoisyLabelsSpec(DataConfig("digits", n_train=100), model, train, methods=("loss",)),
                tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="self-influence only"):
        execute(LDS, LdsSpec(DataConfig("digits", n_train=100), model, train, methods=("loss",), n_models=4),
                tmp_path / "y", progress=False)


def test_influence_ensemble_averages_the_members_influence(problem):
    from modelsense.training import TrainConfig

    model, x, y, xt, yt = problem
    cfg = TrainConfig(epochs=3, lr=0.1, bs=8)
    common = dict(matrix="ggn", damping=0.5, damping_mode="absolute", **QUIET)
    ens = make_attributor("if-explicit", n_models=3, train_config=cfg, model_fn=lambda s: linear_model(seed=s).float(),
                          **common).fit(model, x, y)
    assert len(ens.members_) == 3
    ref = 0
    for params in ens.members_:
        member = linear_model()
        member.load_state_dict(params)
        ref = ref + make_attributor("if-explicit", **common).fit(member, x, y).scores(xt, yt) / 3
    torch.testing.assert_close(ens.scores(xt, yt), ref)
    torch.testing.assert_close(ens.self_scores().sum(), sum(
        make_attributor("if-explicit", **common).fit(_load(p), x, y).self_scores().sum() / 3 for p in ens.members_))


def _load(params):
    m = linear_model()
    m.load_state_dict(params)
    return m


def test_component_schedule_equals_the_cached_one(problem, tmp_path):
    """Budgets too small to cache the train features of all checkpoints: components outer
    (one component's test features fit), or train features recomputed per test block."""
    model, x, y, xt, yt = problem
    base = {k: v.detach() for k, v in model.named_parameters()}
    ckpts = [{k: v + 0.1 * (i + 1) for k, v in base.items()} for i in range(3)]
    kw = dict(checkpoints=ckpts, learning_rates=[0.3, 0.2, 0.1], factored=False, **QUIET)
    ref = make_attributor("tracin", **kw).fit(model, x, y).scores(xt, yt)
    row = 12 * 8  # P = 12 float64 per component
    small = make_attributor("tracin", memory_budget=4 * row * len(xt), block_size=7, **kw).fit(model, x, y)
    torch.testing.assert_close(small.scores(xt, yt), ref)
    tiny = make_attributor("tracin", memory_budget=64, block_size=5, scratch_dir=tmp_path, **kw).fit(model, x, y)
    torch.testing.assert_close(tiny.scores(xt, yt), ref)


@pytest.mark.parametrize("method", ["grad-dot", "grad-cos", "tracin"])
def test_factored_linear_gradients_equal_the_per_example_path(method):
    """MLP: g_iᵀ g_j from layer inputs and output gradients equals the vmapped per-example gradients."""
    x, y, xt, yt = toy_data(n=20, m=5)
    net = tiny_mlp(seed=3).eval()
    base = {k: v.detach() for k, v in net.named_parameters()}
    kw = (
        {"checkpoints": [base, {k: v * 0.9 for k, v in base.items()}], "learning_rates": [0.2, 0.1]}
        if method == "tracin"
        else {}
    )
    fast = make_attributor(method, **kw, **QUIET).fit(net, x, y)
    slow = make_attributor(method, factored=False, **kw, **QUIET).fit(net, x, y)
    assert fast.layers_ is not None and slow.layers_ is None
    torch.testing.assert_close(fast.scores(xt, yt), slow.scores(xt, yt))
    torch.testing.assert_close(fast.self_scores(), slow.self_scores())
    # a trained parameter outside nn.Linear: the generic path
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(3, 3).double(), nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, z):
            return self.lin(z) * self.scale

    assert make_attributor(method, **QUIET).fit(Scaled(), x, y).layers_ is None


def test_kfac_self_influence_ranks_like_if_explicit_on_softmax_regression():
    """Softmax regression on digits: K-FAC is not exact (GGN = Σ_n H_n ⊗ x_n x_nᵀ with H_n tied to x_n;
    33% Frobenius error on the full set), yet the self-influence ranking agrees (Spearman 0.998 on all
    1297 examples). Pairwise scores agree less (per-test Spearman 0.49-0.60 there; see the README)."""
    from sklearn.datasets import load_digits

    from modelsense.curvature.operators import build_curvature

    X, Y = load_digits(return_X_y=True)
    x, y = torch.tensor(X[:300] / 16.0), torch.tensor(Y[:300])
    model = trained(nn.Linear(64, 10).double(), x, y, delta=1.0, steps=100)
    common = dict(matrix="ggn", damping=0.1, damping_mode="relative", **QUIET)
    exact = make_attributor("if-explicit", **common).fit(model, x, y).self_scores().numpy()
    fm = FunctionalModel(model)
    dense = build_curvature(fm, x, y, matrix="ggn", structure="full").K
    errors = {}
    for method in ("if-kfac", "if-ekfac"):
        approx = make_attributor(method, **common).fit(model, x, y).self_scores().numpy()
        assert spearmanr(exact, approx)[0] >= 0.95, method
        K = build_curvature(fm, x, y, matrix="ggn", structure=method[3:])
        errors[method] = float((K.mv(torch.eye(K.n_params, dtype=torch.float64)) - dense).norm() / dense.norm())
    assert 0.0 < errors["if-ekfac"] <= errors["if-kfac"]  # EK-FAC is the best diagonal in the KFAC eigenbasis


def test_detection_and_lds_standard_errors():
    from modelsense.attribution.evaluation import auc_ap_with_errors, lds_standard_error

    corrupted = np.arange(20)
    perfect = np.r_[np.ones(20), np.zeros(180)]
    (auc, auc_se), (ap, ap_se) = auc_ap_with_errors(perfect, corrupted, n_bootstrap=50)
    assert auc == 1.0 and ap == 1.0 and auc_se == 0.0 and ap_se == 0.0
    rng = np.random.default_rng(0)
    (auc, auc_se), _ = auc_ap_with_errors(rng.normal(size=200), corrupted, n_bootstrap=300, seed=1)
    # Hanley & McNeil's standard error of an AUC near 0.5 with 20 positives and 180 negatives: about 0.068
    assert 0.03 < auc_se < 0.12
    per_test = np.array([0.1, 0.3, np.nan, 0.5])
    assert lds_standard_error(per_test) == pytest.approx(np.std([0.1, 0.3, 0.5], ddof=1) / np.sqrt(3))
    assert np.isnan(lds_standard_error(np.array([0.2, np.nan])))
