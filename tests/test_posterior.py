"""Gaussian posteriors (Laplace, IVON, Adam): predictive covariance, samples, evidence."""

import math

import pytest
import torch
from ivon import IVON
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import (
    GaussianPosterior,
    adam_posterior,
    build_curvature,
    dense_ggn,
    ivon_posterior,
    laplace,
)
from modelsense.errors import ConfigError

DT = torch.float64


def mlp_problem(n=24, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    return FunctionalModel(net), torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))


def cnn_problem(n=10, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 2, stride=2), nn.Flatten(), nn.Linear(18, 3)
    ).to(DT)
    return FunctionalModel(net), torch.randn(n, 1, 6, 6, dtype=DT), torch.randint(0, 3, (n,))


def explicit_predictive(fm, x, Sigma):
    J = fm.jacobians(fm.params, x)
    return J @ Sigma @ J.transpose(1, 2)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "ekfac", "lowrank"])
@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_predictive_covariance_matches_explicit_jacobians(structure, problem):
    fm, x, y = mlp_problem() if problem == "mlp" else cnn_problem()
    post = laplace(fm, x, y, structure=structure, prior_precision=0.5)
    # Σ materialised from the structure (for KFAC: the Kronecker blocks as dense matrices)
    Sigma = torch.linalg.inv(post.curvature.to_dense() + 0.5 * torch.eye(fm.n_params, dtype=DT))
    x_new = x[:7] + 0.1
    V = post.predictive_covariance(x_new, chunk_size=3)
    assert V.shape == (7, 3, 3)
    assert torch.allclose(V, explicit_predictive(fm, x_new, Sigma), atol=1e-10)
    assert torch.allclose(post.predictive_variance(x_new), torch.diagonal(V, dim1=-2, dim2=-1))
    assert torch.allclose(post.marginal_variance(), Sigma.diagonal(), atol=1e-10)


def test_diag_predictive_with_parameters_outside_linear_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    fm, x, y = FunctionalModel(net), torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    post = laplace(fm, x, y, structure="diag", prior_precision=0.5)
    Sigma = torch.diag(1.0 / (dense_ggn(fm, x, y).diagonal() + 0.5))
    assert torch.allclose(post.predictive_covariance(x), explicit_predictive(fm, x, Sigma), atol=1e-10)


def test_full_laplace_is_the_inverse_of_ggn_plus_prior():
    fm, x, y = mlp_problem()
    post = laplace(fm, x, y, structure="full", prior_precision=2.0)
    Sigma = torch.linalg.inv(dense_ggn(fm, x, y) + 2.0 * torch.eye(fm.n_params, dtype=DT))
    assert torch.allclose(post.predictive_covariance(x), explicit_predictive(fm, x, Sigma), atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kfac", "diag"])
def test_samples_have_the_posterior_covariance(structure):
    fm, x, y = mlp_problem()
    post = laplace(fm, x, y, structure=structure, prior_precision=1.0)
    Sigma = torch.linalg.inv(post.curvature.to_dense() + torch.eye(fm.n_params, dtype=DT))
    theta = post.sample(20000, generator=torch.Generator().manual_seed(0))
    assert theta.shape == (20000, fm.n_params)
    centred = theta - post.mean_flat
    emp = centred.T @ centred / len(theta)
    scale = Sigma.diagonal().sqrt()
    assert ((emp - Sigma) / torch.outer(scale, scale)).abs().max() < 0.05  # ≈ 7 standard errors at n = 20000
    sampled = post.sample_params(2)
    assert sampled["0.weight"].shape == (2, 5, 4)


def test_log_marginal_likelihood_matches_linear_gaussian_closed_form():
    torch.manual_seed(7)
    n, d, c, delta = 15, 4, 2, 0.8
    X, Y = torch.randn(n, d, dtype=DT), torch.randn(n, c, dtype=DT)
    net = nn.Linear(d, c, bias=False).to(DT)
    with torch.no_grad():  # MAP of Σ ½‖y_i − W x_i‖² + δ/2 ‖W‖²
        net.weight.copy_(torch.linalg.solve(X.T @ X + delta * torch.eye(d, dtype=DT), X.T @ Y).T)
    fm = FunctionalModel(net, "gaussian")
    cov = X @ X.T / delta + torch.eye(n, dtype=DT)
    exact = float(
        sum(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), cov).log_prob(Y[:, k]) for k in range(c))
    )
    for structure in ("full", "kfac"):  # KFAC is exact for a linear layer under the gaussian likelihood
        post = laplace(fm, X, Y, structure=structure, prior_precision=delta)
        assert math.isclose(post.log_marginal_likelihood(), exact, rel_tol=1e-10)


def test_optimize_prior_precision_finds_the_evidence_maximum():
    fm, x, y = mlp_problem()
    for structure in ("kfac", "diag", "full"):
        post = laplace(fm, x, y, structure=structure, prior_precision=1.0)
        start = post.log_marginal_likelihood()
        delta = post.optimize_prior_precision()
        assert post.prior_precision == delta
        best = post.log_marginal_likelihood()
        assert best >= start
        for factor in (0.99, 1.01):  # stationary and a maximum in δ
            assert post.log_marginal_likelihood(delta * factor) < best
        lam = post.curvature.eigenvalues().clamp_min(0)
        gamma = float((lam / (lam + delta)).sum())  # MacKay: δ = γ / ‖θ*‖²
        assert math.isclose(delta, gamma / float(post.mean_flat.pow(2).sum()), rel_tol=1e-8)


def _train_tiny(optimizer_name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    if optimizer_name == "ivon":  # two groups with their own weight decay and ess exercise the offsets
        groups = [
            {"params": [net[0].weight, net[0].bias], "weight_decay": 1e-3},
            {"params": [net[2].weight, net[2].bias], "weight_decay": 5e-2, "ess": 8.0},
        ]
        opt = IVON(groups, lr=0.05, ess=16.0, hess_init=0.3)
        for _ in range(5):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    else:
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net, opt


def test_ivon_variance_readout_matches_hand_computation():
    net, opt = _train_tiny("ivon")
    post = ivon_posterior(FunctionalModel(net), opt)
    expected = []
    for group in opt.param_groups:  # σ² = 1 / (ess (h + wd)), h flat over the group in order
        expected.append(1.0 / (group["ess"] * (group["hess"] + group["weight_decay"])))
    expected = torch.cat(expected)  # group order = module order here
    assert torch.allclose(post.marginal_variance(), expected, rtol=1e-6)
    assert post.source == "ivon" and isinstance(post.prior_precision, torch.Tensor)
    assert torch.allclose(post.mean_flat, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    # weights only: the bias entries are skipped, offsets still right
    post_w = ivon_posterior(FunctionalModel(net, trainable=lambda n: n.endswith("weight")), opt)
    keep = torch.cat([torch.full((p.numel(),), n.endswith("weight")) for n, p in net.named_parameters()])
    assert torch.allclose(post_w.marginal_variance(), expected[keep], rtol=1e-6)


def test_adam_variance_readout_matches_hand_computation():
    net, opt = _train_tiny("adam")
    post = adam_posterior(FunctionalModel(net), opt, n_train=16, prior_precision=0.1)
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in net.parameters()])
    assert torch.allclose(post.marginal_variance(), 1.0 / (16 * v.sqrt() + 0.1), rtol=1e-6)
    x = torch.randn(5, 3)
    J = FunctionalModel(net).jacobians(FunctionalModel(net).params, x)
    expected = torch.einsum("ncp,p,ndp->ncd", J, 1.0 / (16 * v.sqrt() + 0.1), J)
    assert torch.allclose(post.predictive_covariance(x), expected, rtol=1e-5, atol=1e-8)


def test_posterior_bad_input():
    fm, x, y = mlp_problem()
    with pytest.raises(ConfigError, match="prior precision must be > 0"):
        laplace(fm, x, y, structure="diag", prior_precision=0.0)
    with pytest.raises(ConfigError, match="needs a structure with inverses"):
        laplace(fm, x, y, structure="implicit")
    with pytest.raises(ConfigError, match="unknown structure"):
        laplace(fm, x, y, structure="kron")
    net, opt = _train_tiny("adam")
    with pytest.raises(ConfigError, match="'hess'"):
        ivon_posterior(FunctionalModel(net), opt)
    fresh = torch.optim.Adam(net.parameters())
    with pytest.raises(ConfigError, match="take at least one optimizer step"):
        adam_posterior(FunctionalModel(net), fresh, 16, 1.0)
    K = build_curvature(fm, x, y, structure="kfac")
    with pytest.raises(ConfigError, match="per-parameter prior precision"):
        GaussianPosterior(fm, K, torch.ones(fm.n_params, dtype=DT))
