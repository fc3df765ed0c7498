"""A model of your own for modelsense: `--model examples/my_model.py:make_model`.

modelsense calls `make_model(input_shape=..., num_classes=...)`: one example's shape, e.g. (1, 8, 8)
for digits or (d,) for feature vectors, and the number of classes. Return any `torch.nn.Module` that
maps a batch (n, *input_shape) to logits (n, num_classes). Its parameters are initialised under the
command's `--seed`. Layers of kinds K-FAC knows (Linear, Conv1d/2d, Embedding) get Kronecker-factored
curvature; other parameters fall back to exact or diagonal blocks.
"""

import math

from torch import nn


def make_model(input_shape, num_classes, hidden=64):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.GELU(),
        nn.LayerNorm(hidden),
        nn.Linear(hidden, num_classes),
    )
