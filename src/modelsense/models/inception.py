"""The small Inception of Zhang et al. (2017, "Understanding deep learning requires rethinking
generalization") as Feldman & Zhang (2020) define it for CIFAR (`libarch/inception.py`,
`SmallInception` of google-research/heldout-influence-estimation; SEEDS 3.3).

    unit(c, k, s):  conv k x k (stride s, no bias, 'same' padding) -> norm -> ReLU
    block(a, b):    concat over channels of unit(a, 1, 1) and unit(b, 3, 1)   (children conv1x1, conv3x3)
    stem:           unit(96, 3, 1)
    stage1:         block(32, 32), block(32, 48), downsample unit(160, 3, 2)
    stage2:         block(112, 48), block(96, 64), block(80, 80), block(48, 96), downsample unit(240, 3, 2)
    stage3:         block(176, 160), block(176, 160)
    head:           global max pool, flatten, out: Linear(336 -> C)

Every channel count c above is scaled to max(1, round(c * width / 96)): `width` is the stem's
channels, 96 the original network (1,895,786 parameters for 3-channel inputs and 10 classes, with
BatchNorm or GroupNorm; Zhang et al. count 1,649,402 for their variant, whose downsampling concatenates
a stride-2 conv with a max-pool).
Deviations (on purpose): `norm` in {"gn" (default), "bn", "frn", "none"} ("bn" is the original, for
`fit` only: batch statistics couple the examples of a batch); the stride-2 convs pad one pixel on
every side (TensorFlow's 'SAME' pads only after on even sides; same output size and parameters);
the original's optional residual connection (off in its experiments) is left out. Default PyTorch init.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modelsense.models.layers import norm2d

STEM = 96
STAGES = (((32, 32), (32, 48)), ((112, 48), (96, 64), (80, 80), (48, 96)), ((176, 160), (176, 160)))
DOWNSAMPLE = (160, 240, 0)


def unit(c_in: int, c_out: int, kernel: int, stride: int, norm: str) -> nn.Sequential:
    """conv (no bias, padding kernel // 2) -> norm -> ReLU; children conv, norm, act."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False))
    seq.add_module("norm", norm2d(norm, c_out))
    seq.add_module("act", nn.ReLU())
    return seq


class MultiBranchBlock(nn.Module):
    """Inception block: [unit(a, 1x1), unit(b, 3x3)] concatenated over channels (a + b out)."""

    def __init__(self, c_in: int, a: int, b: int, norm: str) -> None:
        super().__init__()
        self.conv1x1 = unit(c_in, a, 1, 1, norm)
        self.conv3x3 = unit(c_in, b, 3, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv1x1(x), self.conv3x3(x)], dim=-3)


class SmallInception(nn.Module):
    """See the module docstring. Children `stem`, `stage1` ... `stage3` (nn.Sequential of blocks and
    `downsample`), `pool`, `flatten`, `out`. Input (n, C_in, H, W), output (n, num_classes)."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int = STEM, norm: str = "gn"
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)

        def scaled(c: int) -> int:
            return max(1, round(c * width / STEM))

        self.stem = unit(input_shape[0], scaled(STEM), 3, 1, norm)
        channels = scaled(STEM)
        for s, (blocks, down) in enumerate(zip(STAGES, DOWNSAMPLE), start=1):
            stage = nn.Sequential()
            for i, (a, b) in enumerate(blocks, start=1):
                stage.add_module(f"block{i}", MultiBranchBlock(channels, scaled(a), scaled(b), norm))
                channels = scaled(a) + scaled(b)
            if down:
                stage.add_module("downsample", unit(channels, scaled(down), 3, 2, norm))
                channels = scaled(down)
            self.add_module(f"stage{s}", stage)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.out(self.flatten(self.pool(x)))
