"""The likelihood objects (`core.likelihood`) against their definitions: the output gradient and Hessian
against torch.func derivatives of the NLL, H^{1/2} (H^{1/2})ᵀ = H, the Hessian-vector product = H v,
NLL values written out by hand, sampling frequencies, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from modelsense.core.functional import FunctionalModel
from modelsense.core.likelihood import Categorical, Gaussian, SigmoidBCE, likelihood_for
from modelsense.errors import ConfigError, DataError

DT = torch.float64
N, C = 5, 4


def case(name: str, seed: int = 0):
    """(likelihood, outputs f (N, C), targets y) on tiny random float64 outputs."""
    g = torch.Generator().manual_seed(seed)
    f = 2 * torch.randn(N, C, generator=g, dtype=DT)
    if name == "gaussian":
        return Gaussian(), f, torch.randn(N, C, generator=g, dtype=DT)
    if name == "gaussian_tau":
        return Gaussian(noise_precision=2.5), f, torch.randn(N, C, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    if name == "sigmoid_multi":  # a 0/1 target matrix, as `sample` draws
        return SigmoidBCE(), f, torch.bernoulli(torch.full((N, C), 0.4, dtype=DT), generator=g)
    return {"categorical": Categorical(), "sigmoid": SigmoidBCE()}[name], f, y


NAMES = ("categorical", "gaussian", "gaussian_tau", "sigmoid", "sigmoid_multi")


def per_row(fun, f, y):
    """fun applied to each example alone: stacks (C,) or (C, C) results over the N rows."""
    return torch.stack([fun(f[i], y[i]) for i in range(len(f))])


@pytest.mark.parametrize("name", NAMES)
def test_gradient_and_hessian_are_the_derivatives_of_the_nll(name):
    lik, f, y = case(name)

    def nll_i(fi, yi):
        return lik.nll(fi.unsqueeze(0), yi.unsqueeze(0))[0]

    grad = per_row(torch.func.grad(nll_i), f, y)
    hess = per_row(torch.func.hessian(nll_i), f, y)
    torch.testing.assert_close(lik.output_grad(f, y), grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lik.output_hessian(f), hess, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        lik.output_hessian_diag(f), torch.diagonal(hess, dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", NAMES)
def test_square_root_and_hessian_vector_product(name):
    lik, f, _ = case(name, seed=1)
    H, L = lik.output_hessian(f), lik.output_hessian_sqrt(f)
    assert L.shape == H.shape == (N, C, C)
    torch.testing.assert_close(L @ L.transpose(-1, -2), H, rtol=1e-12, atol=1e-12)
    u = torch.randn(N, C, generator=torch.Generator().manual_seed(2), dtype=DT)
    torch.testing.assert_close(lik.output_hvp(f, u), (H @ u.unsqueeze(-1)).squeeze(-1), rtol=1e-12, atol=1e-12)
    U = torch.randn(3, N, C, generator=torch.Generator().manual_seed(3), dtype=DT)  # several vectors at once
    torch.testing.assert_close(lik.output_hvp(f, U), torch.einsum("ncd,mnd->mnc", H, U), rtol=1e-12, atol=1e-12)


def test_nll_values_by_hand():
    f = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    p = torch.exp(f) / torch.exp(f).sum()
    assert float(Categorical().nll(f, torch.tensor([2]))[0]) == pytest.approx(-math.log(float(p[0, 2])), rel=1e-14)
    s = 1 / (1 + torch.exp(-f[0]))
    bce = -(math.log(s[1]) + math.log(1 - s[0]) + math.log(1 - s[2]))
    assert float(SigmoidBCE().nll(f, torch.tensor([1]))[0]) == pytest.approx(bce, rel=1e-14)
    y = torch.tensor([[0.0, 1.0, 2.0]], dtype=DT)
    assert float(Gaussian(3.0).nll(f, y)[0]) == pytest.approx(1.5 * (1 + 9 + 2.25), rel=1e-14)
    assert Gaussian(3.0).nll_constant(6) == pytest.approx(3 * math.log(2 * math.pi / 3.0), rel=1e-14)
    assert Categorical().nll_constant(6) == 0.0
    # the per-example gaussian loss sums every output entry; (n,) targets serve C = 1
    torch.testing.assert_close(Gaussian().nll(f[:, :1], torch.tensor([3.0], dtype=DT)), torch.tensor([2.0], dtype=DT))


def test_mean_and_the_gradient_as_mean_minus_target():
    lik, f, y = case("categorical")
    torch.testing.assert_close(lik.mean(f).sum(-1), torch.ones(N, dtype=DT))
    onehot = torch.nn.functional.one_hot(y, C).to(DT)
    torch.testing.assert_close(lik.output_grad(f, y), lik.mean(f) - onehot)
    torch.testing.assert_close(SigmoidBCE().output_grad(f, y), torch.sigmoid(f) - onehot)
    torch.testing.assert_close(SigmoidBCE().output_grad(f, y), SigmoidBCE().output_grad(f, onehot))


@pytest.mark.parametrize("name", ("categorical", "sigmoid", "gaussian_tau"))
def test_samples_follow_the_predictive(name):
    """Sample frequencies / moments within 5 standard errors of the predictive's; the Monte-Carlo Fisher
    mean_s g_s g_sᵀ (g at sampled targets) approaches the output Hessian."""
    lik, f, _ = case(name, seed=4)
    S = 20000
    g = torch.Generator().manual_seed(5)
    draws = lik.sample(f.repeat(S, 1), generator=g)  # S copies of the N examples in one call
    draws = draws.reshape(S, N, *draws.shape[1:])  # (S, N) labels or (S, N, C)
    if name == "categorical":
        assert draws.dtype == torch.int64 and draws.shape == (S, N) and int(draws.min()) >= 0 and int(draws.max()) < C
        freq = torch.nn.functional.one_hot(draws, C).to(DT).mean(0)
        p = lik.mean(f)
        assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / S).sqrt() + 1e-12).all())
    elif name == "sigmoid":
        assert draws.shape == (S, N, C) and bool(((draws == 0) | (draws == 1)).all())
        p = lik.mean(f)
        assert bool(((draws.mean(0) - p).abs() <= 5 * (p * (1 - p) / S).sqrt() + 1e-12).all())
    else:
        r = draws - f
        assert bool((r.mean(0).abs() <= 5 / math.sqrt(S * 2.5)).all())
        assert bool(((r.pow(2).mean(0) * 2.5 - 1).abs() <= 5 * math.sqrt(2 / S)).all())
    grads = torch.stack([lik.output_grad(f, d) for d in draws[:4000]])  # (S', N, C)
    fisher = torch.einsum("snc,snd->ncd", grads, grads) / len(grads)
    torch.testing.assert_close(
        fisher, lik.output_hessian(f), atol=0.1 * float(lik.output_hessian(f).abs().max()), rtol=0
    )


def test_likelihood_for_names_and_the_model_objective():
    assert likelihood_for("categorical") == Categorical()
    assert likelihood_for("categorical", "sigmoid_bce") == SigmoidBCE()
    assert likelihood_for("gaussian", noise_precision=2.0) == Gaussian(2.0) != Gaussian(1.0)
    fm = FunctionalModel(torch.nn.Linear(3, C).to(DT))
    assert fm.objective == Categorical() and fm.with_loss("cross_entropy") is fm
    sig = fm.with_loss("sigmoid_bce")
    assert (
        sig.objective == SigmoidBCE()
        and sig.params is fm.params
        and sig.module is fm.module
        and fm.objective == Categorical()
    )
    x, y = torch.randn(N, 3, dtype=DT), torch.randint(0, C, (N,))
    torch.testing.assert_close(sig.per_example_loss(sig.params, x, y), SigmoidBCE().nll(fm(fm.params, x), y))
    # per-example gradients (vmap over single examples) go through the same object
    g = sig.per_example_grads(sig.params, x, y, flat=True)
    f = fm(fm.params, x).detach()
    err = SigmoidBCE().output_grad(f, y)
    torch.testing.assert_close(g[:, : C * 3], (err.unsqueeze(-1) * x.unsqueeze(1)).reshape(N, -1))


def test_bad_names_and_settings():
    with pytest.raises(ConfigError, match=r"unknown likelihood 'poisson'"):
        likelihood_for("poisson")
    with pytest.raises(ConfigError, match=r"unknown loss 'hinge'; expected one of cross_entropy, sigmoid_bce"):
        likelihood_for("categorical", "hinge")
    with pytest.raises(ConfigError, match=r"'sigmoid_bce' needs a classification model"):
        likelihood_for("gaussian", "sigmoid_bce")
    with pytest.raises(ConfigError, match="noise precision must be a finite number > 0"):
        Gaussian(0.0)
    with pytest.raises(ConfigError, match="unknown likelihood"):
        FunctionalModel(torch.nn.Linear(3, 2), likelihood="bernoulli")


@pytest.mark.parametrize("lik", (Categorical(), SigmoidBCE()), ids=("categorical", "sigmoid"))
def test_bad_labels_say_what_was_expected(lik):
    f = torch.randn(N, C, dtype=DT)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 4\), received range \[0, 4\]"):
        lik.check_targets(f, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 4\), received range \[-1, 2\]"):
        lik.check_targets(f, torch.tensor([0, 1, 2, -1, 2]))
    for method in (lik.nll, lik.output_grad, lik.check_targets):
        with pytest.raises(DataError, match=r"integer labels of shape \(n,\), received dtype torch.float64"):
            method(f, torch.zeros(N, dtype=DT))
        with pytest.raises(DataError, match=r"expected 5 targets \(one per row of the outputs\), received 3"):
            method(f, torch.tensor([0, 1, 2]))
        with pytest.raises(DataError, match=r"outputs of shape \(n, C\), received \(5, 4, 1\)"):
            method(f.unsqueeze(-1), torch.zeros(N, dtype=torch.long))
        with pytest.raises(DataError, match=r"C >= 2 outputs \(a classification head\)"):
            method(f[:, :1], torch.zeros(N, dtype=torch.long))
    assert lik.check_targets(f, torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)).dtype == torch.int64


def test_bad_gaussian_targets_and_sigmoid_matrices():
    f = torch.randn(N, C, dtype=DT)
    for method in (Gaussian().nll, Gaussian().output_grad, Gaussian().check_targets):
        with pytest.raises(
            DataError, match=r"gaussian targets must have shape \(5, 4\) \(or \(n,\) for C = 1\), received \(5, 3\)"
        ):
            method(f, torch.zeros(N, 3, dtype=DT))
    with pytest.raises(DataError, match="NaN or inf"):
        Gaussian().check_targets(f, torch.full((N, C), float("nan"), dtype=DT))
    with pytest.raises(DataError, match="only 0 and 1"):
        SigmoidBCE().check_targets(f, torch.full((N, C), 0.5, dtype=DT))
