"""Models by name: `build_model("lenet", input_shape, num_classes, ...)`.

| name           | what                                                            | inputs              |
|----------------|-----------------------------------------------------------------|---------------------|
| `linear`       | multinomial logistic regression (Flatten + Linear)              | any                 |
| `mlp`          | Flatten + hidden layers `widths` (128, 128) with `activation`   | any                 |
| `small_mlp`    | MLP 32-16, tanh (MPE)                                           | any                 |
| `large_mlp`    | MLP 500-300, tanh (MPE)                                         | any                 |
| `lenet`        | LeNet-5, tanh + avg-pool (MPE)                                  | images >= 4x4       |
| `cnn_deepobs`  | DeepOBS 3c3d (MPE `cnn_deepobs`)                                | images >= 9x9       |
| `resnet20_frn` | ResNet-20 with Filter Response Norm (MPE/BNN-HMC), width 16     | images              |
| `cnn`          | depth/width-scalable 5-layer CNN (eff-dim ConvNetDepth, mCNN)   | images >= 2^min(depth,3) |
| `resnet18`     | PreAct ResNet-18 of width k (Nakkiran; eff-dim)                 | images              |
| `vit`          | tiny vision transformer: p x p patches, `depth` blocks of width | images, sides % p = 0 |
|                | `width` (64, 2 blocks, p = `patch` = 2), mean pool              |                     |
| `vgg11`        | VGG-11 (config A) of width k = 64, CIFAR head                    | images              |
| `vgg16`        | VGG-16 (config D) of width k = 64, CIFAR head                    | images              |
| `resnet20`     | ResNet-20 with option-A (zero-padding) shortcuts, width 16      | images              |
| `resnet18_v1`  | standard (post-activation) CIFAR ResNet-18, width 64            | images              |
| `small_inception` | the small Inception of Zhang et al. 2017 (Feldman & Zhang), width 96 | images     |

Shapes adapt to the data: `input_shape` is one example's shape, (C, H, W) for images, (d,) for
vectors; the output layer has `num_classes` units. Every model's last layer is an `nn.Linear`
named `out`; layers are standard modules (`nn.Linear`, `nn.Conv2d`, activation modules such as
`nn.ReLU`), so forward hooks (representations, KFAC) work, and normalisation/FRN parameters are
1-d (left out of "weights only" = tensors with >= 2 dims), except the positions `pos.weight`
(1, T, width) of `vit`. `cnn`, `resnet18`, `vgg11`, `vgg16`, `resnet20`, `resnet18_v1` and
`small_inception` default to GroupNorm instead of the papers' BatchNorm
(per-example normalisation keeps per-example gradients and vmapped ensembles exact); `norm="bn"` restores the original.

Example:
    >>> model = build_model("mlp", (1, 8, 8), 10, widths=(32,), seed=0)
    >>> model(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from modelsense.errors import ConfigError, shown
from modelsense.models._shapes import check_input_shape, require_image, tf_same_padding
from modelsense.models.convnet import ConvNet
from modelsense.models.deepobs import DeepOBS3c3d
from modelsense.models.inception import SmallInception
from modelsense.models.layers import (
    ACTIVATIONS,
    NORMS,
    FilterResponseNorm2d,
    check_activation,
    check_norm,
    group_norm_groups,
)
from modelsense.models.lenet import LeNet5
from modelsense.models.mlp import MLP, check_widths
from modelsense.models.preact_resnet import PreActResNet18
from modelsense.models.resnet import ResNet, resnet18_v1, resnet20
from modelsense.models.resnet20_frn import ResNet20FRN
from modelsense.models.vgg import VGG
from modelsense.models.vit import ViT
from modelsense.options import ints, joined, option
from modelsense.user import call, is_reference, load_callable

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "ConvNet",
    "DeepOBS3c3d",
    "FilterResponseNorm2d",
    "LeNet5",
    "MLP",
    "ModelConfig",
    "PreActResNet18",
    "ResNet",
    "ResNet20FRN",
    "SmallInception",
    "VGG",
    "ViT",
    "available_models",
    "build_model",
    "build_model_from_config",
    "group_norm_groups",
    "model_names",
    "tf_same_padding",
]


@dataclass
class ModelConfig:
    """Which model to build and its options; None means the model's default.

    Options that a model does not take must stay None (see `available_models()[i]["options"]`).
    """

    name: str = option("mlp", "architecture: a name of `modelsense models`", flag="--model", short="-m")
    widths: tuple[int, ...] | None = option(None, "hidden widths of mlp, e.g. 128,128", parse=ints, show=joined)
    activation: str | None = option(None, "mlp activation: relu, tanh, gelu, ...")
    width: int | None = option(None, "width k of cnn / resnet18 / vit / vgg11 / vgg16 / resnet20 / resnet18_v1 / "
                                     "small_inception (its stem's channels)")
    depth: int | None = option(None, "depth of cnn; transformer blocks of vit")
    norm: str | None = option(None, "normalisation of the convolutional networks with a width: gn, bn (fit "
                                    "only), frn, none")
    patch: int | None = option(None, "vit: side p of its p x p image patches (image sides must be multiples of p)")

    def __post_init__(self) -> None:
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)

    def options(self) -> dict[str, Any]:
        """The options that are set (not None), as keyword arguments for `build_model`."""
        opts = {"widths": self.widths, "activation": self.activation, "width": self.width,
                "depth": self.depth, "norm": self.norm, "patch": self.patch}
        return {k: v for k, v in opts.items() if v is not None}


@dataclass(frozen=True)
class _ModelSpec:
    name: str
    description: str
    inputs: str
    image_only: bool
    defaults: dict[str, Any]
    build: Callable[..., nn.Module]


def _positive_int(value: Any, what: str, model: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{model}: {what} must be an int >= {minimum}, got {shown(value)}")
    return int(value)


def _build_mlp(name: str, shape: tuple[int, ...], c: int, widths: Sequence[int], activation: str) -> nn.Module:
    return MLP(shape, c, check_widths(widths, name), check_activation(activation))


def _width_norm_spec(key: str, description: str, default_width: int, network: Callable[..., nn.Module]) -> _ModelSpec:
    """An image model whose options are its width k (default `default_width`) and its normalisation
    (default GroupNorm), built as `network(shape, num_classes, width=k, norm=norm)` after checking both."""
    return _ModelSpec(
        key,
        description,
        "images (C, H, W)",
        True,
        {"width": default_width, "norm": "gn"},
        lambda name, shape, c, width, norm: network(
            shape, c, width=_positive_int(width, "width", name), norm=check_norm(norm)
        ),
    )


_SPECS: dict[str, _ModelSpec] = {
    s.name: s
    for s in (
        _ModelSpec(
            "linear",
            "multinomial logistic regression: Flatten + Linear(d -> C)",
            "any shape (flattened)",
            False,
            {},
            lambda name, shape, c: MLP(shape, c, widths=()),
        ),
        _ModelSpec(
            "mlp",
            "Flatten + Linear/activation per hidden width + Linear -> C",
            "any shape (flattened)",
            False,
            {"widths": (128, 128), "activation": "relu"},
            _build_mlp,
        ),
        _ModelSpec(
            "small_mlp",
            "MLP d-32-16-C with tanh (MPE small_mlp)",
            "any shape (flattened)",
            False,
            {"activation": "tanh"},
            lambda name, shape, c, activation: _build_mlp(name, shape, c, (32, 16), activation),
        ),
        _ModelSpec(
            "large_mlp",
            "MLP d-500-300-C with tanh (MPE large_mlp)",
            "any shape (flattened)",
            False,
            {"activation": "tanh"},
            lambda name, shape, c, activation: _build_mlp(name, shape, c, (500, 300), activation),
        ),
        _ModelSpec(
            "lenet",
            "LeNet-5 with tanh and average pooling (MPE); exact for 28x28, adapted to other sizes",
            "images (C, H, W), H, W >= 4",
            True,
            {"activation": "tanh"},
            lambda name, shape, c, activation: LeNet5(shape, c, check_activation(activation)),
        ),
        _ModelSpec(
            "cnn_deepobs",
            "DeepOBS 3c3d: 3 conv + 3 dense layers, ReLU, TF-same max pooling (MPE cnn_deepobs)",
            "images (C, H, W), H, W >= 9",
            True,
            {},
            lambda name, shape, c: DeepOBS3c3d(shape, c),
        ),
        _ModelSpec(
            "resnet20_frn",
            "ResNet-20 with Filter Response Normalisation + TLU, width 16 (MPE/BNN-HMC)",
            "images (C, H, W)",
            True,
            {"width": 16},
            lambda name, shape, c, width: ResNet20FRN(shape, c, _positive_int(width, "width", name)),
        ),
        _ModelSpec(
            "cnn",
            "depth/width-scalable 5-layer CNN (eff-dim ConvNetDepth / mCNN), GroupNorm by default",
            "images (C, H, W), H, W >= 2^min(depth, 3)",
            True,
            {"width": 16, "depth": 3, "norm": "gn"},
            lambda name, shape, c, width, depth, norm: ConvNet(
                shape, c, _positive_int(width, "width", name), _positive_int(depth, "depth", name, 0), check_norm(norm)
            ),
        ),
        _width_norm_spec(
            "resnet18",
            "PreAct ResNet-18 of width k (Nakkiran double descent), GroupNorm by default",
            16,
            PreActResNet18,
        ),
        _ModelSpec(
            "vit",
            "tiny vision transformer: patch x patch patches, depth pre-norm blocks (4-head self-attention, "
            "GELU MLP, LayerNorm, dropout 0.1), mean pool",
            "images (C, H, W), H and W multiples of patch",
            True,
            {"width": 64, "depth": 2, "patch": 2},
            lambda name, shape, c, width, depth, patch: ViT(
                shape,
                c,
                _positive_int(width, "width", name),
                _positive_int(depth, "depth", name),
                _positive_int(patch, "patch", name),
            ),
        ),
        *(
            _width_norm_spec(
                key,
                f"{label} (Simonyan & Zisserman) of width k (k = 64: the standard network), CIFAR head, "
                "GroupNorm by default",
                64,
                partial(VGG, config=key),
            )
            for key, label in (("vgg11", "VGG-11"), ("vgg16", "VGG-16"))
        ),
        _width_norm_spec(
            "resnet20",
            "ResNet-20 (He et al.) with option-A zero-padding shortcuts, width 16, GroupNorm by default",
            16,
            resnet20,
        ),
        _width_norm_spec(
            "resnet18_v1",
            "standard (post-activation) CIFAR ResNet-18 of width k (He et al.; GEX), 1x1-conv "
            "shortcuts, GroupNorm by default",
            64,
            resnet18_v1,
        ),
        _width_norm_spec(
            "small_inception",
            "the small Inception of Zhang et al. 2017 as Feldman & Zhang 2020 use it; width = the "
            "stem's channels (96: the original), GroupNorm by default",
            96,
            SmallInception,
        ),
    )
}


def model_names() -> list[str]:
    """Names accepted by `build_model`, in table order."""
    return list(_SPECS)


def available_models() -> list[dict[str, Any]]:
    """One dict per model: `name`, `description`, `inputs` (accepted input shapes, in words),
    `accepts_vectors` (bool) and `options` (option name -> default)."""
    return [
        {"name": s.name, "description": s.description, "inputs": s.inputs,
         "accepts_vectors": not s.image_only, "options": dict(s.defaults)}
        for s in _SPECS.values()
    ]


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: Sequence[int] | None = None,
    activation: str | None = None,
    width: int | None = None,
    depth: int | None = None,
    norm: str | None = None,
    patch: int | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build the model `name` for examples of shape `input_shape` and `num_classes` outputs.

    Args:
        name: one of `model_names()`.
        input_shape: one example's shape: (C, H, W) for images, (d,) for vectors.
        num_classes: number of outputs C (classes; for regression the target dimension).
        widths, activation, width, depth, norm, patch: model options (see `available_models()`); None
            means the model's default; a non-None option that the model does not take raises.
        seed: if given, parameters are initialised from `torch.manual_seed(seed)` (reproducible);
            the global RNG state is restored afterwards. None: drawn from the global RNG.
    Returns:
        an `nn.Module` in train mode mapping (n, *input_shape) to logits (n, num_classes).
    Raises:
        ConfigError: unknown name, bad option value, option not taken by the model, a vector
            input to a convolutional model, or an image too small for the model.
    """
    if is_reference(name):
        given = {
            "widths": widths,
            "activation": activation,
            "width": width,
            "depth": depth,
            "norm": norm,
            "patch": patch,
        }
        return build_user_model(name, input_shape, num_classes, seed=seed,
                                **{k: v for k, v in given.items() if v is not None})
    key = str(name).lower()
    if key not in _SPECS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(_SPECS)}, or give your own as "
                          "path/to/file.py:make_model")
    spec = _SPECS[key]
    given = {"widths": widths, "activation": activation, "width": width, "depth": depth, "norm": norm, "patch": patch}
    unused = [k for k, v in given.items() if v is not None and k not in spec.defaults]
    if unused:
        takes = ", ".join(spec.defaults) if spec.defaults else "no options"
        raise ConfigError(f"model {key!r} does not take option(s) {', '.join(unused)}; it takes {takes}")
    options = {k: (given[k] if given[k] is not None else default) for k, default in spec.defaults.items()}
    shape = check_input_shape(input_shape)
    if spec.image_only:
        require_image(key, shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(
            f"num_classes must be an int >= 1 (the number of outputs), got {num_classes!r}; "
            "for regression pass the target dimension"
        )
    num_classes = int(num_classes)
    if seed is None:
        return spec.build(key, shape, num_classes, **options)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: its generator alone (torch.manual_seed would also
        torch.default_generator.manual_seed(int(seed))  # queue a CUDA seeding, 2/3 of a small MLP's build time)
        return spec.build(key, shape, num_classes, **options)


def build_user_model(reference: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int | None = None,
                     **options: Any) -> nn.Module:
    """A user's model: `reference` ("file.py:make_model" or "package.module:make_model") names a callable
    called as `make_model(input_shape=..., num_classes=...)` (it may ignore them) under `seed`; it must
    return an `nn.Module` mapping (n, *input_shape) to (n, num_classes) outputs (checked on zeros)."""
    if options:
        raise ConfigError(f"the model options {', '.join('--' + k for k in options)} are for the built-in models; "
                          f"{reference} builds its own model: give its settings in its code")
    factory = load_callable(reference, "--model")
    shape = check_input_shape(input_shape)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        module = call(factory, f"--model {reference}", input_shape=shape, num_classes=int(num_classes))
    if not isinstance(module, nn.Module):
        raise ConfigError(f"--model {reference} returned a {type(module).__name__}, not a torch.nn.Module")
    was_training = module.training
    try:
        with torch.no_grad():
            out = module.eval()(torch.zeros(2, *shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"--model {reference}: its forward pass fails on inputs of shape (n, {', '.join(map(str, shape))}): "
            f"{type(exc).__name__}: {first}"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, int(num_classes)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"--model {reference} maps inputs (n, {', '.join(map(str, shape))}) to {got} for n = 2; "
                          f"expected (n, {num_classes}) outputs (one per class)")
    return module


def build_model_from_config(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None
) -> nn.Module:
    """`build_model(cfg.name, input_shape, num_classes, **cfg.options(), seed=seed)`."""
    return build_model(cfg.name, input_shape, num_classes, **cfg.options(), seed=seed)
