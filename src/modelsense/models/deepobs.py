"""DeepOBS `cifar10_3c3d` ("cnn_deepobs" in the MPE code), for any image size of at least 9x9.

    conv1 C_in->64 k5 'valid', ReLU, maxpool 3/2 TF-'same'
    conv2 64->96 k3 'valid',   ReLU, maxpool 3/2 TF-'same'
    conv3 96->128 k3 'same',   ReLU, maxpool 3/2 TF-'same'
    flatten (128 * h3 * w3), dense1 ->512, ReLU, dense2 512->256, ReLU, out 256->C

Spatial sizes: 32 -> 28 -> 14 -> 12 -> 6 -> 6 -> 3 (flatten 1152, as DeepOBS); 28 -> 24 -> 12 -> 10
-> 5 -> 5 -> 3 (also 1152). The flatten size is computed from the input by arithmetic.
TF-'same' max pooling pads (possibly asymmetrically, extra pixel after) with zeros in a separate
`nn.ZeroPad2d`; this equals TensorFlow's "ignore the padding" because the pooled inputs are ReLU
outputs (>= 0). Initialisation as DeepOBS: conv weights xavier-normal, linear weights
xavier-uniform, all biases zero.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from modelsense.errors import ConfigError
from modelsense.models._shapes import conv_out, tf_same_padding


def _same_pool(h: int, w: int) -> tuple[nn.Module, nn.Module, int, int]:
    """(pad module, max-pool module, out h, out w) for a 3x3 stride-2 TF-'same' max-pool."""
    top, bottom = tf_same_padding(h, 3, 2)
    left, right = tf_same_padding(w, 3, 2)
    pad: nn.Module = (
        nn.ZeroPad2d((left, right, top, bottom)) if (top, bottom, left, right) != (0, 0, 0, 0) else nn.Identity()
    )
    return pad, nn.MaxPool2d(3, stride=2), conv_out(h, 3, 2, top + bottom), conv_out(w, 3, 2, left + right)


class DeepOBS3c3d(nn.Sequential):
    """DeepOBS 3c3d convolutional network; see the module docstring.

    Children: conv1, relu1, pad1, pool1, conv2, relu2, pad2, pool2, conv3, relu3, pad3, pool3,
    flatten, dense1, relu4, dense2, relu5, out. Input (n, C_in, H, W), output (n, num_classes).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        c_in, h, w = input_shape
        if min(h, w) < 9:
            raise ConfigError(
                f"cnn_deepobs needs images of at least 9x9 pixels (its 'valid' 5x5 and 3x3 convolutions "
                f"shrink the map), got {h}x{w}; use 'lenet' or 'cnn' for smaller images"
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(c_in, 64, kernel_size=5)
        layers["relu1"] = nn.ReLU()
        h, w = conv_out(h, 5), conv_out(w, 5)
        layers["pad1"], layers["pool1"], h, w = _same_pool(h, w)
        layers["conv2"] = nn.Conv2d(64, 96, kernel_size=3)
        layers["relu2"] = nn.ReLU()
        h, w = conv_out(h, 3), conv_out(w, 3)
        layers["pad2"], layers["pool2"], h, w = _same_pool(h, w)
        layers["conv3"] = nn.Conv2d(96, 128, kernel_size=3, padding=1)  # 'same' for k3 s1 is symmetric
        layers["relu3"] = nn.ReLU()
        layers["pad3"], layers["pool3"], h, w = _same_pool(h, w)
        layers["flatten"] = nn.Flatten()
        layers["dense1"] = nn.Linear(128 * h * w, 512)
        layers["relu4"] = nn.ReLU()
        layers["dense2"] = nn.Linear(512, 256)
        layers["relu5"] = nn.ReLU()
        layers["out"] = nn.Linear(256, num_classes)
        super().__init__(layers)
        self.input_shape = tuple(input_shape)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
