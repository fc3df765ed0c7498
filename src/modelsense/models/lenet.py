"""LeNet-5 as used in the MPE code (Nickl et al., 2023), adapted to any image size.

For 28x28 inputs (any channel count C_in) it is exactly the MPE `LeNet5` with C outputs:

    conv1 C_in->6 k5 pad2, tanh, avgpool2 -> 6x14x14
    conv2 6->16 k5,        tanh, avgpool2 -> 16x5x5
    conv3 16->120 k5,      tanh           -> 120x1x1
    flatten, fc1 120->84, tanh, out 84->C

Other sizes (each spatial axis handled on its own, size s):
    * conv1 always pads 2 (keeps s); avgpool2 gives s1 = floor(s / 2).
    * conv2 is 'valid' (padding 0) when s1 >= 6, otherwise padding 2 ('same', keeps s1) so the
      5x5 kernel fits; avgpool2 gives s3 = floor(s2 / 2).
    * conv3 has kernel min(5, s3) (valid), so on small maps it spans the whole map like the
      original 5x5 kernel does on 5x5; its output is s4 = s3 - k3 + 1 (1 when s3 <= 5).
    * fc1 takes 120 * s4_h * s4_w inputs.
    Examples: 8x8 (digits): 8 -> 8 -> 4 -> conv2 pad 2 -> 4 -> 2 -> conv3 k2 -> 1 (fc1 120->84).
    32x32 (CIFAR): 32 -> 16 -> 12 -> 6 -> conv3 k5 -> 2 (fc1 480->84).
Images must be at least 4x4. Default PyTorch initialisation (as MPE).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from modelsense.errors import ConfigError
from modelsense.models.layers import activation_module


def _lenet_axis(size: int) -> tuple[int, int, int]:
    """(conv2 padding, conv3 kernel, conv3 output size) along one axis of length `size`."""
    s1 = size // 2
    pad2 = 0 if s1 >= 6 else 2
    s2 = s1 + 2 * pad2 - 4
    s3 = s2 // 2
    k3 = min(5, s3)
    return pad2, k3, s3 - k3 + 1


class LeNet5(nn.Sequential):
    """LeNet-5 (MPE variant, tanh + average pooling); see the module docstring for the shape rules.

    Children: conv1, act1, pool1, conv2, act2, pool2, conv3, act3, flatten, fc1, act4, out.
    Input (n, C_in, H, W), output (n, num_classes).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, activation: str = "tanh") -> None:
        c_in, h, w = input_shape
        if h < 4 or w < 4:
            raise ConfigError(f"lenet needs images of at least 4x4 pixels, got {h}x{w}")
        pad_h, k_h, out_h = _lenet_axis(h)
        pad_w, k_w, out_w = _lenet_axis(w)
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(c_in, 6, kernel_size=5, padding=2),
                act1=activation_module(activation),
                pool1=nn.AvgPool2d(2),
                conv2=nn.Conv2d(6, 16, kernel_size=5, padding=(pad_h, pad_w)),
                act2=activation_module(activation),
                pool2=nn.AvgPool2d(2),
                conv3=nn.Conv2d(16, 120, kernel_size=(k_h, k_w)),
                act3=activation_module(activation),
                flatten=nn.Flatten(),
                fc1=nn.Linear(120 * out_h * out_w, 84),
                act4=activation_module(activation),
                out=nn.Linear(84, num_classes),
            )
        )
        self.input_shape = tuple(input_shape)
