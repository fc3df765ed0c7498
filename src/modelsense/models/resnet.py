"""Post-activation ("v1") residual networks of He et al. (2016) for small images: ResNet-20 with
option-A shortcuts and the standard ResNet-18.

Basic block (c_in -> c_out, stride s):

    y   = norm2(conv2(ReLU(norm1(conv1(x)))))      conv1 3x3 stride s, conv2 3x3 (pad 1, no bias)
    out = ReLU(y + shortcut(x))                    (children act1, act2 are the two ReLUs)

Shortcut when the shape changes (stride s != 1 or c_in != c_out), else the identity:
    option A (ResNet-20, He et al. sec. 4.2; the modelsym code): x[:, :, ::s, ::s] with the new
        channels filled with zeros (half before, half after): no parameters.
    option B (ResNet-18): 1x1 conv (stride s, no bias) -> norm.

`resnet20`: stem conv 3x3 (C_in -> k) -> norm -> ReLU; 3 stages of 3 blocks with widths k, 2k, 4k
    and strides 1, 2, 2; global average pool; out: Linear(4k -> C). k = `width` = 16 is the paper's
    network: 269,722 parameters for 10 classes ("0.27M"). Kaiming-normal init of conv and linear
    weights (as the modelsym / akamaster code).
`resnet18_v1`: the CIFAR ResNet-18 (He et al.; kuangliu/pytorch-cifar; the `resnet_18` of the GEX
    code): stem conv 3x3 (C_in -> k) -> norm -> ReLU (no max-pool); 4 stages of 2 blocks with widths
    k, 2k, 4k, 8k and strides 1, 2, 2, 2; global average pool; out: Linear(8k -> C). k = 64 is the
    standard network: 11,173,962 parameters for 10 classes. Default PyTorch init. The GEX code
    (Haiku) puts a block's stride on its second conv; here it is on the first, as He et al. (same
    parameters).
Normalisation: `norm` in {"gn" (default), "bn", "frn", "none"}; the papers use BatchNorm ("bn",
for `fit` only: batch statistics couple the examples of a batch, which per-example gradients and
the vmapped retraining engine cannot have); GroupNorm and BatchNorm have the same parameter count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from modelsense.models.layers import norm2d


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, then zero-pad the channels from c_in to c_out."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = int(stride)
        self.before = (c_out - c_in) // 2
        self.after = c_out - c_in - self.before

    def forward(self, x: Tensor) -> Tensor:
        x = x[..., :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.before}, {self.after})"


class BasicBlock(nn.Module):
    """Post-activation basic block with option "A" or "B" shortcut; see the module docstring."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = norm2d(norm, c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = norm2d(norm, c_out)
        self.act2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(c_in, c_out, stride)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                              norm2d(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


class ResNet(nn.Module):
    """A post-activation ResNet: stem, `stage1` ... `stageS` (nn.Sequential of BasicBlock), `pool`,
    `flatten`, `out`. Input (n, C_in, H, W), output (n, num_classes)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int, blocks: Sequence[int],
                 strides: Sequence[int], norm: str, shortcut: str) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(input_shape[0], width, kernel_size=3, padding=1, bias=False))
        self.stem.add_module("norm", norm2d(norm, width))
        self.stem.add_module("act", nn.ReLU())
        channels = width
        for s, (n_blocks, stride) in enumerate(zip(blocks, strides), start=1):
            c_out = width * 2 ** (s - 1)
            stage = [BasicBlock(channels if b == 0 else c_out, c_out, stride if b == 0 else 1, norm, shortcut)
                     for b in range(n_blocks)]
            self.add_module(f"stage{s}", nn.Sequential(*stage))
            channels = c_out
        self.n_stages = len(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for s in range(1, self.n_stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return self.out(self.flatten(self.pool(x)))


def resnet20(input_shape: tuple[int, int, int], num_classes: int, width: int = 16, norm: str = "gn") -> ResNet:
    """ResNet-20 with option-A shortcuts and Kaiming-normal init (see the module docstring)."""
    model = ResNet(input_shape, num_classes, width, (3, 3, 3), (1, 2, 2), norm, "A")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model


def resnet18_v1(input_shape: tuple[int, int, int], num_classes: int, width: int = 64, norm: str = "gn") -> ResNet:
    """The standard (post-activation) CIFAR ResNet-18 with 1x1-conv shortcuts (see the module docstring)."""
    return ResNet(input_shape, num_classes, width, (2, 2, 2, 2), (1, 2, 2, 2), norm, "B")
