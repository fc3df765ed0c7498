"""Per-module scores (`by_module=True`) against the definition computed by hand on a two-layer net:
block m of score(i, j) = Σ_c η_c g_i(θ_c)[m]ᵀ M_c[m, m] g_j(θ_c)[m], with per-example gradients from a
loop of autograd calls and, for the K-FAC / EK-FAC influence functions, the dense curvature block of
module m (whose off-diagonal blocks between modules are checked to be zero)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsense.attribution import ComputeOptions, by_module_names, make_attributor
from modelsense.core.functional import ParamSpec
from modelsense.errors import ConfigError

QUIET = ComputeOptions(progress=False, block_size=7)  # several blocks of rows and columns


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    return net, x[:15], y[:15], x[15:], y[15:]


NET, X, Y, XT, YT = _problem()
MODULES = {"0": ("0.weight", "0.bias"), "2": ("2.weight", "2.bias")}


def grads_by_loop(params, x, y):
    """{module: (n, P_m)} per-example gradients of the cross-entropy, one autograd call per example."""
    out = {m: [] for m in MODULES}
    for xi, yi in zip(x, y):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(NET, p, (xi[None],)), yi[None], reduction="sum")
        gs = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        for m, names in MODULES.items():
            out[m].append(torch.cat([gs[n].reshape(-1) for n in names]))
    return {m: torch.stack(v) for m, v in out.items()}


PARAMS = {k: v.detach() for k, v in NET.named_parameters()}


def test_param_spec_modules_are_the_flat_positions_of_each_module():
    spec = ParamSpec.of(PARAMS)
    mods = spec.modules
    assert list(mods) == ["0", "2"]
    assert mods["0"].tolist() == list(range(0, 30)) and mods["2"].tolist() == list(range(30, 51))
    assert list(ParamSpec.of({"scale": torch.ones(2), "a.w": torch.ones(3)}).modules) == ["(root)", "a"]


@pytest.mark.parametrize("factored", [True, False], ids=["factored", "per-example-grads"])
def test_grad_dot_and_grad_cos_blocks_are_the_module_gradient_products(factored):
    G, Gt = grads_by_loop(PARAMS, X, Y), grads_by_loop(PARAMS, XT, YT)
    norm = torch.cat(list(G.values()), 1).norm(dim=1)
    norm_t = torch.cat(list(Gt.values()), 1).norm(dim=1)
    for method in ("grad-dot", "grad-cos"):
        att = make_attributor(method, factored=factored, compute=QUIET).fit(NET, X, Y)
        assert (att.layers_ is not None) == factored
        parts, selfs = att.scores(XT, YT, by_module=True), att.self_scores(by_module=True)
        for m in MODULES:
            want = G[m] @ Gt[m].T
            want_self = G[m].pow(2).sum(1)
            if method == "grad-cos":
                want, want_self = want / torch.outer(norm, norm_t), want_self / norm**2
            torch.testing.assert_close(parts[m], want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(selfs[m], want_self, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factored", [True, False], ids=["factored", "per-example-grads"])
def test_tracin_blocks_sum_over_checkpoints(factored):
    gen = torch.Generator().manual_seed(3)
    ckpts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in PARAMS.items()}, PARAMS]
    lrs = [0.5, 0.2]
    att = make_attributor("tracin", checkpoints=ckpts, learning_rates=lrs, factored=factored,
                          compute=QUIET).fit(NET, X, Y)
    parts = att.scores(XT, YT, by_module=True)
    for m in MODULES:
        want = sum(lr * grads_by_loop(c, X, Y)[m] @ grads_by_loop(c, XT, YT)[m].T for c, lr in zip(ckpts, lrs))
        torch.testing.assert_close(parts[m], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_kronecker_influence_blocks_use_the_module_block_of_the_curvature(method):
    att = make_attributor(method, damping=0.05, compute=QUIET).fit(NET, X, Y)
    K = att.curvature_.to_dense()
    lam = att.damping_
    idx = {m: torch.as_tensor(i) for m, i in ParamSpec.of(PARAMS).modules.items()}
    assert float(K[idx["0"]][:, idx["2"]].abs().max()) == 0.0  # block-diagonal over modules
    G, Gt = grads_by_loop(PARAMS, X, Y), grads_by_loop(PARAMS, XT, YT)
    parts, selfs = att.scores(XT, YT, by_module=True), att.self_scores(by_module=True)
    for m in MODULES:
        Kmm = K[idx[m]][:, idx[m]] + lam * torch.eye(len(idx[m]), dtype=K.dtype)
        want = G[m] @ torch.linalg.solve(Kmm, Gt[m].T)
        torch.testing.assert_close(parts[m], want, rtol=1e-8, atol=1e-10 * float(want.abs().max()))
        want_self = (G[m] * torch.linalg.solve(Kmm, G[m].T).T).sum(1)
        torch.testing.assert_close(selfs[m], want_self, rtol=1e-8, atol=1e-10 * float(want_self.abs().max()))
    torch.testing.assert_close(sum(parts.values()), att.scores(XT, YT), rtol=1e-9, atol=1e-12)


def test_full_matrix_methods_refuse_by_module_naming_the_ones_that_split():
    assert by_module_names() == ["grad-dot", "grad-cos", "tracin", "if-kfac", "if-ekfac"]
    att = make_attributor("if-cg", damping=0.05, compute=QUIET).fit(NET, X, Y)
    with pytest.raises(ConfigError, match="'if-cg' does not split exactly over modules.*grad-dot, grad-cos, tracin, "
                                          "if-kfac, if-ekfac"):
        att.scores(XT, YT, by_module=True)
    with pytest.raises(ConfigError, match="'if-cg' does not split"):
        att.self_scores(by_module=True)


@pytest.mark.parametrize("method", ["grad-dot", "if-ekfac"])
def test_by_module_over_the_memory_budget_goes_to_memory_maps(method, tmp_path, monkeypatch):
    from modelsense.data import scratch

    original, mapped = scratch.open_map, []

    def spy(path, *args):
        mapped.append(str(path))
        return original(path, *args)

    monkeypatch.setattr(scratch, "open_map", spy)
    att = make_attributor(method, compute=ComputeOptions(progress=False, memory_budget=64,
                                                         scratch_dir=str(tmp_path))).fit(NET, X, Y)
    parts = att.scores(XT, YT, by_module=True)
    modules = [p for p in mapped if os.path.basename(p).startswith(f"scores_{method}_module_")]
    assert len(modules) == 2 and all(os.path.dirname(p) == str(tmp_path) for p in modules)
    assert not list(tmp_path.glob(f"scores_{method}_module_*"))  # unlinked once mapped: nothing left behind
    torch.testing.assert_close(sum(parts.values()), att.scores(XT, YT), rtol=1e-10, atol=1e-12)


def test_module_shares_of_the_top_pairs():
    from modelsense.attribution.evaluation import module_shares

    parts = {"a": [[3.0, -1.0], [0.0, 1.0]], "b": [[1.0, 0.0], [0.0, -3.0]]}  # total [[4, -1], [0, -2]]
    shares = module_shares(parts, 0.25)  # one pair each: (0, 0) helpful, (1, 1) harmful
    assert shares == {"helpful": {"a": 0.75, "b": 0.25}, "harmful": {"a": -0.5, "b": 1.5}}
    both = module_shares(parts, 0.5)  # (0, 0), (1, 0) with total 4; (1, 1), (0, 1) with total -3
    assert both["helpful"] == {"a": 0.75, "b": 0.25} and both["harmful"] == pytest.approx({"a": 0.0, "b": 1.0})
    with pytest.raises(ValueError, match="fraction"):
        module_shares(parts, 0.0)
