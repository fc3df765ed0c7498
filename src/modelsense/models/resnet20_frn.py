"""ResNet-20 with Filter Response Normalisation (the MPE / BNN-HMC `resnet20_frn`).

Every "layer" is conv (with bias, TF-'same' padding) -> FRN (with its TLU) -> activation:

    stem:    layer(C_in -> w, 3x3), identity activation (as in the MPE port)
    stage s = 1, 2, 3 (filters w, 2w, 4w), 3 residual blocks each:
        y = layer(x, 3x3, stride 2 at the first block of stages 2 and 3, ReLU)
        y = layer(y, 3x3, identity activation)
        shortcut = layer(x, 1x1, same stride, identity activation) at the first block of stages
                   2 and 3 (projection), else x
        x = ReLU(shortcut + y)
    global average pool, flatten, out: Linear(4w -> C)

w = `width` (16 in the paper: filters 16/32/64). No BatchNorm. TF-'same' padding of a stride-2
convolution on an even-sized map puts the extra row/column after (bottom/right); it is done by an
`nn.ZeroPad2d` child (`pad`) in front of an unpadded `nn.Conv2d` so hooks on the convolution see
exactly what it convolves; symmetric 'same' padding sits in the convolution's own `padding`.
The original's 8x8 average pool is the global average pool on 32x32 inputs; here it is global for
any input size. Default PyTorch initialisation (as the MPE PyTorch port).
"""

from __future__ import annotations

from torch import Tensor, nn

from modelsense.models._shapes import conv_out, tf_same_padding
from modelsense.models.layers import FilterResponseNorm2d


class ConvFRN(nn.Module):
    """pad -> conv (bias) -> FRN -> act, with TF-'same' padding computed for an (h, w) input.

    Children: `pad` (ZeroPad2d or Identity), `conv`, `norm`, `act` (ReLU or Identity).
    Attribute `out_hw` is the output spatial size.
    """

    def __init__(
        self, c_in: int, c_out: int, hw: tuple[int, int], kernel: int = 3, stride: int = 1, relu: bool = False
    ) -> None:
        super().__init__()
        top, bottom = tf_same_padding(hw[0], kernel, stride)
        left, right = tf_same_padding(hw[1], kernel, stride)
        if top == bottom and left == right:
            self.pad: nn.Module = nn.Identity()
            padding = (top, left)
        else:
            self.pad = nn.ZeroPad2d((left, right, top, bottom))
            padding = (0, 0)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=True)
        self.norm = FilterResponseNorm2d(c_out)
        self.act: nn.Module = nn.ReLU() if relu else nn.Identity()
        self.out_hw = (conv_out(hw[0], kernel, stride, top + bottom), conv_out(hw[1], kernel, stride, left + right))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(self.pad(x))))


class ResidualBlockFRN(nn.Module):
    """x -> ReLU(shortcut(x) + layer2(layer1(x))); children `conv1`, `conv2`, `shortcut`, `act`."""

    def __init__(self, c_in: int, c_out: int, hw: tuple[int, int], stride: int) -> None:
        super().__init__()
        self.conv1 = ConvFRN(c_in, c_out, hw, 3, stride, relu=True)
        self.conv2 = ConvFRN(c_out, c_out, self.conv1.out_hw, 3, 1, relu=False)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = ConvFRN(c_in, c_out, hw, 1, stride, relu=False)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()
        self.out_hw = self.conv2.out_hw

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.conv2(self.conv1(x)))


class ResNet20FRN(nn.Module):
    """ResNet-20 with FRN; see the module docstring.

    Children: `stem`, `stage1`, `stage2`, `stage3` (each nn.Sequential of 3 ResidualBlockFRN),
    `pool`, `flatten`, `out`. Input (n, C_in, H, W), output (n, num_classes).
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16, blocks_per_stage: int = 3
    ) -> None:
        super().__init__()
        c_in, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.stem = ConvFRN(c_in, width, (h, w), 3, 1, relu=False)
        hw = self.stem.out_hw
        channels = width
        for s in range(3):
            c_out = width * 2**s
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                block = ResidualBlockFRN(channels, c_out, hw, stride)
                blocks.append(block)
                hw, channels = block.out_hw, c_out
            self.add_module(f"stage{s + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.out(self.flatten(self.pool(x)))
