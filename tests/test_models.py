"""Tests for `modelsense.models`: shapes, seeds, FRN math, parameter counts, torch.func use, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from conftest import loop_per_example_grads
from modelsense.core.functional import FunctionalModel, flat_per_example_grads
from modelsense.errors import ConfigError
from modelsense.models import (
    ACTIVATIONS,
    FilterResponseNorm2d,
    ModelConfig,
    available_models,
    build_model,
    build_model_from_config,
    group_norm_groups,
    model_names,
    tf_same_padding,
)

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
VECTOR_SHAPES = [(40,)]
RECIPE_MODELS = ["vgg11", "vgg16", "resnet20", "resnet18_v1", "small_inception"]
CONV_MODELS = ["lenet", "cnn_deepobs", "resnet20_frn", "cnn", "resnet18"]
VECTOR_MODELS = ["linear", "mlp", "small_mlp", "large_mlp"]
IMAGE_MODELS = CONV_MODELS + ["vit"] + RECIPE_MODELS
# small widths keep the wide models fast
SMALL = {"cnn": {"width": 4}, "resnet18": {"width": 2}, "resnet20_frn": {"width": 4}, "vit": {"width": 8, "depth": 1},
         "vgg11": {"width": 2}, "vgg16": {"width": 2}, "resnet20": {"width": 4}, "resnet18_v1": {"width": 2},
         "small_inception": {"width": 8}}


def _compatible(name: str, shape: tuple[int, ...]) -> bool:
    if len(shape) == 1:
        return name in VECTOR_MODELS
    return not (name == "cnn_deepobs" and shape[1] < 9)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [
    (name, shape, c)
    for name in VECTOR_MODELS + IMAGE_MODELS
    for shape in IMAGE_SHAPES + VECTOR_SHAPES
    for c in (3, 10)
    if _compatible(name, shape)
]


def test_registry_lists_every_model():
    assert model_names() == VECTOR_MODELS + IMAGE_MODELS
    info = available_models()
    assert [m["name"] for m in info] == model_names()
    for m in info:
        assert set(m) == {"name", "description", "inputs", "accepts_vectors", "options"}
        assert m["accepts_vectors"] == (m["name"] in VECTOR_MODELS)


@pytest.mark.parametrize(
    "name,shape,num_classes", CASES, ids=[f"{n}-{'x'.join(map(str, s))}-C{c}" for n, s, c in CASES]
)
def test_output_shape(name, shape, num_classes):
    model = build_model(name, shape, num_classes, seed=0, **SMALL.get(name, {}))
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_vector_input_to_conv_model_raises(name):
    with pytest.raises(ConfigError, match=r"needs image inputs of shape \(C, H, W\).*\(40,\).*'mlp'"):
        build_model(name, (40,), 10)


def test_image_too_small_raises():
    with pytest.raises(ConfigError, match="at least 9x9.*got 8x8"):
        build_model("cnn_deepobs", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="at least 4x4"):
        build_model("lenet", (1, 3, 3), 10)
    with pytest.raises(ConfigError, match="at least 8x8 pixels, got 4x4"):
        build_model("cnn", (1, 4, 4), 10, depth=5)


def test_bad_options_raise():
    with pytest.raises(ConfigError, match="unknown model 'vgg'.*linear, mlp, small_mlp"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="at least one hidden layer.*'linear'"):
        build_model("mlp", (40,), 10, widths=())
    with pytest.raises(ConfigError, match="positive int"):
        build_model("mlp", (40,), 10, widths=(16, 0))
    with pytest.raises(ConfigError, match="positive int"):
        build_model("mlp", (40,), 10, widths=(16, -3))
    with pytest.raises(ConfigError, match="positive ints"):
        build_model("mlp", (40,), 10, widths=("a",))
    with pytest.raises(ConfigError, match="unknown activation 'swish'.*relu, tanh"):
        build_model("mlp", (40,), 10, activation="swish")
    with pytest.raises(ConfigError, match="unknown norm 'ln'.*gn, bn, frn, none"):
        build_model("cnn", (1, 8, 8), 10, norm="ln")
    with pytest.raises(ConfigError, match="'lenet' does not take option.*widths.*it takes activation"):
        build_model("lenet", (1, 28, 28), 10, widths=(3,))
    with pytest.raises(ConfigError, match="'linear' does not take option.*activation.*no options"):
        build_model("linear", (40,), 10, activation="relu")
    with pytest.raises(ConfigError, match="depth must be an int >= 0"):
        build_model("cnn", (1, 8, 8), 10, depth=-1)
    with pytest.raises(ConfigError, match="width must be an int >= 1"):
        build_model("resnet18", (1, 8, 8), 10, width=0)
    with pytest.raises(ConfigError, match="num_classes must be an int >= 1"):
        build_model("mlp", (40,), 0)
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("mlp", (40, 0), 10)
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("mlp", (), 10)


@pytest.mark.parametrize("name", VECTOR_MODELS + IMAGE_MODELS)
def test_seed_reproducible(name):
    shape = (1, 28, 28) if name in IMAGE_MODELS else (40,)
    kw = SMALL.get(name, {})
    a = build_model(name, shape, 3, seed=7, **kw).state_dict()
    b = build_model(name, shape, 3, seed=7, **kw).state_dict()
    c = build_model(name, shape, 3, seed=8, **kw).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_seed_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model("mlp", (40,), 3, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_model_config_matches_keywords():
    cfg = ModelConfig("cnn", width=4, depth=2, norm="frn")
    assert cfg.options() == {"width": 4, "depth": 2, "norm": "frn"}
    a = build_model_from_config(cfg, (1, 8, 8), 3, seed=1).state_dict()
    b = build_model("cnn", (1, 8, 8), 3, width=4, depth=2, norm="frn", seed=1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_config_survives_json_round_trip():
    cfg = ModelConfig("mlp", widths=(8, 4), activation="gelu")
    back = ModelConfig(**json.loads(json.dumps(asdict(cfg))))  # widths come back as a list
    a = build_model_from_config(cfg, (40,), 3, seed=2).state_dict()
    b = build_model_from_config(back, (40,), 3, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameter_counts():
    assert _n_params(build_model("large_mlp", (1, 28, 28), 10)) == 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10
    assert _n_params(build_model("small_mlp", (40,), 3)) == 40 * 32 + 32 + 32 * 16 + 16 + 16 * 3 + 3
    assert _n_params(build_model("linear", (3, 32, 32), 10)) == 3072 * 10 + 10
    # MPE LeNet5 on 28x28: conv1 1*6*25+6, conv2 6*16*25+16, conv3 16*120*25+120, fc 120*84+84, 84*10+10
    assert _n_params(build_model("lenet", (1, 28, 28), 10)) == 156 + 2416 + 48120 + 10164 + 850
    # DeepOBS cifar10_3c3d: 895,210 parameters
    assert _n_params(build_model("cnn_deepobs", (3, 32, 32), 10)) == 895_210
    # PreAct ResNet-18 (k=64) with BatchNorm: 11,171,146 (as kuangliu/pytorch-cifar); GN has the same count
    assert _n_params(build_model("resnet18", (3, 32, 32), 10, width=64, norm="bn")) == 11_171_146


def _resnet20_frn_count(c_in: int, w: int, num_classes: int) -> int:
    def conv(i, o, k):
        return i * o * k * k + o + 3 * o  # weight, bias, FRN gamma/beta/tau
    total = conv(c_in, w, 3)
    channels = w
    for s in range(3):
        out = w * 2**s
        for _b in range(3):
            total += conv(channels, out, 3) + conv(out, out, 3)
            if channels != out:
                total += conv(channels, out, 1)
            channels = out
    return total + channels * num_classes + num_classes


def test_resnet20_frn_structure():
    model = build_model("resnet20_frn", (3, 32, 32), 10)
    assert _n_params(model) == _resnet20_frn_count(3, 16, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19 + 2  # 19 convs + 2 projections
    # TF-'same' stride-2 padding on a 32x32 map: the extra row/column goes after
    first = model.stage2[0].conv1
    assert isinstance(first.pad, nn.ZeroPad2d) and tuple(first.pad.padding) == (0, 1, 0, 1)
    assert first.conv.padding == (0, 0) and first.conv.stride == (2, 2)
    assert model.stage3[0].out_hw == (8, 8)
    assert isinstance(model.stem.act, nn.Identity)  # stem has identity activation (MPE port)


def test_tf_same_padding_values():
    assert tf_same_padding(32, 3, 2) == (0, 1)
    assert tf_same_padding(7, 3, 2) == (1, 1)
    assert tf_same_padding(28, 3, 2) == (0, 1)
    assert tf_same_padding(32, 3, 1) == (1, 1)
    assert tf_same_padding(32, 1, 2) == (0, 0)
    assert tf_same_padding(5, 3, 2) == (1, 1)


def test_lenet_shapes_follow_mpe_on_28x28_and_adapt():
    m28 = build_model("lenet", (1, 28, 28), 10)
    feats = {}
    m28.act3.register_forward_hook(lambda mod, i, o: feats.__setitem__("act3", o))
    m28(torch.randn(2, 1, 28, 28))
    assert feats["act3"].shape == (2, 120, 1, 1)
    assert m28.conv2.padding == (0, 0) and m28.conv3.kernel_size == (5, 5) and m28.fc1.in_features == 120
    m8 = build_model("lenet", (1, 8, 8), 10)
    assert m8.conv2.padding == (2, 2) and m8.conv3.kernel_size == (2, 2) and m8.fc1.in_features == 120
    assert build_model("lenet", (3, 32, 32), 10).fc1.in_features == 480
    assert isinstance(m28.act1, nn.Tanh) and isinstance(m28.pool1, nn.AvgPool2d)


def test_deepobs_flatten_size():
    assert build_model("cnn_deepobs", (3, 32, 32), 10).dense1.in_features == 3 * 3 * 128
    assert build_model("cnn_deepobs", (1, 28, 28), 10).dense1.in_features == 3 * 3 * 128
    m = build_model("cnn_deepobs", (3, 32, 32), 10, seed=0)
    assert all(torch.all(mod.bias == 0) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("depth", range(9))
def test_cnn_depth_structure(depth):
    m = build_model("cnn", (3, 32, 32), 10, width=4, depth=depth)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    pools = [mod for mod in m.modules() if isinstance(mod, nn.MaxPool2d)]
    assert len(convs) == depth + 1
    assert len(pools) == min(depth, 3)
    assert m.out.in_features == 4 * 2 ** min(depth, 3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_norm_options():
    for norm, kind in [
        ("gn", nn.GroupNorm),
        ("bn", nn.BatchNorm2d),
        ("frn", FilterResponseNorm2d),
        ("none", nn.Identity),
    ]:
        m = build_model("cnn", (1, 8, 8), 3, width=4, norm=norm)
        assert isinstance(m.block1.norm, kind)
        r = build_model("resnet18", (1, 8, 8), 3, width=2, norm=norm)
        assert isinstance(r.layer1[0].norm1, kind)
    assert [group_norm_groups(c) for c in (1, 3, 7, 8, 16, 64, 128, 512)] == [1, 1, 1, 2, 4, 16, 32, 32]


def test_frn_matches_direct_formula():
    torch.manual_seed(0)
    frn = FilterResponseNorm2d(4).double()
    with torch.no_grad():
        frn.gamma.copy_(torch.randn(4))
        frn.beta.copy_(torch.randn(4))
        frn.tau.copy_(torch.randn(4))
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    expected = torch.empty_like(x)
    for n in range(3):
        for c in range(4):
            nu2 = (x[n, c] ** 2).sum() / 30
            y = frn.gamma[c] * x[n, c] / math.sqrt(nu2 + 1e-6) + frn.beta[c]
            expected[n, c] = torch.clamp(y, min=frn.tau[c].item())
    out = frn(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(frn(x[1]), out[1])  # one unbatched example (as under vmap)
    assert all(p.dim() == 1 for p in frn.parameters())


@pytest.mark.parametrize("name", VECTOR_MODELS + CONV_MODELS + RECIPE_MODELS)
def test_modules_are_standard(name):
    """Every >=2-dim parameter belongs to nn.Linear/nn.Conv2d; the classifier is `out`."""
    shape = (40,) if name in VECTOR_MODELS else (1, 28, 28)
    model = build_model(name, shape, 3, **SMALL.get(name, {}))
    allowed = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d, FilterResponseNorm2d)
    for mod in model.modules():
        own = list(mod.parameters(recurse=False))
        if own:
            assert isinstance(mod, allowed), type(mod)
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                assert all(p.dim() == 1 for p in own)
    assert isinstance(model.out, nn.Linear) and model.out.out_features == 3


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_mlp_activation_modules_are_hookable(activation):
    model = build_model("mlp", (40,), 3, widths=(7, 5), activation=activation)
    assert isinstance(model.act1, ACTIVATIONS[activation]) and isinstance(model.act2, ACTIVATIONS[activation])
    seen = []
    model.act2.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    model(torch.randn(4, 40))
    assert seen == [torch.Size([4, 5])]


PER_EXAMPLE = [
    ("mlp", (40,), {"widths": (6,)}),
    ("lenet", (1, 8, 8), {}),
    ("cnn", (1, 8, 8), {"width": 4, "norm": "gn"}),
    ("cnn", (1, 8, 8), {"width": 4, "norm": "frn"}),
    ("resnet18", (1, 8, 8), {"width": 2}),
    ("resnet20_frn", (1, 8, 8), {"width": 2}),
]


@pytest.mark.parametrize("name,shape,kw", PER_EXAMPLE, ids=[f"{n}-{kw.get('norm', '')}" for n, _, kw in PER_EXAMPLE])
def test_per_example_grads_match_loop(name, shape, kw):
    model = build_model(name, shape, 3, seed=0, **kw).double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    fm = FunctionalModel(model)
    vmapped = fm.per_example_grads(fm.params, x, y, flat=True)
    torch.testing.assert_close(vmapped, loop_per_example_grads(model, x, y), rtol=1e-9, atol=1e-10)


def test_flat_per_example_grads_chunks_buffer_and_aux():
    """Chunks of 3 over 7 examples; flat rows = the dict entries in ParamSpec order; out= is filled
    in place; has_aux stacks the aux values; a wrong out shape says what was expected."""
    model = build_model("mlp", (5,), 3, widths=(4,), seed=0).double()
    fm = FunctionalModel(model)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2, 2])
    flat = fm.per_example_grads(fm.params, x, y, chunk_size=3, flat=True)
    per_dict = fm.per_example_grads(fm.params, x, y, chunk_size=3)
    torch.testing.assert_close(flat, fm.spec.flatten(per_dict, batch_dims=1), rtol=0, atol=0)
    buf = torch.full((7, fm.n_params), float("nan"), dtype=torch.float64)
    assert fm.per_example_grads(fm.params, x, y, chunk_size=2, flat=True, out=buf) is buf
    torch.testing.assert_close(buf, flat, rtol=1e-12, atol=1e-14)  # other chunks: other rounding

    def loss_and_label(p, xi, yi):
        return fm.per_example_loss(p, xi.unsqueeze(0), yi.unsqueeze(0))[0], yi * 10

    grads, aux = flat_per_example_grads(fm, loss_and_label, fm.params, x, y, chunk_size=3, has_aux=True)
    torch.testing.assert_close(grads, flat, rtol=0, atol=0)
    assert aux.tolist() == (y * 10).tolist()
    with pytest.raises(
        ConfigError, match=rf"out must have shape \(n, P\) = \(7, {fm.n_params}\), received \(6, {fm.n_params}\)"
    ):
        fm.per_example_grads(fm.params, x, y, flat=True, out=buf[:6])
    with pytest.raises(ConfigError, match="pass flat=True"):
        fm.per_example_grads(fm.params, x, y, out=buf)


def test_vmapped_ensemble_matches_members():
    """Stacked parameters of 3 differently seeded models under vmap(functional_call) = each model."""
    members = [build_model("cnn", (1, 8, 8), 3, width=4, seed=s) for s in range(3)]
    params, buffers = stack_module_state(members)
    x = torch.randn(5, 1, 8, 8)

    def run(p, b):
        return functional_call(members[0], {**p, **b}, (x,))

    out = vmap(run)(params, buffers)
    expected = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_option_works_under_vmap_in_eval_mode():
    model = build_model("cnn", (1, 8, 8), 3, width=4, norm="bn", seed=0).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(4, 1, 8, 8)
    per_example = vmap(lambda xi: functional_call(model, {**params, **buffers}, (xi.unsqueeze(0),))[0])(x)
    torch.testing.assert_close(per_example, model(x), rtol=1e-5, atol=1e-6)


def test_batchnorm_per_example_grads_in_eval_mode_match_loop_and_train_mode_is_refused():
    model = build_model("cnn", (1, 8, 8), 3, width=4, norm="bn", seed=0).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    model.train()
    model(torch.randn(16, 1, 8, 8, dtype=torch.float64))  # non-trivial running statistics
    fm = FunctionalModel(model)
    with pytest.raises(ConfigError, match=r"eval mode; modules \['stem.norm \(batch norm\)'"):
        fm.per_example_grads(fm.params, x, y, flat=True)
    model.eval()
    fm = FunctionalModel(model)
    vmapped = fm.per_example_grads(fm.params, x, y, flat=True)
    torch.testing.assert_close(vmapped, loop_per_example_grads(model, x, y), rtol=1e-9, atol=1e-10)


# -- the architectures of the originals' recipes (VGG, ResNet-20 option A, ResNet-18 v1, small Inception)
def _conv(i: int, o: int, k: int, bias: bool = False) -> int:
    return i * o * k * k + (o if bias else 0)


def _vgg_count(cfg: tuple[int, ...], c_in: int, k: int, num_classes: int) -> int:
    """conv (bias) + norm (scale, shift) per conv layer, linear head."""
    total, channels = 0, c_in
    for mult in cfg:
        if mult:
            total += _conv(channels, k * mult, 3, bias=True) + 2 * k * mult
            channels = k * mult
    return total + channels * num_classes + num_classes


def _resnet_count(c_in: int, k: int, blocks: tuple[int, ...], num_classes: int, projection: bool) -> int:
    """no conv bias; a norm (2 per channel) after each conv; option-A shortcuts have no parameters."""
    total, channels = _conv(c_in, k, 3) + 2 * k, k
    for s, n in enumerate(blocks):
        out = k * 2**s
        for _b in range(n):
            total += _conv(channels, out, 3) + _conv(out, out, 3) + 4 * out
            if projection and channels != out:
                total += _conv(channels, out, 1) + 2 * out
            channels = out
    return total + channels * num_classes + num_classes


def _inception_count(c_in: int, num_classes: int) -> int:
    def unit(i, o, k):
        return _conv(i, o, k) + 2 * o
    total, channels = unit(c_in, 96, 3), 96
    for blocks, down in ((((32, 32), (32, 48)), 160), (((112, 48), (96, 64), (80, 80), (48, 96)), 240),
                         (((176, 160), (176, 160)), 0)):
        for a, b in blocks:
            total += unit(channels, a, 1) + unit(channels, b, 3)
            channels = a + b
        if down:
            total, channels = total + unit(channels, down, 3), down
    return total + channels * num_classes + num_classes


def test_recipe_models_parameter_counts_at_full_width():
    """The counts the papers and the usual CIFAR ports give, and the formula per layer."""
    from modelsense.models.vgg import CONFIGS

    counts = {"vgg11": 9_231_114, "vgg16": 14_728_266, "resnet20": 269_722, "resnet18_v1": 11_173_962,
              "small_inception": 1_895_786}
    for name, expected in counts.items():
        for norm in ("gn", "bn"):
            assert _n_params(build_model(name, (3, 32, 32), 10, norm=norm)) == expected, (name, norm)
    assert _vgg_count(CONFIGS["vgg11"], 3, 64, 10) == counts["vgg11"]
    assert _vgg_count(CONFIGS["vgg16"], 3, 64, 10) == counts["vgg16"]
    assert _resnet_count(3, 16, (3, 3, 3), 10, projection=False) == counts["resnet20"]  # He et al.: 0.27M
    assert _resnet_count(3, 64, (2, 2, 2, 2), 10, projection=True) == counts["resnet18_v1"]
    assert _inception_count(3, 10) == counts["small_inception"]
    # other widths and inputs follow the same formulas
    assert _n_params(build_model("vgg16", (1, 8, 8), 3, width=2)) == _vgg_count(CONFIGS["vgg16"], 1, 2, 3)
    assert _n_params(build_model("resnet20", (1, 8, 8), 3, width=4)) == _resnet_count(1, 4, (3, 3, 3), 3, False)
    assert _n_params(build_model("resnet18_v1", (1, 8, 8), 3, width=2)) == _resnet_count(1, 2, (2, 2, 2, 2), 3, True)


@pytest.mark.parametrize("name", RECIPE_MODELS)
def test_recipe_models_forward_backward_and_norm_option(name):
    """Tiny input (2 examples, 1x8x8 and 3x32x32): logits of shape (n, C), finite gradients for every
    parameter; norm="bn" puts BatchNorm where GroupNorm is by default (and nothing else changes)."""
    for shape in ((1, 8, 8), (3, 32, 32)):
        model = build_model(name, shape, 3, seed=0, **SMALL[name])
        out = model(torch.randn(2, *shape))
        assert out.shape == (2, 3)
        nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    gn = build_model(name, (3, 32, 32), 3, seed=0, **SMALL[name])
    bn = build_model(name, (3, 32, 32), 3, seed=0, norm="bn", **SMALL[name])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    def kinds(m, k):
        return [n for n, mod in m.named_modules() if isinstance(mod, k)]
    assert kinds(gn, nn.GroupNorm) == kinds(bn, nn.BatchNorm2d) and kinds(gn, nn.GroupNorm)
    assert [k for k, _ in gn.named_parameters()] == [k for k, _ in bn.named_parameters()]


def test_resnet20_option_a_shortcut_is_zero_padding():
    model = build_model("resnet20", (3, 32, 32), 10, width=4, seed=0)
    block = model.stage2[0]
    assert not list(block.shortcut.parameters())
    x = torch.randn(2, 4, 32, 32)
    expected = torch.zeros(2, 8, 16, 16)
    expected[:, 2:6] = x[:, :, ::2, ::2]  # 4 new channels: 2 zero channels before, 2 after
    torch.testing.assert_close(block.shortcut(x), expected, rtol=0, atol=0)
    assert isinstance(model.stage1[0].shortcut, nn.Identity)
    h = {}
    model.stage3[2].register_forward_hook(lambda mod, i, o: h.__setitem__("s3", o.shape))
    model(torch.randn(2, 3, 32, 32))
    assert h["s3"] == (2, 16, 8, 8)
    # the two ReLUs of a block are modules (representation hooks, stitching), kaiming-normal init
    assert isinstance(block.act1, nn.ReLU) and isinstance(block.act2, nn.ReLU)


def test_resnet18_v1_and_inception_structure():
    r = build_model("resnet18_v1", (3, 32, 32), 10, width=2)
    assert isinstance(r.stage2[0].shortcut[0], nn.Conv2d) and r.stage2[0].conv1.stride == (2, 2)
    assert isinstance(r.stage1[0].shortcut, nn.Identity) and r.out.in_features == 16
    assert not hasattr(r, "maxpool")
    inc = build_model("small_inception", (3, 32, 32), 10)
    assert inc.out.in_features == 336 and inc.stage2.block4.conv3x3.conv.out_channels == 96
    assert inc.stage1.downsample.conv.stride == (2, 2) and isinstance(inc.pool, nn.AdaptiveMaxPool2d)
    v = build_model("vgg11", (3, 32, 32), 10)
    assert sum(isinstance(m, nn.Conv2d) for m in v.modules()) == 8
    assert sum(isinstance(m, nn.Conv2d) for m in build_model("vgg16", (3, 32, 32), 10, width=2).modules()) == 13


@pytest.mark.parametrize("name", RECIPE_MODELS)
def test_recipe_models_train_in_the_engine_without_bn_and_are_refused_with_bn(name):
    from modelsense.training import TrainConfig, train_ensemble

    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = TrainConfig(lr=0.01, epochs=1, bs=3)
    res = train_ensemble(lambda s: build_model(name, (1, 8, 8), 3, seed=s, **SMALL[name]), x, y,
                         torch.ones(2, 6, dtype=torch.bool), cfg, progress=False)
    assert res.outputs["train"]["loss"].shape == (2, 6) and torch.isfinite(res.outputs["train"]["loss"]).all()
    with pytest.raises(ConfigError, match="cannot train models with batch norm"):
        train_ensemble(lambda s: build_model(name, (1, 8, 8), 3, seed=s, norm="bn", **SMALL[name]), x, y,
                       torch.ones(2, 6, dtype=torch.bool), cfg, progress=False)
