"""Shape arithmetic and input-shape checks shared by the model builders.

Conventions: image inputs are (C, H, W) (one example, no batch dim); vector inputs are (d,).
"""

from __future__ import annotations

import math

from modelsense.errors import ConfigError


def check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return `input_shape` as a tuple of positive ints, or raise ConfigError."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"input_shape must be a tuple of positive ints such as (1, 28, 28) or (40,), got {input_shape!r}"
        ) from None
    if len(shape) == 0 or any(s <= 0 for s in shape) or any(s != t for s, t in zip(shape, input_shape)):
        raise ConfigError(
            f"input_shape must be a non-empty tuple of positive ints such as (1, 28, 28) or (40,), "
            f"got {input_shape!r}"
        )
    return shape


def require_image(model_name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return (C, H, W) for an image input, or raise ConfigError suggesting an MLP."""
    if len(input_shape) != 3:
        kind = "a vector" if len(input_shape) == 1 else f"a {len(input_shape)}-d array"
        raise ConfigError(
            f"model {model_name!r} needs image inputs of shape (C, H, W); "
            f"the data gives {kind} of shape {tuple(input_shape)}. Use 'mlp' (or 'linear', "
            f"'small_mlp', 'large_mlp') for vector data, or reshape the features into images."
        )
    c, h, w = input_shape
    return c, h, w


def conv_out(size: int, kernel: int, stride: int = 1, pad_total: int = 0) -> int:
    """Output length of a convolution/pooling window: floor((size + pad_total - kernel) / stride) + 1."""
    return (size + pad_total - kernel) // stride + 1


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) along one axis.

    Output length ceil(size / stride); total padding max((out - 1) * stride + kernel - size, 0),
    split with the extra element (if odd) after, as TensorFlow does.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
