"""The channel axis of a layer's features (`channel_axes`): declared, inferred from the module that indexes
the channels, or refused; and every consumer (compare, stitch, probe) reading it, so a transformer's
(n, T, width) tokens are compared, stitched and probed over the width, not over the tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import ReusedReLU
from modelsense.errors import ConfigError
from modelsense.models.vit import ViT
from modelsense.representations import (
    LinearStitch,
    StitchConfig,
    StitchedModel,
    channel_axes,
    extract_features,
    stitch_models,
)
from modelsense.representations.compare import compare_representations
from modelsense.representations.probes import invariance_probe


class Mixed(nn.Module):
    """x (n, 3, 7): a channels-last branch (Linear on the transposed input), a Conv1d branch, a LayerNorm
    on the tokens, a module on the raw input (undecidable) and a pooled 2-D feature."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.ReLU()
        self.lin = nn.Linear(3, 5)
        self.act_lin = nn.ReLU()
        self.conv = nn.Conv1d(3, 4, 1)
        self.act_conv = nn.ReLU()
        self.norm = nn.LayerNorm(5)
        self.pooled = nn.ReLU()
        self.out = nn.Linear(4 + 5, 2)

    def forward(self, x):
        h = self.act_lin(self.lin(self.raw(x).transpose(1, 2)))  # (n, 7, 5)
        g = self.act_conv(self.conv(x))  # (n, 4, 7)
        t = self.norm(h)  # (n, 7, 5)
        return self.out(self.pooled(torch.cat([g.mean(2), t.mean(1)], 1)))  # (n, 9) -> (n, 2)


X = torch.randn(6, 3, 7, generator=torch.Generator().manual_seed(0))


def test_the_axis_is_the_one_the_last_channel_module_indexes():
    axes = channel_axes(Mixed(), X, ["act_lin", "lin", "act_conv", "conv", "norm", "pooled"])
    assert axes == {"act_lin": 2, "lin": 2, "act_conv": 1, "conv": 1, "norm": 2, "pooled": 1}
    model = Mixed()
    feats = extract_features(model, X, ["act_lin", "act_conv"], channels_first=True)
    assert feats["act_lin"].shape == (6, 5, 7) and feats["act_conv"].shape == (6, 4, 7)
    plain = extract_features(model, X, ["act_lin"])["act_lin"]
    torch.testing.assert_close(feats["act_lin"], plain.movedim(2, 1), rtol=0, atol=0)


def test_the_axes_of_a_dataloader_are_those_of_its_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, torch.zeros(6, dtype=torch.long)), batch_size=4)
    assert channel_axes(Mixed(), loader, ["act_lin", "act_conv"]) == {"act_lin": 2, "act_conv": 1}
    assert channel_axes(Mixed(), X.numpy(), ["act_lin", "act_conv"]) == {"act_lin": 2, "act_conv": 1}


def test_a_module_called_twice_has_an_axis_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin, self.act = nn.Conv1d(3, 3, 1), nn.Linear(7, 7), nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(self.act(self.conv(x)))).mean((1, 2))

    assert channel_axes(Twice(), X, ["act"]) == {"act#0": 1, "act#1": 2}


def test_an_undecidable_axis_is_refused_with_how_to_declare_it():
    with pytest.raises(ConfigError, match=r"layer 'raw' of Mixed.*channel_axis = 1.*channel_axis = -1"):
        channel_axes(Mixed(), X, ["raw"])
    with pytest.raises(ConfigError, match="layer 'raw'"):
        extract_features(Mixed(), X, ["raw"], channels_first=True)
    with pytest.raises(ConfigError, match="layer 'raw'"):
        compare_representations(Mixed(), Mixed(), X, "cka", ["raw"])
    with pytest.raises(ConfigError, match="layer 'raw'"):
        invariance_probe(Mixed(), ["raw"], X, metrics=["cka"], transforms=["grelu"])
    with pytest.raises(ConfigError, match="layer 'raw'"):
        stitch_models(Mixed(), Mixed(), "raw", X, torch.zeros(6, dtype=torch.long), StitchConfig(epochs=1))


def test_a_declared_axis_wins_the_nearest_declaration_first():
    model = Mixed()
    model.channel_axis = -1  # the model's declaration: every layer channels last
    assert channel_axes(model, X, ["raw", "act_conv", "pooled"]) == {"raw": 2, "act_conv": 2, "pooled": 1}
    model.act_conv.channel_axis = 1  # the module's own declaration is nearer
    model.lin.channel_axis = 1  # overrides what nn.Linear says (the layer and its parents only)
    assert channel_axes(model, X, ["act_conv", "lin", "act_lin"]) == {"act_conv": 1, "lin": 1, "act_lin": 2}
    for bad in (0, 3, -4, 1.0, True):
        model.raw.channel_axis = bad
        with pytest.raises(ConfigError, match=r"layer 'raw' of Mixed: channel_axis"):
            channel_axes(model, X, ["raw"])


# -- a transformer: the channels are the width ------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViT((1, 8, 8), 10, width=8, depth=2, patch=4, heads=2, dropout=0.0).eval()


IMAGES = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _hidden_units_permuted(model: ViT, perm: torch.Tensor) -> ViT:
    """The same function, block 0's MLP hidden units reordered: its `mlp.act` output permuted along the width."""
    out = copy.deepcopy(model)
    mlp = out.blocks[0].mlp
    with torch.no_grad():
        mlp.fc1.weight.copy_(mlp.fc1.weight[perm])
        mlp.fc1.bias.copy_(mlp.fc1.bias[perm])
        mlp.fc2.weight.copy_(mlp.fc2.weight[:, perm])
    return out


class _TokenPermutation(nn.Module):
    def __init__(self, patches: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.patches, self.perm = patches, perm

    def forward(self, x):
        return self.patches(x)[:, self.perm]


def _tokens_permuted(model: ViT, perm: torch.Tensor) -> ViT:
    """The same function with the tokens reordered (positions with them): every block's output permuted along T."""
    out = copy.deepcopy(model)
    out.patches = _TokenPermutation(out.patches, perm)
    with torch.no_grad():
        out.pos.weight.copy_(out.pos.weight[:, perm])
    return out


def test_vit_features_are_compared_over_the_width_not_the_tokens(vit):
    assert channel_axes(vit, IMAGES, ["patches", "blocks.0", "blocks.0.mlp.act", "pool"]) == {
        "patches": 2, "blocks.0": 2, "blocks.0.mlp.act": 2, "pool": 1}
    layer = ["blocks.0.mlp.act"]
    width = _hidden_units_permuted(vit, torch.randperm(16, generator=torch.Generator().manual_seed(2)))
    tokens = _tokens_permuted(vit, torch.tensor([3, 1, 0, 2]))
    torch.testing.assert_close(width(IMAGES), vit(IMAGES), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens(IMAGES), vit(IMAGES), rtol=1e-5, atol=1e-6)
    same = compare_representations(vit, width, IMAGES, "relu-procrustes", layer)["matrix"][0, 0]
    moved = compare_representations(vit, tokens, IMAGES, "relu-procrustes", layer)["matrix"][0, 0]
    assert same == pytest.approx(1.0, abs=1e-5)  # a permutation of the channels: in G_ReLU
    assert moved < 0.95  # the tokens are positions (rows paired example and position), not channels


def test_stitching_a_vit_block_is_a_width_map_at_every_token(vit):
    identity = LinearStitch(8, 8)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(8))
    for mode in ("auto", "hooks"):
        stitched = StitchedModel(vit, vit, identity, "blocks.0", mode=mode).eval()
        torch.testing.assert_close(stitched(IMAGES), vit(IMAGES), rtol=1e-6, atol=1e-6)
        assert stitched.axes == (2, 2)
    labels = vit(IMAGES).argmax(1)
    stitched, _ = stitch_models(vit, vit, "blocks.0", IMAGES, labels, StitchConfig(epochs=0, init="match"))
    assert stitched.stitch.weight.shape == (8, 8)
    torch.testing.assert_close(stitched.stitch.weight, torch.eye(8), rtol=0, atol=1e-5)  # least squares: I


def test_probing_a_vit_transforms_the_width(vit):
    res = invariance_probe(vit, ["blocks.0.mlp.act"], IMAGES, transforms=["grelu", "orthogonal"],
                           metrics=["relu-procrustes", "procrustes"])
    assert res.channels == {"blocks.0.mlp.act": 16}  # mlp_ratio 2 x width 8 (not the 4 tokens)
    sim = res.similarity
    assert sim[("blocks.0.mlp.act", "grelu", "pre")]["relu-procrustes"][0] == pytest.approx(1.0, abs=1e-5)
    assert sim[("blocks.0.mlp.act", "orthogonal", "pre")]["procrustes"][0] == pytest.approx(1.0, abs=1e-5)


def test_stitching_at_a_reused_module_is_refused_before_training():
    """A module called twice per forward pass has two outputs: which one to replace is undecidable."""
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ConfigError, match="'act' of model_a is called more than once per forward pass"):
        stitch_models(ReusedReLU(), ReusedReLU(), "act", x, y, StitchConfig(epochs=1))
    once = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ConfigError, match="'act' of model_b is called more than once"):
        stitch_models(once, ReusedReLU(), "1", x, y, StitchConfig(epochs=1), layer_b="act")
