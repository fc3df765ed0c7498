"""Curvature operators, Lanczos/Hutchinson/SLQ and effective dimension against dense ground truth.

Canonical test: a tiny MLP or CNN in float64, the operator and the dense matrix (dense.py, computed
with torch.func.hessian / explicit Jacobians), compared entry by entry.
"""

import math

import pytest
import torch
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import (
    CurvatureConfig,
    DenseCurvature,
    ImplicitCurvature,
    KroneckerCurvature,
    blr_posterior_contraction,
    build_curvature,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_matrix,
    effdim_scale,
    effective_dimension,
    fourier_features,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    top_eigenpairs,
)
from modelsense.errors import ConfigError, DataError

DT = torch.float64


def mlp_problem(n=24, likelihood="categorical", seed=0, trainable=None):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(n, 4, dtype=DT)
    y = torch.randint(0, 3, (n,)) if likelihood == "categorical" else torch.randn(n, 3, dtype=DT)
    return FunctionalModel(net, likelihood, trainable=trainable), x, y


def cnn_problem(n=10, seed=0, padding=1):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=padding), nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, padding="valid"), nn.Tanh(),
        nn.Flatten(), nn.LazyLinear(3),
    ).to(DT)
    x = torch.randn(n, 1, 6, 6, dtype=DT)
    net(x[:1])  # materialise the lazy layer
    return FunctionalModel(net), x, torch.randint(0, 3, (n,))


def layernorm_problem(n=12, seed=0):
    """Parameters outside Linear/Conv2d: the generic (per-example) paths are used."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    return FunctionalModel(net), torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))


class MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(1)


class TinySequenceNet(nn.Module):
    """Tokens -> Embedding + positions (bare parameter) -> LayerNorm -> [nn.MultiheadAttention] ->
    residual GELU MLP on (n, T, d) -> mean over tokens -> out: every kind of Kronecker layer but conv,
    and fallback parameters (positions, LayerNorm affine, MultiheadAttention's in_proj and out_proj)."""

    def __init__(self, vocabulary=7, d=4, T=5, C=3, attention=False, padding_idx=None):
        super().__init__()
        self.tok = nn.Embedding(vocabulary, d, padding_idx=padding_idx)
        self.pos = nn.Parameter(0.3 * torch.randn(1, T, d))
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True) if attention else None
        self.fc1, self.act, self.fc2 = nn.Linear(d, 6), nn.GELU(), nn.Linear(6, d)
        self.out = nn.Linear(d, C)

    def forward(self, ids):
        h = self.tok(ids) + self.pos
        a = self.ln(h)
        h = h + self.attn(a, a, a, need_weights=False)[0] if self.attn is not None else a
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.out(h.mean(1))


def sequence_problem(n=8, seed=0, attention=False, padding_idx=None):
    """Token sequences (n, 5) of a 7-word vocabulary (nn.MultiheadAttention has no forward-mode AD
    in torch 2.13, and padding_idx masks only the reverse-mode derivative: both stay out of the
    problems that the implicit, jvp-based structures see)."""
    torch.manual_seed(seed)
    net = TinySequenceNet(attention=attention, padding_idx=padding_idx).to(DT).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        net.ln.weight.add_(0.3 * torch.randn(4, dtype=DT))
        net.ln.bias.add_(0.3 * torch.randn(4, dtype=DT))
    return FunctionalModel(net), torch.randint(0, 7, (n, 5)), torch.randint(0, 3, (n,))


def conv1d_problem(n=6, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same", dilation=2), nn.Tanh(),
        nn.Conv1d(3, 2, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(14, 3),
    ).to(DT)
    return FunctionalModel(net), torch.randn(n, 2, 13, dtype=DT), torch.randint(0, 3, (n,))


PROBLEMS = {
    "mlp": lambda: mlp_problem(),
    "layernorm": lambda: layernorm_problem(),
    "mlp_gaussian": lambda: mlp_problem(likelihood="gaussian"),
    "cnn": lambda: cnn_problem(),
    "conv1d": lambda: conv1d_problem(),
    "sequence": lambda: sequence_problem(),
}


# --- dense ground truth is what it claims --------------------------------------------------------
def test_dense_hessian_matches_finite_differences_of_the_gradient():
    fm, x, y = layernorm_problem()
    flat = fm.spec.flatten(fm.params)

    def gradient(t):
        return torch.func.grad(lambda u: fm.per_example_loss(fm.spec.unflatten(u), x, y).sum())(t)

    v, eps = torch.randn(fm.n_params, dtype=DT), 1e-5
    fd = (gradient(flat + eps * v) - gradient(flat - eps * v)) / (2 * eps)
    H = dense_hessian(fm, x, y)
    assert torch.allclose(H, H.T, atol=1e-12)
    assert torch.allclose(H @ v, fd, atol=1e-6)


def test_dense_ggn_equals_hessian_for_linear_gaussian_and_ef_is_outer_product():
    torch.manual_seed(1)
    fm = FunctionalModel(nn.Linear(3, 2).to(DT), "gaussian")
    x, y = torch.randn(9, 3, dtype=DT), torch.randn(9, 2, dtype=DT)
    assert torch.allclose(dense_ggn(fm, x, y), dense_hessian(fm, x, y), atol=1e-12)
    g = fm.per_example_grads(fm.params, x, y, flat=True)
    assert torch.allclose(dense_empirical_fisher(fm, x, y), sum(torch.outer(gi, gi) for gi in g), atol=1e-12)


# --- exact structures against dense ---------------------------------------------------------------
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("matrix", ["ggn", "hessian", "ef"])
def test_exact_structures_match_dense(problem, matrix):
    fm, x, y = PROBLEMS[problem]()
    D = dense_matrix(fm, x, y, matrix)
    V = torch.randn(fm.n_params, 3, dtype=DT)
    implicit = build_curvature(fm, x, y, matrix=matrix, structure="implicit", chunk_size=7)
    assert torch.allclose(implicit.mv(V), D @ V, atol=1e-10)
    assert torch.allclose(implicit.mv(V[:, 0]), D @ V[:, 0], atol=1e-10)
    assert torch.allclose(implicit.diag(), D.diagonal(), atol=1e-10)
    full = build_curvature(fm, x, y, matrix=matrix, structure="full", chunk_size=5)
    assert torch.allclose(full.to_dense(), D, atol=1e-10)
    diag = build_curvature(fm, x, y, matrix=matrix, structure="diag", chunk_size=5)
    assert torch.allclose(diag.diag(), D.diagonal(), atol=1e-10)
    assert torch.allclose(diag.mv(V), D.diagonal()[:, None] * V, atol=1e-10)
    assert math.isclose(full.trace(), float(D.trace()), rel_tol=1e-10, abs_tol=1e-10)


@pytest.mark.parametrize("matrix", ["ggn", "hessian", "ef"])
def test_kept_graphs_give_the_same_products(matrix):
    fm, x, y = mlp_problem()
    D = dense_matrix(fm, x, y, matrix)
    for cache in (True, False):
        K = build_curvature(fm, x, y, matrix=matrix, chunk_size=10)
        K.cache_graph = cache
        for _ in range(3):  # repeated single-vector products through kept (or rebuilt) graphs
            v = torch.randn(fm.n_params, dtype=DT)
            assert torch.allclose(K.mv(v), D @ v, atol=1e-10)
        assert len(K._graph_cache) == (3 if cache else 0)  # chunks of 10, 10, 4
    # a parameter that does not reach the output
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(2, 2)

        def forward(self, inputs):
            return self.used(inputs)

    fm2 = FunctionalModel(WithUnused().to(DT))
    K2 = build_curvature(fm2, x, y, matrix=matrix)
    v = torch.randn(fm2.n_params, dtype=DT)
    assert torch.allclose(K2.mv(v), dense_matrix(fm2, x, y, matrix) @ v, atol=1e-10)


def test_mean_reduction_divides_by_n_and_chunking_does_not_matter():
    fm, x, y = mlp_problem()
    v = torch.randn(fm.n_params, dtype=DT)
    s = build_curvature(fm, x, y, structure="implicit", chunk_size=len(x)).mv(v)
    m = build_curvature(fm, x, y, structure="implicit", reduction="mean", chunk_size=5).mv(v)
    assert torch.allclose(m * len(x), s, atol=1e-12)


def test_weights_only_selects_the_sub_block():
    fm_all, x, y = mlp_problem()
    fm_w, _, _ = mlp_problem(trainable=lambda n: n.endswith("weight"))
    D = dense_ggn(fm_all, x, y)
    idx, start = [], 0
    for name, numel in zip(fm_all.spec.names, fm_all.spec.numels):
        if name.endswith("weight"):
            idx += range(start, start + numel)
        start += numel
    K = build_curvature(fm_w, x, y, structure="full")
    assert K.n_params == len(idx) < fm_all.n_params
    assert torch.allclose(K.to_dense(), D[idx][:, idx], atol=1e-12)


# --- inverses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["implicit", "full", "diag", "kfac", "ekfac", "lowrank"])
def test_inverse_mv_matches_solve(structure):
    fm, x, y = mlp_problem()
    K = build_curvature(fm, x, y, structure=structure, rank=6)
    A = K.to_dense() + 0.7 * torch.eye(fm.n_params, dtype=DT)
    B = torch.randn(fm.n_params, 2, dtype=DT)
    assert torch.allclose(K.inverse_mv(B, 0.7), torch.linalg.solve(A, B), atol=1e-8)
    if structure != "implicit":
        R = K.inverse_sqrt_mv(K.inverse_sqrt_mv(B, 0.7), 0.7)
        assert torch.allclose(R, torch.linalg.solve(A, B), atol=1e-10)
        assert torch.allclose(K.inverse_diag(0.7), torch.linalg.inv(A).diagonal(), atol=1e-10)
        assert math.isclose(K.log_det(0.7), float(torch.linalg.slogdet(A)[1]), rel_tol=1e-10)


def test_lowrank_is_the_top_eigenspace_of_the_dense_ggn():
    fm, x, y = mlp_problem()
    D = dense_ggn(fm, x, y)
    K = build_curvature(fm, x, y, structure="lowrank", rank=5, lanczos_tol=1e-10)
    lam, Q = torch.linalg.eigh(D)
    top = Q[:, -5:] @ torch.diag(lam[-5:]) @ Q[:, -5:].T
    assert torch.allclose(K.to_dense(), top, atol=1e-8)
    assert torch.allclose(K.eigenvalues()[:5], lam.flip(0)[:5], rtol=1e-8)


# --- KFAC / EK-FAC ----------------------------------------------------------------------------------
def _block(K, D, layer):
    idx = layer.flat_indices()
    return K[idx][:, idx], D[idx][:, idx]


def test_kfac_exact_for_one_example_linear_model():
    torch.manual_seed(2)
    fm = FunctionalModel(nn.Linear(4, 3).to(DT))
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([1])
    for structure in ("kfac", "ekfac"):
        K = build_curvature(fm, x, y, structure=structure)
        assert torch.allclose(K.to_dense(), dense_ggn(fm, x, y), atol=1e-12)


@pytest.mark.parametrize("matrix", ["ggn", "ef"])
def test_kfac_blocks_exact_for_one_example_mlp(matrix):
    fm, x, y = mlp_problem(n=1)
    D = dense_matrix(fm, x, y, matrix)
    K = build_curvature(fm, x, y, matrix=matrix, structure="kfac")
    for layer in K.layers:
        approx, exact = _block(K.to_dense(), D, layer)
        assert torch.allclose(approx, exact, atol=1e-12)


def test_kfac_exact_for_linear_gaussian_model_with_many_examples():
    torch.manual_seed(3)
    fm = FunctionalModel(nn.Linear(4, 2).to(DT), "gaussian")
    x, y = torch.randn(30, 4, dtype=DT), torch.randn(30, 2, dtype=DT)
    K = build_curvature(fm, x, y, structure="kfac")
    assert torch.allclose(K.to_dense(), dense_ggn(fm, x, y), atol=1e-10)
    # and the last layer of a gaussian MLP (its backpropagated vectors are e_c for every input)
    fm2, x2, y2 = mlp_problem(n=30, likelihood="gaussian")
    K2 = build_curvature(fm2, x2, y2, structure="kfac")
    approx, exact = _block(K2.to_dense(), dense_ggn(fm2, x2, y2), K2.layers[-1])
    assert torch.allclose(approx, exact, atol=1e-10)


def test_kfac_exact_for_one_example_conv_with_one_output_location():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 3, 4), nn.Flatten(), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    fm = FunctionalModel(net)
    x, y = torch.randn(1, 2, 4, 4, dtype=DT), torch.tensor([2])
    K = build_curvature(fm, x, y, structure="kfac")
    D = dense_ggn(fm, x, y)
    for layer in K.layers:
        approx, exact = _block(K.to_dense(), D, layer)
        assert torch.allclose(approx, exact, atol=1e-12)


# K-FAC on sequences (Eschenhagen et al. 2023). Expand is exact, for any number of sequences, when
# the network is linear and acts position by position up to per-position outputs under the gaussian
# likelihood (g_itu = e_u backpropagated through fixed linear maps: the same for every i and t).
# Reduce is exact for one sequence when linear position-wise layers are followed by a mean over
# positions (g_tu the same for every t), for any likelihood; expand is not exact there.
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kfac_expand_exact_for_position_wise_linear_layers_on_sequences(structure, n):
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Flatten()).to(DT)  # (n, T, 3) -> (n, T·2)
    fm = FunctionalModel(net, "gaussian")
    x, y = torch.randn(n, 5, 3, dtype=DT), torch.randn(n, 10, dtype=DT)
    K = build_curvature(fm, x, y, structure=structure, fallback="error")
    D = dense_ggn(fm, x, y)
    assert [layer.name for layer in K.layers] == ["0", "1"]
    for layer in K.layers:
        approx, exact = _block(K.to_dense(), D, layer)
        assert torch.allclose(approx, exact, atol=1e-10)


def test_kfac_reduce_exact_for_one_mean_pooled_sequence_and_expand_is_not():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), MeanPool(), nn.Linear(5, 3)).to(DT)
    fm = FunctionalModel(net)
    x, y = torch.randn(1, 6, 3, dtype=DT), torch.tensor([1])
    D = dense_ggn(fm, x, y)
    reduce = build_curvature(fm, x, y, structure="kfac", kfac_approx="reduce")
    expand = build_curvature(fm, x, y, structure="kfac", kfac_approx="expand")
    for layer in reduce.layers:
        approx, exact = _block(reduce.to_dense(), D, layer)
        assert torch.allclose(approx, exact, atol=1e-10)
        other, _ = _block(expand.to_dense(), D, layer)
        if layer.name == "3":  # T = 1 after the pooling: both variants are the same
            assert torch.allclose(other, exact, atol=1e-10)
        else:
            assert torch.linalg.norm(other - exact) > 0.1 * torch.linalg.norm(exact)
    # EK-FAC on the exact eigenbasis of reduce is exact too
    ekfac = build_curvature(fm, x, y, structure="ekfac", kfac_approx="reduce")
    for layer in ekfac.layers:
        approx, exact = _block(ekfac.to_dense(), D, layer)
        assert torch.allclose(approx, exact, atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kfac_exact_for_embedding_then_position_wise_linear(structure):
    """The embedding is linear in the one-hot token; its A factor is diagonal: the token counts / (N T),
    padding tokens left out (they get no gradient) but counted in N T (their positions are in G)."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, 2), nn.Flatten()).to(DT)
    fm = FunctionalModel(net, "gaussian")
    x = torch.tensor([[1, 2, 0, 2, 5], [3, 3, 3, 0, 0], [6, 1, 2, 4, 4], [5, 5, 1, 0, 6]])
    y = torch.randn(4, 10, dtype=DT)
    K = build_curvature(fm, x, y, structure=structure, fallback="error")
    D = dense_ggn(fm, x, y)
    emb = K.layers[0]
    assert emb.kind == "embedding" and (emb.d_out, emb.d_in) == (3, 7)
    for layer in K.layers:
        approx, exact = _block(K.to_dense(), D, layer)
        assert torch.allclose(approx, exact, atol=1e-10)
    counts = torch.bincount(x[x != 0], minlength=7).to(DT)
    assert torch.allclose(K.factors[0][0], counts / 20)
    assert K.eigenbases[0][0] is None  # a diagonal A keeps no basis (never vocabulary x vocabulary)


def test_kfac_exact_for_conv1d_feeding_the_outputs():
    torch.manual_seed(13)
    one = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.Flatten()).to(DT)
    fm = FunctionalModel(one, "gaussian")
    x, y = torch.randn(5, 2, 7, dtype=DT), torch.randn(5, 12, dtype=DT)
    for structure in ("kfac", "ekfac"):
        K = build_curvature(fm, x, y, structure=structure)
        assert torch.allclose(K.to_dense(), dense_ggn(fm, x, y), atol=1e-10)
    two = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same"), nn.Tanh(), nn.Conv1d(3, 2, 2, dilation=2), nn.Flatten()).to(
        DT
    )
    fm2 = FunctionalModel(two, "gaussian")
    y2 = torch.randn(5, 10, dtype=DT)
    K2 = build_curvature(fm2, x, y2, structure="kfac")
    approx, exact = _block(K2.to_dense(), dense_ggn(fm2, x, y2), K2.layers[-1])
    assert torch.allclose(approx, exact, atol=1e-10)


@pytest.mark.parametrize("matrix", ["ggn", "ef"])
def test_fallback_blocks_are_the_exact_dense_blocks_or_diagonals(matrix):
    """Parameters outside Kronecker layers: positions, LayerNorm affine, nn.MultiheadAttention's
    in_proj and out_proj (its out_proj Linear is never called as a module)."""
    fm, x, y = sequence_problem(attention=True, padding_idx=0)
    D = dense_matrix(fm, x, y, matrix)
    for structure in ("kfac", "ekfac"):
        K = build_curvature(fm, x, y, matrix=matrix, structure=structure, max_dense_block=20)
        Kd = K.to_dense()
        kinds = {row["name"]: row["kind"] for row in K.describe()}
        assert kinds == {
            "tok": "embedding", "fc1": "linear", "fc2": "linear", "out": "linear", "pos": "dense",
            "ln.weight": "dense", "ln.bias": "dense", "attn.in_proj_weight": "diag", "attn.in_proj_bias": "dense",
            "attn.out_proj.weight": "dense", "attn.out_proj.bias": "dense",
        }
        reasons = {b.name: b.reason for b in K.fallbacks}
        assert "not called" in reasons["attn.out_proj.weight"] and "not in an nn.Linear" in reasons["pos"]
        for b in K.fallbacks:
            approx, exact = _block(Kd, D, b)
            if b.dense:
                assert torch.allclose(approx, exact, atol=1e-10)
            else:
                assert torch.allclose(approx, torch.diag(exact.diagonal()), atol=1e-10)
        # block-diagonal: nothing between blocks, and every parameter in exactly one block
        owner = torch.full((fm.n_params,), -1)
        for k, b in enumerate(K.blocks):
            assert bool((owner[b.flat_indices()] == -1).all())
            owner[b.flat_indices()] = k
        assert bool((owner >= 0).all())
        assert torch.equal(Kd != 0, (owner[:, None] == owner[None, :]) & (Kd != 0))
    # fallback "diag": every fallback block is the exact diagonal
    K = build_curvature(fm, x, y, matrix=matrix, structure="kfac", fallback="diag")
    for b in K.fallbacks:
        assert not b.dense
        approx, exact = _block(K.to_dense(), D, b)
        assert torch.allclose(approx, torch.diag(exact.diagonal()), atol=1e-10)


class ToSequence(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 3, 4)


class Twice(nn.Module):
    """One normalisation module applied twice (its per-example gradient sums over both calls)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(torch.tanh(self.norm(x)))


def _norm_net(norm):  # (n, 5) -> (n, 3, 4) -> norm twice -> (n, 3)
    return nn.Sequential(nn.Linear(5, 12), ToSequence(), Twice(norm), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))


NORM_NETS = {
    "layernorm_2d": lambda: _norm_net(nn.LayerNorm((3, 4))),  # over the last two dims, parameters (3, 4)
    "rmsnorm": lambda: _norm_net(nn.RMSNorm(4)),
    "groupnorm": lambda: _norm_net(nn.GroupNorm(1, 3)),
    "batchnorm": lambda: _norm_net(nn.BatchNorm1d(3)),
}


@pytest.mark.parametrize("norm", list(NORM_NETS))
def test_normalisation_parameters_get_exact_blocks_from_hooks(norm):
    """y = x̂ ⊙ w + b: the per-example rows of w and b come from the hooked backward passes (no
    per-example Jacobians) and give the exact dense blocks and diagonals; the norm is used twice."""
    torch.manual_seed(14)
    net = NORM_NETS[norm]().to(DT)
    if norm == "batchnorm":
        net.train()(torch.randn(32, 5, dtype=DT))  # running statistics
    net.eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fm = FunctionalModel(net)
    x, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    D = dense_ggn(fm, x, y)
    K = build_curvature(fm, x, y, structure="ekfac", chunk_size=3)
    assert [b.name for b in K.fallbacks] == [n for n in fm.spec.names if n.startswith("2.")]
    assert all(b.source is not None and b.dense for b in K.fallbacks)
    for b in K.fallbacks:
        approx, exact = _block(K.to_dense(), D, b)
        assert torch.allclose(approx, exact, atol=1e-10)
    exact_diag = ImplicitCurvature(fm, x, y, chunk_size=3).diag()  # kfac_layers.layer_diagonal
    assert torch.allclose(exact_diag, D.diagonal(), atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kronecker_inverses_with_diagonal_inputs_and_fallback_blocks(structure):
    fm, x, y = sequence_problem(attention=True, padding_idx=0)
    K = build_curvature(fm, x, y, structure=structure, max_dense_block=12)
    A = K.to_dense() + 0.3 * torch.eye(fm.n_params, dtype=DT)
    B = torch.randn(fm.n_params, 2, dtype=DT)
    assert torch.allclose(K.inverse_mv(B, 0.3), torch.linalg.solve(A, B), atol=1e-9)
    assert torch.allclose(K.inverse_sqrt_mv(K.inverse_sqrt_mv(B, 0.3), 0.3), torch.linalg.solve(A, B), atol=1e-9)
    assert torch.allclose(K.inverse_diag(0.3), torch.linalg.inv(A).diagonal(), atol=1e-10)
    assert math.isclose(K.log_det(0.3), float(torch.linalg.slogdet(A)[1]), rel_tol=1e-10)
    # the predictive quadratic form through the blocks = explicit Jacobians through the dense inverse
    J = fm.jacobians(fm.params, x[:5])
    expected = J @ torch.linalg.inv(A) @ J.transpose(1, 2)
    assert torch.allclose(K.jacobian_quadratic_form(fm, fm.params, x[:5], 0.3, chunk_size=2), expected, atol=1e-10)
    diag = build_curvature(fm, x, y, structure="diag")
    expected = J @ torch.diag(1.0 / (diag.diag() + 0.3)) @ J.transpose(1, 2)
    assert torch.allclose(diag.jacobian_quadratic_form(fm, fm.params, x[:5], 0.3, chunk_size=2), expected, atol=1e-10)


def test_kronecker_fitted_state_restores_the_operator_without_refitting():
    fm, x, y = sequence_problem(attention=True, padding_idx=0)
    K = build_curvature(fm, x, y, structure="ekfac", kfac_approx="reduce", max_dense_block=12)
    state = K.fitted_state()
    back = KroneckerCurvature.from_fitted_state(state, fm, x, y)
    V = torch.randn(fm.n_params, 3, dtype=DT)
    assert torch.equal(back.mv(V), K.mv(V)) and torch.equal(back.inverse_mv(V, 0.1), K.inverse_mv(V, 0.1))
    assert (back.structure, back.kfac_approx, back.describe()) == ("ekfac", "reduce", K.describe())
    other = {**state, "max_dense_block": 1024}  # another block plan: refused, naming both
    with pytest.raises(ConfigError, match=r"saved ekfac blocks are .*'diag', 'attn.in_proj_weight'.*the model's are"):
        KroneckerCurvature.from_fitted_state(other, fm, x, y)


def test_curvature_refuses_models_in_training_mode():
    """Batch norm in training mode couples the examples (and would update its running statistics);
    dropout draws random masks: a clear error, and in eval mode everything runs."""
    from modelsense.models import build_model

    net = build_model("cnn", (1, 8, 8), 3, width=4, depth=1, norm="bn", seed=0).to(DT)
    fm = FunctionalModel(net)
    x, y = torch.randn(6, 1, 8, 8, dtype=DT), torch.randint(0, 3, (6,))
    before = net.stem.norm.running_mean.clone()
    for structure in ("kfac", "implicit", "diag"):
        with pytest.raises(ConfigError, match=r"need the model in eval mode.*stem.norm \(batch norm\).*model.eval\(\)"):
            build_curvature(fm, x, y, structure=structure)
    assert torch.equal(net.stem.norm.running_mean, before)
    net.eval()
    K = build_curvature(fm, x, y, structure="ekfac")
    assert {b.name for b in K.fallbacks} == {n for n in fm.spec.names if ".norm." in n}
    D = dense_ggn(fm, x, y)
    for b in K.fallbacks:  # the batch-norm affine parameters: exact dense blocks
        approx, exact = _block(K.to_dense(), D, b)
        assert torch.allclose(approx, exact, atol=1e-10)
    dropout = FunctionalModel(nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.2), nn.Linear(5, 3)).to(DT))
    with pytest.raises(ConfigError, match=r"'1 \(dropout\)'"):
        build_curvature(dropout, torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,)), structure="kfac")


def _dense_factor(A):
    """A Kronecker factor as a matrix (diagonal factors are stored as vectors)."""
    return torch.diag(A) if A.ndim == 1 else A


def _input_basis(Q_a, d_in):
    return torch.eye(d_in, dtype=DT) if Q_a is None else Q_a


EKFAC_PROBLEMS = {
    **PROBLEMS,
    "cnn_same": lambda: cnn_problem(padding="same"),
    "attention": lambda: sequence_problem(attention=True, padding_idx=0),
}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("problem", ["mlp", "cnn", "cnn_same", "conv1d", "sequence", "attention"])
def test_ekfac_eigenvalues_are_the_exact_block_in_the_kfac_eigenbasis(problem, approx):
    fm, x, y = EKFAC_PROBLEMS[problem]()
    D = dense_ggn(fm, x, y)
    kfac = build_curvature(fm, x, y, structure="kfac", chunk_size=4, kfac_approx=approx)
    ekfac = build_curvature(fm, x, y, structure="ekfac", chunk_size=4, kfac_approx=approx)
    Kk, Ke = kfac.to_dense(), ekfac.to_dense()
    for l, layer in enumerate(ekfac.layers):
        Q_a, _, Q_g, _ = ekfac.eigenbases[l]
        basis = torch.kron(Q_g.contiguous(), _input_basis(Q_a, layer.d_in).contiguous())
        approx_k, exact = _block(Kk, D, layer)
        approx_e, _ = _block(Ke, D, layer)
        S = torch.diagonal(basis.T @ exact @ basis).reshape(layer.d_out, layer.d_in)
        assert torch.allclose(ekfac.eigenvalue_grids[l], S, atol=1e-10)
        # EK-FAC is the Frobenius-best approximation diagonal in that basis, KFAC is one such matrix
        assert torch.linalg.norm(approx_e - exact) <= torch.linalg.norm(approx_k - exact) + 1e-12
        # KFAC itself is G ⊗ A in the row-major layout
        A, G = kfac.factors[l]
        assert torch.allclose(approx_k, torch.kron(G, _dense_factor(A)), atol=1e-10)


@pytest.mark.parametrize("problem", ["cnn", "attention"])
@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kronecker_operator_is_self_consistent(structure, problem):
    fm, x, y = EKFAC_PROBLEMS[problem]()
    K = build_curvature(fm, x, y, structure=structure, max_dense_block=12)  # dense and diagonal fallback blocks
    D = K.to_dense()
    assert torch.allclose(D, D.T, atol=1e-12)
    assert torch.allclose(K.diag(), D.diagonal(), atol=1e-12)
    assert math.isclose(K.trace(), float(D.trace()), rel_tol=1e-10)
    lam = torch.linalg.eigvalsh(D).flip(0)
    assert torch.allclose(K.eigenvalues(), lam, atol=1e-10)
    e = K.eigen(7)
    assert torch.allclose(e.eigenvalues, lam[:7], atol=1e-10)
    assert torch.allclose(e.eigenvectors.T @ e.eigenvectors, torch.eye(7, dtype=DT), atol=1e-10)
    assert torch.allclose(D @ e.eigenvectors, e.eigenvectors * e.eigenvalues, atol=1e-10)


# --- Lanczos, Hutchinson, SLQ --------------------------------------------------------------------------
def test_lanczos_top_k_matches_eigvalsh_of_the_dense_hessian():
    fm, x, y = mlp_problem(n=40)
    H = dense_hessian(fm, x, y)
    lam = torch.linalg.eigvalsh(H)
    K = build_curvature(fm, x, y, matrix="hessian", seed=3)
    e = K.eigen(8)
    assert bool(e.converged.all())
    assert torch.allclose(e.eigenvalues, lam.flip(0)[:8], rtol=1e-4, atol=0)
    assert torch.allclose(
        (H @ e.eigenvectors - e.eigenvectors * e.eigenvalues).norm(dim=0), e.residuals.to(DT), atol=1e-8
    )
    mag = top_eigenpairs(K, 4, which="magnitude")
    ref = lam[torch.argsort(lam.abs(), descending=True)[:4]]
    assert torch.allclose(mag.eigenvalues, ref, rtol=1e-4)


def test_lanczos_on_a_callable_with_repeated_and_zero_eigenvalues():
    torch.manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=DT))
    lam = torch.tensor([5.0, 5.0, 3.0] + [0.0] * 27, dtype=DT)
    A = Q @ torch.diag(lam) @ Q.T
    e = top_eigenpairs(lambda v: A @ v, 4, dim=30, dtype=DT)
    assert torch.allclose(e.eigenvalues, lam[:4], atol=1e-10)


def test_hutchinson_within_three_standard_errors():
    fm, x, y = mlp_problem()
    K = build_curvature(fm, x, y, matrix="hessian")
    exact = float(dense_hessian(fm, x, y).trace())
    est = hutchinson_trace(K, 200, generator=torch.Generator().manual_seed(0))
    assert est.standard_error > 0
    assert abs(est.estimate - exact) <= 3 * est.standard_error


def test_hutchpp_within_three_standard_errors_and_tighter_than_hutchinson():
    fm, x, y = mlp_problem()
    K = build_curvature(fm, x, y, matrix="ggn")  # PSD with a decaying spectrum
    exact = float(dense_ggn(fm, x, y).trace())
    pp = hutchpp_trace(K, 30, generator=torch.Generator().manual_seed(0))
    plain = hutchinson_trace(K, 30, generator=torch.Generator().manual_seed(0))
    assert abs(pp.estimate - exact) <= 3 * pp.standard_error + 1e-9
    assert pp.standard_error < plain.standard_error


def test_slq_density_integrates_to_one_and_moments_match():
    fm, x, y = mlp_problem()
    H = dense_hessian(fm, x, y)
    P = fm.n_params
    dens = spectral_density(
        DenseCurvature(H, "hessian"), num_probes=30, num_steps=P, generator=torch.Generator().manual_seed(1)
    )
    lam = torch.linalg.eigvalsh(H)
    grid = torch.linspace(float(lam.min()) - 1, float(lam.max()) + 1, 20001, dtype=DT)
    assert math.isclose(float(torch.trapezoid(dens.evaluate(grid), grid)), 1.0, abs_tol=1e-6)
    assert torch.allclose(dens.weights.sum(1), torch.ones(30, dtype=DT), atol=1e-12)
    # first moment ≈ tr(H)/P within 3 standard errors of the probe mean
    probe = dens.probe_moments(1)
    se = float(probe.std() / math.sqrt(len(probe)))
    assert abs(dens.moment(1) - float(H.trace()) / P) <= 3 * se
    # with P steps the quadrature is exact per probe: Σ_i w_i θ_i^j = vᵀ H^j v for the same probes
    g = torch.Generator().manual_seed(1)
    V = torch.stack([(2 * torch.randint(0, 2, (P,), generator=g) - 1).to(DT) / math.sqrt(P) for _ in range(30)])
    for j in (2, 3):
        exact = torch.einsum("rp,pq,rq->r", V, torch.linalg.matrix_power(H, j), V)
        assert torch.allclose(dens.probe_moments(j), exact, rtol=1e-8)


def test_slq_quadrature_is_exact_per_probe():
    torch.manual_seed(6)
    A = torch.randn(12, 12, dtype=DT)
    A = A + A.T
    probes = []

    def matvec(v):
        probes.append(v) if not probes else None
        return A @ v

    dens = spectral_density(
        matvec, num_probes=1, num_steps=12, dim=12, dtype=DT, generator=torch.Generator().manual_seed(0)
    )
    v = probes[0]
    for j in (1, 2, 3, 5):
        assert math.isclose(
            float(dens.probe_moments(j)[0]), float(v @ torch.linalg.matrix_power(A, j) @ v), rel_tol=1e-8
        )


# --- effective dimension ----------------------------------------------------------------------------------
def test_effective_dimension_on_known_eigenvalues():
    lam = torch.tensor([9.0, 1.0, 0.0, -2.0])
    assert math.isclose(effective_dimension(lam, 1.0), 0.9 + 0.5)
    assert math.isclose(effective_dimension(lam, 1.0, negative="abs"), 0.9 + 0.5 + 2 / 3)
    assert math.isclose(effective_dimension(lam, 1.0, converged=torch.tensor([True, False, True, True])), 0.9)
    assert math.isclose(effective_dimension(torch.full((5,), 1e9), 1.0), 5.0, rel_tol=1e-8)
    assert effdim_scale(1e-4, 1000) == pytest.approx(0.1) and effdim_scale(1e-4, 1000, "mean") == 1e-4
    with pytest.raises(ConfigError, match="s > 0"):
        effective_dimension(lam, 0.0)


def test_effective_dimension_scales_with_reduction():
    fm, x, y = mlp_problem()
    lam_sum = build_curvature(fm, x, y, structure="full").eigenvalues()
    lam_mean = build_curvature(fm, x, y, structure="full", reduction="mean").eigenvalues()
    assert math.isclose(effective_dimension(lam_sum, len(x) * 0.3), effective_dimension(lam_mean, 0.3), rel_tol=1e-10)


def test_blr_contraction_matches_explicit_inverses():
    phi = fourier_features(torch.linspace(0, 5, 40, dtype=DT), 10)  # P = 20
    res = blr_posterior_contraction(
        phi, noise_variance=0.1, prior_variance=3.0, s_parameter=5.0, s_function=2.0, seed=0
    )
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert res.n_params == 20 and res.n.tolist() == list(range(1, 41))
    for n in (1, 7, 20, 33, 40):
        Pn = phi[order[:n]]
        Sigma = torch.linalg.inv(Pn.T @ Pn / 0.1 + torch.eye(20, dtype=DT) / 3.0)
        post = torch.linalg.eigvalsh(Sigma)
        func = torch.linalg.eigvalsh(Pn @ Sigma @ Pn.T).clamp_min(0)
        data = torch.linalg.eigvalsh(Pn.T @ Pn / 0.1).clamp_min(0)
        assert math.isclose(float(res.effdim_posterior[n - 1]), effective_dimension(post, 5.0), rel_tol=1e-9)
        assert math.isclose(
            float(res.effdim_function[n - 1]), effective_dimension(func, 2.0), rel_tol=1e-7, abs_tol=1e-9
        )
        assert math.isclose(float(res.effdim_hessian[n - 1]), effective_dimension(data, 1 / 3.0), rel_tol=1e-9)
        assert math.isclose(float(res.effdim_hessian[n - 1]), 20 - float(Sigma.trace()) / 3.0, rel_tol=1e-9)
    assert bool((res.effdim_posterior[1:] <= res.effdim_posterior[:-1] + 1e-12).all())  # contraction


def test_blr_default_setting_runs():
    res = blr_posterior_contraction()
    assert res.n_params == 200 and len(res.n) == 300
    assert res.effdim_posterior[-1] < res.effdim_posterior[0]


def test_compute_spectrum_summary():
    from modelsense.curvature import SpectrumConfig, compute_spectrum

    fm, x, y = mlp_problem()
    H = dense_hessian(fm, x, y)
    lam = torch.linalg.eigvalsh(H).flip(0)
    spec = compute_spectrum(
        fm, x, y, SpectrumConfig(k=5, s=(1.0, 10.0), trace_samples=50, density_probes=2, density_steps=10)
    )
    assert torch.allclose(spec.eigenvalues, lam[:5], rtol=1e-4)
    m = spec.to_metrics()
    assert m["n_params"] == fm.n_params and len(m["eigenvalues"]) == 5
    assert m["effective_dimension"] == pytest.approx(effective_dimension(lam[:5], 1.0), rel=1e-4)
    assert spec.effective_dimension[10.0] < spec.effective_dimension[1.0]
    assert abs(m["trace"] - float(H.trace())) <= 4 * m["trace_standard_error"]
    with pytest.raises(ConfigError, match="every s must be a finite number > 0"):
        SpectrumConfig(s=(0.0,))


def test_spectrum_config_default_s_is_declared_once_and_scales_with_reduction():
    from modelsense.curvature import DEFAULT_S_SUM, SpectrumConfig, compute_spectrum

    fm, x, y = mlp_problem()
    assert DEFAULT_S_SUM == 100.0 and SpectrumConfig().s == ()  # empty: the default, resolved with N
    summed = compute_spectrum(fm, x, y, SpectrumConfig(k=3))
    assert summed.config.s == (DEFAULT_S_SUM,)
    lam = torch.linalg.eigvalsh(dense_hessian(fm, x, y)).flip(0)[:3]
    assert summed.effective_dimension[DEFAULT_S_SUM] == pytest.approx(effective_dimension(lam, DEFAULT_S_SUM), rel=1e-4)
    mean = compute_spectrum(fm, x, y, SpectrumConfig(k=3, reduction="mean"))
    assert mean.config.s == (DEFAULT_S_SUM / len(x),)
    assert mean.effective_dimension[DEFAULT_S_SUM / len(x)] == pytest.approx(
        summed.effective_dimension[DEFAULT_S_SUM], rel=1e-4
    )


def test_spectrum_default_is_eigenvalues_only_and_cost_is_counted_per_part():
    from modelsense.curvature import SpectrumConfig, compute_spectrum

    fm, x, y = mlp_problem()
    cheap = compute_spectrum(fm, x, y, SpectrumConfig(k=3))
    assert cheap.trace is None and cheap.density is None and set(cheap.cost) == {"eigenvalues"}
    assert cheap.cost["eigenvalues"]["matvecs"] == cheap.num_matvecs > 0
    full = compute_spectrum(fm, x, y, SpectrumConfig(k=3, trace_samples=6, density_probes=2, density_steps=5))
    cost = full.cost
    assert cost["trace"]["matvecs"] == 6 and cost["density"]["matvecs"] == 2 * 5
    assert cost["eigenvalues"]["matvecs"] == cheap.cost["eigenvalues"]["matvecs"]  # same Lanczos run
    assert sum(part["matvecs"] for part in cost.values()) == full.num_matvecs
    assert all(part["seconds"] >= 0 for part in cost.values())
    assert full.to_metrics()["cost"] == cost
    with pytest.raises(ConfigError, match="density_probes must be >= 0"):
        SpectrumConfig(density_probes=-1)


def test_spectrum_progress_advances_per_lanczos_step_and_probe(monkeypatch):
    import contextlib

    from modelsense.curvature import SpectrumConfig, compute_spectrum
    from modelsense.curvature import lanczos as lanczos_module

    bars = []

    class Recorder:
        def __init__(self, total, description):
            self.total, self.description, self.steps, self.final_total = total, description, [], None

        def advance(self, n=1, **fields):
            self.steps.append(n)

        def set_info(self, **fields):
            pass

        def set_total(self, total):
            self.final_total = total

    @contextlib.contextmanager
    def recording_bar(total, description, enabled=True):
        bars.append(Recorder(total, description))
        yield bars[-1]

    monkeypatch.setattr(lanczos_module, "progress_bar", recording_bar)
    fm, x, y = mlp_problem()
    spec = compute_spectrum(fm, x, y, SpectrumConfig(k=3, trace_samples=20, density_probes=3, density_steps=4),
                            progress=True)
    lanczos, trace, density = bars
    steps = spec.cost["eigenvalues"]["matvecs"]
    assert "Lanczos" in lanczos.description and lanczos.steps == [1] * steps and lanczos.final_total == steps
    assert "Hutchinson" in trace.description and trace.total == 20 and sum(trace.steps) == 20 and len(trace.steps) == 2
    assert "SLQ" in density.description and density.total == 3 and density.steps == [1, 1, 1]


# --- bad input ------------------------------------------------------------------------------------------
def test_bad_input_raises_config_errors():
    fm, x, y = mlp_problem()
    with pytest.raises(ConfigError, match="unknown structure 'blockdiag'"):
        build_curvature(fm, x, y, structure="blockdiag")
    with pytest.raises(ConfigError, match="unknown matrix 'fisherish'"):
        CurvatureConfig(matrix="fisherish")
    with pytest.raises(ConfigError, match="not the Hessian"):
        build_curvature(fm, x, y, matrix="hessian", structure="kfac")
    with pytest.raises(ConfigError, match="damping >= 0"):
        build_curvature(fm, x, y, structure="diag").inverse_mv(torch.ones(fm.n_params, dtype=DT), -1.0)
    with pytest.raises(ConfigError, match="damping > 0"):
        build_curvature(fm, x, y, structure="lowrank", rank=3).inverse_mv(torch.ones(fm.n_params, dtype=DT), 0.0)
    with pytest.raises(ConfigError, match="not positive definite"):
        DenseCurvature(torch.diag(torch.tensor([1.0, -1.0], dtype=DT)), "hessian").inverse_mv(
            torch.ones(2, dtype=DT), 0.5
        )
    with pytest.raises(ConfigError, match="shape"):
        build_curvature(fm, x, y, structure="diag").mv(torch.ones(3, dtype=DT))
    with pytest.raises(ConfigError, match="max_full_params"):
        build_curvature(fm, x, y, structure="full", max_full_params=10)
    with pytest.raises(DataError, match="same number"):
        build_curvature(fm, x, y[:-1])
    for structure in ("implicit", "kfac"):  # the validation every data-built operator shares
        with pytest.raises(DataError, match="same number"):
            build_curvature(fm, x, y[:-1], structure=structure)
        with pytest.raises(ConfigError, match=r"unknown reduction 'avg'; expected one of \('sum', 'mean'\)"):
            (ImplicitCurvature if structure == "implicit" else KroneckerCurvature)(fm, x, y, reduction="avg")
    with pytest.raises(ConfigError, match="KFAC/EK-FAC approximate matrix 'ggn' or 'ef', received 'hessian'"):
        KroneckerCurvature(fm, x, y, matrix="hessian")
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(DT)
    with pytest.raises(ConfigError, match=r"do not cover \['1.weight', '1.bias'\] \(1.weight: not in an nn.Linear"):
        build_curvature(FunctionalModel(net), x, y, structure="kfac", fallback="error")
    # excluding them with trainable= makes KFAC cover every parameter
    K = build_curvature(FunctionalModel(net, trainable=lambda n: n.startswith("0.")), x, y, structure="kfac",
                        fallback="error")
    assert K.n_params == 15 and K.fallbacks == []
    with pytest.raises(ConfigError, match="unknown fallback 'skip'"):
        CurvatureConfig(structure="kfac", fallback="skip")
    with pytest.raises(ConfigError, match="unknown kfac_approx 'mean'"):
        KroneckerCurvature(fm, x, y, kfac_approx="mean")
    with pytest.raises(ConfigError, match="k >= 1"):
        DenseCurvature(torch.eye(3, dtype=DT)).eigen(0)


def test_conjugate_gradient_columns_and_preconditioner():
    from modelsense.curvature.operators import conjugate_gradient

    gen = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.logspace(-3, 0, 40, dtype=torch.float64)) @ Q.T
    B = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    B[:, 1] = 0.0  # a zero column is solved at once and leaves the products
    calls = []

    def apply(Z):
        calls.append(Z.shape[1])
        return A @ Z

    X = conjugate_gradient(apply, B, 1e-10, 500)
    assert torch.allclose(X, torch.linalg.solve(A, B), atol=1e-7)
    assert max(calls) == 2  # only the unconverged columns are multiplied
    calls.clear()
    Ainv = torch.linalg.inv(A)
    X = conjugate_gradient(apply, B, 1e-10, 500, preconditioner=lambda Z: Ainv @ Z)
    assert len(calls) == 1 and torch.allclose(X, torch.linalg.solve(A, B), atol=1e-9)
    with pytest.raises(ConfigError, match="not positive definite"):
        conjugate_gradient(lambda Z: -Z, B, 1e-10, 10)


@pytest.mark.parametrize("matrix", ["ggn", "ef"])
def test_gram_structure_is_the_exact_matrix(matrix):
    """K = s·RᵀR through the eigendecomposition of R Rᵀ equals the dense matrix (fewer rows than P)."""
    from modelsense.curvature.dense import dense_matrix

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = FunctionalModel(net)
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    dense = dense_matrix(model, x, y, matrix=matrix)
    for reduction, s in (("sum", 1.0), ("mean", 0.25)):
        K = build_curvature(model, x, y, matrix=matrix, structure="gram", reduction=reduction)
        assert K.structure == "gram"
        torch.testing.assert_close(K.to_dense(), s * dense)
        v = torch.randn(model.n_params, 3, dtype=torch.float64)
        ref = torch.linalg.solve(s * dense + 0.2 * torch.eye(len(dense), dtype=torch.float64), v)
        torch.testing.assert_close(K.inverse_mv(v, 0.2), ref)
        torch.testing.assert_close(K.trace(), float(torch.trace(s * dense)))
        top = torch.linalg.eigvalsh(s * dense).flip(0)
        torch.testing.assert_close(K.eigenvalues(), top.clamp_min(0), atol=1e-9, rtol=1e-7)
    with pytest.raises(ConfigError, match="not the Hessian"):
        build_curvature(model, x, y, matrix="hessian", structure="gram")
    with pytest.raises(ConfigError, match="max_full_params"):
        build_curvature(model, x, y, matrix=matrix, structure="gram", max_full_params=2)


# -- what the commands compose: sweeps, summaries, saved eigenvectors -----------------------------
def test_blr_summary_reads_the_curves_at_the_contraction_points():
    res = blr_posterior_contraction(n_points=12, n_frequencies=4, x_max=3.0)  # P = 8: n = 7, 8, 9
    m = res.summary()
    assert (m["n_params"], m["n_points"]) == (8, 12)
    for name in ("posterior", "function", "hessian"):
        curve = getattr(res, f"effdim_{name}")
        assert m[f"effdim_{name}_last"] == float(curve[-1])
        assert m[f"effdim_{name}_at"] == {f"n={n}": float(curve[n - 1]) for n in (7, 8, 9)}
    assert m["effdim_posterior_first"] == float(res.effdim_posterior[0])
    assert blr_posterior_contraction(n_points=8, n_frequencies=4).summary()["effdim_posterior_at"].keys() == {
        "n=7", "n=8"}  # n = 9 lies beyond the 8 points


def test_module_metrics_and_arrays_are_each_blocks_spectrum():
    from modelsense.curvature.spectrum import (
        MODULE_KEYS,
        SpectrumConfig,
        check_k,
        describe_spectrum,
        module_arrays,
        module_metrics,
        module_spectra,
    )

    model, x, y = mlp_problem()
    spectra = module_spectra(model, x, y, SpectrumConfig(k=2, trace_samples=2, density_probes=1, density_steps=4))
    metrics, arrays = module_metrics(spectra), module_arrays(spectra)
    assert set(metrics) == set(spectra) == set(model.spec.modules)
    for name, sp in spectra.items():
        assert set(metrics[name]) == set(MODULE_KEYS) and metrics[name]["eigenvalues"] == sp.eigenvalues.tolist()
        assert torch.equal(arrays[name], sp.eigenvalues) and torch.equal(arrays[f"{name}:converged"], sp.converged)
    whole = spectra[next(iter(spectra))]
    assert {"eigenvalues", "converged", "residuals", "density_grid", "density", "slq_nodes",
            "slq_weights"} == set(whole.arrays())
    text = describe_spectrum({**whole.to_metrics(), "by_module": metrics})
    assert all(f"\n  {name}: " in text for name in spectra) and "not computed" not in text
    assert check_k(model.n_params, model.module) == model.n_params
    with pytest.raises(ConfigError, match=f"--k {model.n_params + 1} is larger .*pass --k <= {model.n_params}"):
        check_k(model.n_params + 1, model.module)


def test_saved_eigenvectors_are_refused_for_another_model_or_matrix(tmp_path):
    from modelsense.curvature.spectrum import SpectrumConfig, compute_spectrum
    from modelsense.curvature.vectors import check_vectors, parameters_fingerprint, vector_arrays, vectors_key

    model, x, y = mlp_problem()
    spectrum = compute_spectrum(model, x, y, SpectrumConfig(k=2))
    key = vectors_key(model, spectrum, False, False, len(x))
    arrays = vector_arrays(spectrum, key)
    assert arrays["eigenvectors"].dtype == torch.float32 and arrays["eigenvectors"].shape == (model.n_params, 2)
    mine = {"weights_only": False, "use_test": False, "matrix": "hessian", "reduction": "sum"}
    check_vectors(tmp_path, key, model, "model.pt", **mine)  # the same model and matrix: accepted
    with pytest.raises(ConfigError, match="--reduction 'mean' \\(the vectors': 'sum'\\)"):
        check_vectors(tmp_path, key, model, "model.pt", **{**mine, "reduction": "mean"})
    other, _, _ = mlp_problem(seed=1)
    assert parameters_fingerprint(other) != key["parameters_sha256"]
    with pytest.raises(ConfigError, match="computed at another model"):
        check_vectors(tmp_path, key, other, "model.pt", **mine)


def test_train_sweep_resumes_and_measures_a_damaged_result_again(tmp_path, monkeypatch):
    import modelsense.curvature.sweep as sweep
    import modelsense.retraining.store as store_module
    from modelsense.curvature.effdim import describe_width_sweep, width_sweep_summary
    from modelsense.curvature.spectrum import SpectrumConfig
    from modelsense.data import DataConfig, load_dataset_from_config
    from modelsense.models import ModelConfig
    from modelsense.models.checkpoint import load_model
    from modelsense.retraining.store import RetrainOptions
    from modelsense.training.config import TrainConfig

    data_cfg = DataConfig("digits", n_train=60)
    data = load_dataset_from_config(data_cfg)
    models = [sweep.SweepModel(tmp_path / f"width_{w}.json", ModelConfig("mlp", widths=(w,)), 0, {"width": w},
                               tmp_path / f"model_{w}.pt") for w in (3, 2)]
    train = TrainConfig(optimizer="adam", lr=0.01, epochs=2, bs=32)
    calls, real = [], store_module.train_chunk

    def counting(recipe, jobs, *args, **kw):
        calls.append(recipe.model.widths)
        return real(recipe, jobs, *args, **kw)

    monkeypatch.setattr(store_module, "train_chunk", counting)
    logged = []

    def run(**kw):
        return sweep.train_sweep(data, data_cfg, models, train, SpectrumConfig(k=2), False, False, 100.0,
                                 RetrainOptions(), tmp_path, progress=False, log=logged.append, **kw)

    results, n = run(save_models=True)
    assert n == 2 and calls == [(3,), (2,)] and [r["width"] for r in results] == [3, 2]
    assert results[0]["n_params"] == 64 * 3 + 3 + 3 * 10 + 10 and results[0]["k"] == 2
    # the measured model is the trained one: its saved weights give the losses from the store
    module, _ = load_model(models[0].weights)
    with torch.no_grad():
        test_loss = float(torch.nn.functional.cross_entropy(module(data.x_test), data.y_test))
    assert results[0]["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    # everything measured: nothing is trained or measured again, the results are the stored ones
    again, n = run()
    assert n == 0 and again == results and len(calls) == 2
    models[1].path.write_text("{not json")
    again, n = run()
    assert n == 1 and len(calls) == 2 and any("damaged" in line for line in logged)  # measured from the store
    assert again[1]["eigenvalues"] == results[1]["eigenvalues"]
    text = describe_width_sweep(width_sweep_summary(again, [100.0], 1e-9))
    assert text.splitlines()[1].split()[:2] == ["2", str(results[1]["n_params"])]  # sorted by width
    assert "0 models with train loss < 1e-09: N_eff n/a" in text
