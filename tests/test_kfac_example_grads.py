"""The fast paths behind `if-kfac` / `if-ekfac` at scale, each against the exact path it replaces:
per-example gradients through layer hooks (`KroneckerCurvature.example_gradients`) against vmapped
`per_example_grads` on linear, conv, GroupNorm, sequence, attention and ViT models; the gradients in
the eigenbasis and the scores they give against (K + λI)⁻¹ applied in parameter space; the strided
unfold against `F.unfold`; the Monte-Carlo Fisher (`mc_samples`) against the exact GGN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsense.attribution import ComputeOptions, make_attributor
from modelsense.core.functional import FunctionalModel
from modelsense.curvature import KroneckerCurvature, build_curvature
from modelsense.curvature.kfac_layers import unfold2d
from modelsense.errors import ConfigError
from test_curvature import EKFAC_PROBLEMS, mlp_problem
from test_transformer import tiny_vit

DT = torch.float64


def groupnorm_cnn(n=6, seed=0):
    """Conv (bias) -> GroupNorm -> ReLU -> strided conv (no bias) -> GroupNorm -> pool -> Linear: the
    layers of the scale benchmark's ResNet in miniature (two calls of nothing, hooked norm rows)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.GroupNorm(3, 6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).to(DT).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return FunctionalModel(net), torch.randn(n, 2, 7, 7, dtype=DT), torch.randint(0, 3, (n,))


def vit_problem(n=5):
    fm = tiny_vit(dropout=0.0)
    torch.manual_seed(1)
    return fm, torch.randn(n, 1, 8, 8, dtype=DT), torch.randint(0, 3, (n,))


PROBLEMS = {**EKFAC_PROBLEMS, "groupnorm_cnn": groupnorm_cnn, "vit": vit_problem}


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_hooked_example_gradients_equal_the_vmapped_ones_and_give_the_same_scores(problem, structure):
    fm, x, y = PROBLEMS[problem]()
    K = build_curvature(fm, x, y, structure=structure, chunk_size=4)
    G = fm.per_example_grads(fm.params, x, y, flat=True)
    assert torch.allclose(K.example_gradients(x, y, eigenbasis=False, chunk_size=3), G, atol=1e-12)
    R = K.example_gradients(x, y, chunk_size=3)
    assert torch.allclose(R, K.to_eigenbasis(G), atol=1e-12)
    # the eigenbasis is orthogonal block by block: inner products are kept
    assert torch.allclose(R @ R.T, G @ G.T, atol=1e-10)
    damping = 0.1
    exact = G @ K.inverse_mv(G.T.contiguous(), damping)
    fast = (R / (K.flat_eigenvalues() + damping)) @ R.T
    assert torch.allclose(fast, exact, atol=1e-10 * float(exact.abs().max()))


def test_to_eigenbasis_is_the_kronecker_rotation_of_each_block():
    fm, x, y = EKFAC_PROBLEMS["cnn"]()
    K = build_curvature(fm, x, y, structure="ekfac")
    V = torch.randn(3, fm.n_params, dtype=DT)
    R = K.to_eigenbasis(V)
    for k, b in enumerate(K.blocks):
        Q_a, _, Q_g, _ = K.eigenbases[k]
        basis = torch.kron(Q_g.contiguous(), torch.eye(b.d_in, dtype=DT) if Q_a is None else Q_a.contiguous())
        idx = b.flat_indices()
        assert torch.allclose(R[:, idx], V[:, idx] @ basis, atol=1e-12)
    # and K = Q diag(flat eigenvalues) Qᵀ in those coordinates
    assert torch.allclose(K.to_eigenbasis(K.mv(V.T).T), R * K.flat_eigenvalues(), atol=1e-9)


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_attributor_scores_and_self_scores_match_the_inverse_in_parameter_space(method):
    fm, x, y = groupnorm_cnn(n=10)
    xt, yt = torch.randn(4, 2, 7, 7, dtype=DT), torch.randint(0, 3, (4,))
    att = make_attributor(method, compute=ComputeOptions(progress=False, block_size=3)).fit(fm, x, y)
    G, Gt = (fm.per_example_grads(fm.params, a, b, flat=True) for a, b in ((x, y), (xt, yt)))
    exact = G @ att.curvature_.inverse_mv(Gt.T.contiguous(), att.damping_)
    assert torch.allclose(att.scores(xt, yt), exact, atol=1e-10 * float(exact.abs().max()))
    self_exact = (G * att.curvature_.inverse_mv(G.T.contiguous(), att.damping_).T).sum(1)
    assert torch.allclose(att.self_scores(), self_exact, rtol=1e-10)
    # per module: the parts (coordinates of a block stay at its parameters' positions) sum to the total
    parts = att.self_scores(by_module=True)
    assert torch.allclose(sum(parts.values()), self_exact, rtol=1e-10)
    # the low-precision path (vmapped gradients, rotated) agrees with the hooked one within its rounding
    low = make_attributor(method, compute=ComputeOptions(progress=False, precision="float16")).fit(fm, x, y)
    assert torch.allclose(low.self_scores(), self_exact, rtol=5e-2)


@pytest.mark.parametrize("case", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1), (2, 2)), ((1, 1), (1, 1), (0, 0), (2, 2)),
    ((3, 2), (2, 1), (2, 0), (1, 3)), ((2, 3), (1, 2), (0, 1), (2, 1)),
])
def test_unfold2d_equals_torch_unfold(case):
    kernel, dilation, padding, stride = case
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    assert torch.equal(unfold2d(x, kernel, dilation, padding, stride),
                       F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride))


# --- the Monte-Carlo Fisher -------------------------------------------------------------------------
def test_mc_samples_zero_is_the_exact_ggn_and_many_samples_converge_to_it():
    fm, x, y = mlp_problem(n=6)
    exact = build_curvature(fm, x, y, structure="ekfac")
    assert torch.equal(build_curvature(fm, x, y, structure="ekfac", mc_samples=0).eigenvalue_grids[0],
                       exact.eigenvalue_grids[0])
    mc = build_curvature(fm, x, y, structure="kfac", mc_samples=4000, seed=3)
    kfac = build_curvature(fm, x, y, structure="kfac")
    for (A_mc, G_mc), (A, G) in zip(mc.factors[: len(mc.layers)], kfac.factors[: len(kfac.layers)]):
        assert torch.allclose(A_mc, A, atol=1e-12)  # the inputs do not depend on the directions
        assert torch.linalg.norm(G_mc - G) < 0.05 * torch.linalg.norm(G)  # an unbiased estimate, 4000 draws
    one = build_curvature(fm, x, y, structure="kfac", mc_samples=1, seed=3)
    assert torch.linalg.norm(one.factors[0][1] - kfac.factors[0][1]) > 1e-3 * torch.linalg.norm(kfac.factors[0][1])


def test_mc_samples_are_seeded_saved_and_checked():
    fm, x, y = mlp_problem(n=6)
    a = build_curvature(fm, x, y, structure="ekfac", mc_samples=2, seed=5)
    b = build_curvature(fm, x, y, structure="ekfac", mc_samples=2, seed=5)
    c = build_curvature(fm, x, y, structure="ekfac", mc_samples=2, seed=6)
    assert torch.equal(a.eigenvalue_grids[0], b.eigenvalue_grids[0])
    assert not torch.equal(a.eigenvalue_grids[0], c.eigenvalue_grids[0])
    back = KroneckerCurvature.from_fitted_state(a.fitted_state(), fm, x, y)
    assert (back.mc_samples, back.seed) == (2, 5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="mc_samples must be an integer"):
            build_curvature(fm, x, y, structure="ekfac", mc_samples=bad)
    with pytest.raises(ConfigError, match="matrix 'ef' takes mc_samples=0"):
        build_curvature(fm, x, y, structure="ekfac", matrix="ef", mc_samples=1)
    with pytest.raises(ConfigError, match="matrix 'ef' takes mc_samples=0"):
        make_attributor("if-ekfac", {"matrix": "ef", "mc_samples": 1})
    att = make_attributor("if-ekfac", {"mc_samples": 1}, compute=ComputeOptions(progress=False)).fit(fm, x, y)
    assert att.curvature_.mc_samples == 1


@pytest.mark.parametrize("model", ["resnet18", "vit"])
def test_scale_benchmark_runs_small(model, tmp_path):
    """bench/scale.py end to end on a few examples (both models): shapes, finite scores, the timing record."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from scale import main
    finally:
        sys.path.pop(0)
    width = "4" if model == "resnet18" else "8"
    result = main(["--model", model, "--n-train", "6", "--n-test", "3", "--width", width, "--patch", "8",
                   "--scratch", str(tmp_path), "--no-keep-freed-memory"])
    assert result["scores_shape"] == [6, 3] and result["finite"] and result["mc_samples"] == 1
    assert set(result["ms_per_train_example"]) == {"fit", "scores", "self"}
