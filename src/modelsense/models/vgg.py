"""VGG-11 and VGG-16 for small images (Simonyan & Zisserman 2015, configurations A and D, with the
CIFAR head of the common PyTorch ports: one linear layer on the pooled features).

    features: for each entry of the configuration, conv 3x3 (pad 1, bias) -> norm -> ReLU, or a
              2x2 max-pool ("M"); channels are multiples of k = `width`:
        vgg11: k, M, 2k, M, 4k, 4k, M, 8k, 8k, M, 8k, 8k, M
        vgg16: k, k, M, 2k, 2k, M, 4k, 4k, 4k, M, 8k, 8k, 8k, M, 8k, 8k, 8k, M
    head:     global average pool, flatten, out: Linear(8k -> C)

k = 64 is the standard network (9,231,114 / 14,728,266 parameters for 10 classes; BatchNorm and
GroupNorm have the same count). Deviations from the papers (on purpose):
    * Normalisation: `norm` in {"gn" (default), "bn", "frn", "none"}. The CIFAR ports use BatchNorm,
      which couples the examples of a batch (per-example gradients and the vmapped retraining
      engine need per-example normalisation); "bn" gives the original for `fit`.
    * Pools round up (`ceil_mode=True`), so images smaller than 32x32 (e.g. 8x8 digits) go through
      all five pools (a 1x1 map stays 1x1); on sides divisible by 32 this is the usual pooling.
      The head's average pool is global for any input size (on 32x32 the map is already 1x1).
Children: `features` (nn.Sequential, each conv block has children conv, norm, act), `pool`,
`flatten`, `out`. Default PyTorch initialisation.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from modelsense.models.layers import norm2d

#: channel multipliers of k per conv layer; 0 is a max-pool
CONFIGS: dict[str, tuple[int, ...]] = {
    "vgg11": (1, 0, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0),
    "vgg16": (1, 1, 0, 2, 2, 0, 4, 4, 4, 0, 8, 8, 8, 0, 8, 8, 8, 0),
}


class VGG(nn.Module):
    """VGG-11/16 of width k; see the module docstring. Input (n, C_in, H, W), output (n, num_classes)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, config: str = "vgg11",
                 width: int = 64, norm: str = "gn") -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        channels = input_shape[0]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        n_conv = n_pool = 0
        for mult in CONFIGS[config]:
            if mult == 0:
                n_pool += 1
                layers[f"pool{n_pool}"] = nn.MaxPool2d(2, ceil_mode=True)
                continue
            n_conv += 1
            c_out = width * mult
            layers[f"conv{n_conv}"] = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(channels, c_out, kernel_size=3, padding=1), norm=norm2d(norm, c_out), act=nn.ReLU()))
            channels = c_out
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.out(self.flatten(self.pool(self.features(x))))
