"""Width- and depth-scalable 5-layer CNN ("ConvNetDepth" of the effective-dimensionality paper,
Maddox et al. 2020; the Nakkiran et al. / Myrtle 5-layer CNN generalised in depth; SEEDS 2.4, and
`mCNN` of the model-symmetries paper, SEEDS 4.4).

Block = conv 3x3 (padding 1, bias) -> norm -> ReLU (-> MaxPool2d(2)).

    stem:   block(C_in -> c), no pooling
    stages 1, 2, 3: stage s has n_s = depth // 3 + (depth % 3 > s - 1) blocks; the first n_s - 1
            keep the width and do not pool, the last doubles the width and max-pools by 2
    head:   global max pool, flatten, out: Linear(c * 2^min(depth, 3) -> C)

depth = number of blocks after the stem (default 3: the 5-layer CNN c, 2c, 4c, 8c); weight layers
= depth + 2. c = `width` (64 in the papers; default 16 here).

Deviations from the papers (on purpose):
    * Normalisation: `norm` in {"gn" (default), "bn", "frn", "none"}. The papers use BatchNorm,
      which couples the examples of a batch: per-example gradients/Jacobians then depend on the
      rest of the batch, and vmapped per-example or ensemble code breaks in train mode. GroupNorm
      normalises each example on its own (groups: see `layers.group_norm_groups`). "bn" gives the
      original; "frn" uses FilterResponseNorm2d (its TLU followed by the block's ReLU).
    * Head: the original MaxPool(4 * pooling_increaser) is a global max pool on 32x32 inputs for
      depth >= 1; here the pool is global for any input size (and for depth 0, where the original
      pooled only a 24x24 window).
    * `mCNN` (SEEDS 4.4) is this network with depth 3 and conv bias off; here convs keep the bias.
Images must have H, W >= 2^min(depth, 3). Default PyTorch initialisation.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from modelsense.errors import ConfigError
from modelsense.models.layers import norm2d


def conv_block(c_in: int, c_out: int, norm: str, pool: bool) -> nn.Sequential:
    """conv 3x3 (pad 1, bias) -> norm -> ReLU (-> MaxPool2d(2)); children conv, norm, act[, pool]."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=True),
        norm=norm2d(norm, c_out),
        act=nn.ReLU(),
    )
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def stage_sizes(depth: int) -> tuple[int, int, int]:
    """Blocks per stage: n_s = depth // 3 + (depth % 3 > s) for s = 0, 1, 2."""
    return tuple(depth // 3 + int(depth % 3 > s) for s in range(3))  # type: ignore[return-value]


class ConvNet(nn.Sequential):
    """The depth/width-scalable CNN; see the module docstring.

    Children: `stem`, `block1` ... `block{depth}`, `pool`, `flatten`, `out`; each block has
    children `conv`, `norm`, `act` (nn.ReLU) and, at the end of a stage, `pool`.
    Input (n, C_in, H, W), output (n, num_classes).
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16, depth: int = 3, norm: str = "gn"
    ) -> None:
        c_in, h, w = input_shape
        n_pools = min(depth, 3)
        if min(h, w) < 2**n_pools:
            raise ConfigError(
                f"cnn with depth {depth} max-pools {n_pools} times and needs images of at least "
                f"{2**n_pools}x{2**n_pools} pixels, got {h}x{w}; lower depth"
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=conv_block(c_in, width, norm, pool=False))
        channels, k = width, 0
        for n_blocks in stage_sizes(depth):
            for i in range(n_blocks):
                last = i == n_blocks - 1
                c_out = 2 * channels if last else channels
                k += 1
                layers[f"block{k}"] = conv_block(channels, c_out, norm, pool=last)
                channels = c_out
        layers["pool"] = nn.AdaptiveMaxPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["out"] = nn.Linear(channels, num_classes)
        super().__init__(layers)
        self.input_shape = tuple(input_shape)
        self.width, self.depth, self.norm = width, depth, norm
