"""Fully connected models: multinomial logistic regression and MLPs.

Any input shape is accepted; inputs are flattened to d = prod(input_shape) features.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from modelsense.errors import ConfigError
from modelsense.models.layers import activation_module, check_activation


def check_widths(widths: Sequence[int] | None, model_name: str = "mlp") -> tuple[int, ...]:
    """Hidden widths as a non-empty tuple of positive ints, or ConfigError."""
    try:
        values = tuple(widths) if widths is not None else ()
        ints = tuple(int(w) for w in values)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{model_name}: widths must be a sequence of positive ints such as (128, 128), got {widths!r}"
        ) from None
    if not ints:
        raise ConfigError(
            f"{model_name}: widths must list at least one hidden layer, got {widths!r}; "
            "use model 'linear' for a network without hidden layers"
        )
    if any(w <= 0 or w != v for w, v in zip(ints, values)):
        raise ConfigError(f"{model_name}: every hidden width must be a positive int, got {widths!r}")
    return ints


class MLP(nn.Sequential):
    """Flatten, then `Linear -> activation` per hidden width, then a linear output layer.

        f(x) = W_L a(... a(W_1 vec(x) + b_1) ...) + b_L

    Children (in order): `flatten`, `fc1`, `act1`, ..., `fcK`, `actK`, `out`, so parameters are
    named `fc1.weight`, ..., `out.weight`, `out.bias`, and hooks on `act{k}` see hidden features.
    With `widths=()` this is multinomial logistic regression (`flatten`, `out`).

    Args:
        input_shape: shape of one example; flattened to prod(input_shape) features.
        num_classes: output dimension C (logits).
        widths: hidden layer widths.
        activation: name in {relu, tanh, gelu, sigmoid, elu, leaky_relu}.
    Output: (n, C).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        widths: Sequence[int] = (128, 128),
        activation: str = "relu",
    ) -> None:
        in_features = math.prod(input_shape)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        widths = tuple(widths)
        if widths:
            check_activation(activation)
        for k, width in enumerate(widths, start=1):
            layers[f"fc{k}"] = nn.Linear(in_features, width)
            layers[f"act{k}"] = activation_module(activation)
            in_features = width
        layers["out"] = nn.Linear(in_features, num_classes)
        super().__init__(layers)
        self.input_shape = tuple(input_shape)
        self.widths = widths
        self.activation = activation if widths else None
