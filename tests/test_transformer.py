"""The tiny vision transformer `vit`: structure, bad input, per-example gradients through attention,
LayerNorm, GELU and dropout (eval mode) against a loop, and curvature (K-FAC / EK-FAC / implicit)
on it against the dense GGN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import loop_per_example_grads
from modelsense.core.functional import FunctionalModel
from modelsense.curvature import build_curvature, dense_ggn, dense_matrix
from modelsense.errors import ConfigError
from modelsense.models import build_model
from modelsense.models.vit import Block, SelfAttention

DT = torch.float64


def tiny_vit(seed=0, dropout=0.1, patch=4, width=8, depth=1):
    """A float64 vit in eval mode on 8x8 images: 4 tokens of 16 pixels, width 8 (P = 870 for depth 1)."""
    from modelsense.models.vit import ViT

    torch.manual_seed(seed)
    net = ViT((1, 8, 8), 3, width=width, depth=depth, patch=patch, dropout=dropout).to(DT).eval()
    with torch.no_grad():  # away from the initialisation (tiny weights, unit LayerNorm): every term matters
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return FunctionalModel(net)


def _block(K, D, block):
    idx = block.flat_indices()
    return K[idx][:, idx], D[idx][:, idx]


# --- structure and options ------------------------------------------------------------------------------
def test_vit_structure_and_parameter_count():
    model = build_model("vit", (1, 8, 8), 10, seed=0)
    assert isinstance(model.out, nn.Linear) and model.out.out_features == 10
    assert [name for name, _ in model.named_children()] == [
        "patches",
        "embed",
        "pos",
        "drop",
        "blocks",
        "norm",
        "pool",
        "out",
    ]
    assert len(model.blocks) == 2 and all(isinstance(b, Block) for b in model.blocks)
    assert isinstance(model.blocks[0].attn, SelfAttention) and isinstance(model.blocks[0].mlp.act, nn.GELU)
    assert model.pos.weight.shape == (1, 16, 64)  # 2x2 patches of an 8x8 image
    d, T, C, h = 64, 16, 10, 128
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    assert sum(p.numel() for p in model.parameters()) == (4 * d + d) + T * d + 2 * block + 2 * d + (d * C + C)
    # patches: row-major over the patch grid, channel-major inside a patch
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = build_model("vit", (2, 4, 4), 3, width=8, depth=1).patches(x)
    assert p.shape == (1, 4, 8)
    assert p[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    # dropout is on in train mode only
    model = build_model("vit", (1, 8, 8), 3, width=8, depth=1, seed=0)
    x = torch.randn(4, 1, 8, 8)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), model(x))


def test_vit_bad_shapes_and_options():
    with pytest.raises(ConfigError, match=r"2x2 patches; the image sides must be multiples of 2, got 7x7"):
        build_model("vit", (1, 7, 7), 10)
    with pytest.raises(ConfigError, match="multiples of 4, got 8x6"):
        build_model("vit", (1, 8, 6), 10, patch=4)
    with pytest.raises(ConfigError, match="width must be a multiple of 4, got 10"):
        build_model("vit", (1, 8, 8), 10, width=10)
    with pytest.raises(ConfigError, match="patch must be an int >= 1"):
        build_model("vit", (1, 8, 8), 10, patch=0)
    with pytest.raises(ConfigError, match="depth must be an int >= 1"):
        build_model("vit", (1, 8, 8), 10, depth=0)
    with pytest.raises(ConfigError, match=r"'mlp' does not take option\(s\) patch"):
        build_model("mlp", (40,), 10, patch=2)
    with pytest.raises(ConfigError, match=r"'vit' needs image inputs of shape \(C, H, W\)"):
        build_model("vit", (40,), 10)


def test_vit_checkpoint_round_trip(tmp_path):
    from types import SimpleNamespace

    from modelsense.models import ModelConfig, build_model_from_config
    from modelsense.models.checkpoint import load_model, save_model

    cfg = ModelConfig("vit", width=8, depth=1, patch=4)
    assert cfg.options() == {"width": 8, "depth": 1, "patch": 4}
    model = build_model_from_config(cfg, (1, 8, 8), 3, seed=1)
    with torch.no_grad():
        model.pos.weight.add_(1.0)  # the trained state, not the initialisation, comes back
    save_model(
        tmp_path / "model.pt", model, cfg, SimpleNamespace(name="digits", input_shape=(1, 8, 8), num_classes=3), 1
    )
    back, info = load_model(tmp_path / "model.pt")
    x = torch.randn(2, 1, 8, 8)
    assert info["model"]["patch"] == 4 and torch.equal(back(x), model.eval()(x))


# --- per-example gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_vit_per_example_grads_match_a_loop_of_single_example_backward(dropout):
    fm = tiny_vit(dropout=dropout, patch=2, depth=2)  # 16 tokens, two blocks
    x = torch.randn(5, 1, 8, 8, dtype=DT)
    y = torch.tensor([0, 1, 2, 1, 0])
    vmapped = fm.per_example_grads(fm.params, x, y, chunk_size=2, flat=True)
    net = fm.module
    torch.testing.assert_close(vmapped, loop_per_example_grads(net, x, y), rtol=1e-10, atol=1e-12)
    J = fm.jacobians(fm.params, x[:2])
    for i in range(2):
        rows = []
        for c in range(3):
            net.zero_grad()
            net(x[i : i + 1])[0, c].backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        torch.testing.assert_close(J[i], torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_vit_in_train_mode_is_refused_with_a_clear_message():
    fm = tiny_vit(dropout=0.1)
    fm.module.train()
    x, y = torch.randn(3, 1, 8, 8, dtype=DT), torch.tensor([0, 1, 2])
    with pytest.raises(
        ConfigError, match=r"need the model in eval mode; modules \['drop \(dropout\)'.*call model.eval\(\)"
    ):
        fm.per_example_grads(fm.params, x, y)
    fm.module.eval()
    fm.per_example_grads(fm.params, x, y)  # no dropout mask drawn in eval mode


# --- curvature on the vit --------------------------------------------------------------------------------------
def test_vit_kfac_blocks_against_the_dense_ggn():
    """One image: the `out` layer (T = 1 after the mean pool) is exact; for the sequence layers
    KFAC is G ⊗ A and EK-FAC the exact block's diagonal in the KFAC eigenbasis; the positions and the
    LayerNorm affine parameters get exact dense blocks."""
    fm = tiny_vit()
    x, y = torch.randn(1, 1, 8, 8, dtype=DT), torch.tensor([2])
    D = dense_ggn(fm, x, y)
    kfac = build_curvature(fm, x, y, structure="kfac")
    ekfac = build_curvature(fm, x, y, structure="ekfac")
    assert [layer.name for layer in kfac.layers] == [
        "embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "out"]
    assert {b.name for b in kfac.fallbacks} == {
        "pos.weight",
        "blocks.0.ln1.weight",
        "blocks.0.ln1.bias",
        "blocks.0.ln2.weight",
        "blocks.0.ln2.bias",
        "norm.weight",
        "norm.bias",
    }
    assert all(b.dense for b in kfac.fallbacks)
    assert all(b.source is not None for b in kfac.fallbacks)  # rows from hooks (LayerNorm, Positions.per_example_rows)
    Kk, Ke = kfac.to_dense(), ekfac.to_dense()
    for l, layer in enumerate(kfac.layers):
        approx, exact = _block(Kk, D, layer)
        Q_a, _, Q_g, _ = ekfac.eigenbases[l]
        basis = torch.kron(Q_g.contiguous(), Q_a.contiguous())
        S = torch.diagonal(basis.T @ exact @ basis).reshape(layer.d_out, layer.d_in)
        assert torch.allclose(ekfac.eigenvalue_grids[l], S, atol=1e-10)
        A, G = kfac.factors[l]
        assert torch.allclose(approx, torch.kron(G, A), atol=1e-10)
        if layer.name == "out":
            assert torch.allclose(approx, exact, atol=1e-10)
            assert torch.allclose(_block(Ke, D, layer)[0], exact, atol=1e-10)
        else:
            assert torch.linalg.norm(approx - exact) > 1e-3 * torch.linalg.norm(exact)  # not exact on sequences
    for b in kfac.fallbacks:
        for K in (Kk, Ke):
            approx, exact = _block(K, D, b)
            assert torch.allclose(approx, exact, atol=1e-10)


@pytest.mark.parametrize("matrix", ["ggn", "ef", "hessian"])
def test_vit_implicit_products_and_diagonal_match_dense(matrix):
    """Forward- and reverse-mode products through the hand-written attention, LayerNorm and GELU."""
    fm = tiny_vit()
    x, y = torch.randn(6, 1, 8, 8, dtype=DT), torch.randint(0, 3, (6,))
    D = dense_matrix(fm, x, y, matrix)
    K = build_curvature(fm, x, y, matrix=matrix, chunk_size=4)
    V = torch.randn(fm.n_params, 3, dtype=DT)
    assert torch.allclose(K.mv(V), D @ V, atol=1e-9)
    assert torch.allclose(K.mv(V[:, 0]), D @ V[:, 0], atol=1e-9)
    if matrix != "hessian":
        assert torch.allclose(K.diag(), D.diagonal(), atol=1e-10)
