"""PreAct ResNet-18 with width k (Nakkiran et al. double descent; the effective-dimensionality
paper's `ResNet18`, SEEDS 2.4).

    stem:   conv 3x3 (C_in -> k, pad 1, no bias)
    layer1..layer4: 2 PreAct blocks each, widths k, 2k, 4k, 8k, strides 1, 2, 2, 2
        block: a = ReLU(norm1(x)); y = conv2(ReLU(norm2(conv1(a))))   (3x3 convs, pad 1, no bias)
               shortcut = 1x1 conv(a) (no bias, no norm) when stride or width changes, else x
               out = y + shortcut
    global average pool, flatten, out: Linear(8k -> C). No final norm/ReLU (as the original).

k = `width` (64 is the standard ResNet-18; default 16 here). Deviations from the paper (on purpose):
    * Normalisation: `norm` in {"gn" (default), "bn", "frn", "none"}. The paper uses BatchNorm,
      which couples the examples of a batch and breaks per-example gradients/Jacobians and vmapped
      ensembles in train mode; GroupNorm normalises each example on its own. "bn" gives the original.
    * The original 4x4 average pool is the global average pool on 32x32 inputs; here it is global
      for any input size.
Default PyTorch initialisation.
"""

from __future__ import annotations

from torch import Tensor, nn

from modelsense.models.layers import norm2d


class PreActBlock(nn.Module):
    """Pre-activation basic block; children norm1, act1, conv1, norm2, act2, conv2[, shortcut]."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.norm1 = norm2d(norm, c_in)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm2 = norm2d(norm, c_out)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act1(self.norm1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        y = self.conv2(self.act2(self.norm2(self.conv1(a))))
        return y + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 of width k; see the module docstring.

    Children: `stem`, `layer1` ... `layer4` (nn.Sequential of 2 PreActBlock), `pool`, `flatten`,
    `out`. Input (n, C_in, H, W), output (n, num_classes).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16, norm: str = "gn") -> None:
        super().__init__()
        c_in = input_shape[0]
        self.input_shape = tuple(input_shape)
        self.stem = nn.Conv2d(c_in, width, kernel_size=3, stride=1, padding=1, bias=False)
        channels = width
        for i, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            c_out = width * mult
            blocks = [PreActBlock(channels, c_out, stride, norm), PreActBlock(c_out, c_out, 1, norm)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            channels = c_out
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.out(self.flatten(self.pool(x)))
