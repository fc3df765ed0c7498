"""Building blocks shared by the models: activations, normalisation layers, FRN.

Everything here is a standard `nn.Module` so forward hooks (representations, KFAC) see it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modelsense.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

NORMS = ("gn", "bn", "frn", "none")


def check_activation(name: str) -> str:
    """The lower-cased activation name; ConfigError when it is not in ACTIVATIONS."""
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return key


def activation_module(name: str) -> nn.Module:
    """A fresh activation module (`nn.ReLU()`, `nn.Tanh()`, ...) for `name`."""
    return ACTIVATIONS[check_activation(name)]()


def check_norm(norm: str) -> str:
    """The lower-cased norm name; ConfigError when it is not in NORMS."""
    key = str(norm).lower()
    if key not in NORMS:
        raise ConfigError(
            f"unknown norm {norm!r}; choose one of {', '.join(NORMS)} "
            "(gn = GroupNorm, bn = BatchNorm, frn = Filter Response Norm, none = no normalisation)"
        )
    return key


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for `channels`: the largest divisor G of C with G <= max(1, min(32, C // 4)).

    So groups hold at least 4 channels when C >= 4 (C=16 -> 4 groups, 64 -> 16, 128 -> 32,
    512 -> 32 groups of 16); tiny layers (C < 8) get one group (layer norm over C, H, W).
    """
    cap = max(1, min(32, channels // 4))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def norm2d(norm: str, channels: int) -> nn.Module:
    """The 2-d normalisation layer for `norm` in {gn, bn, frn, none} over `channels` channels.

    `none` gives `nn.Identity()` so module and parameter names stay the same across options.
    """
    key = check_norm(norm)
    if key == "gn":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    if key == "bn":
        return nn.BatchNorm2d(channels)
    if key == "frn":
        return FilterResponseNorm2d(channels)
    return nn.Identity()


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalisation with a thresholded linear unit (Singh & Krishnan, 2020).

    For an input x of shape (N, C, H, W) (or one unbatched example (C, H, W)), per example n and
    channel c:

        nu2[n, c] = mean_{h, w} x[n, c, h, w]^2
        y = gamma[c] * x / sqrt(nu2[n, c] + eps) + beta[c]
        z = max(y, tau[c])

    Parameters gamma (init 1), beta (init 0), tau (init 0) have shape (C,), so "weights only"
    selections (tensors with >= 2 dims) leave them out, like biases. No batch statistics: each
    example is normalised on its own, so per-example gradients and vmapped ensembles are exact.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.gamma = nn.Parameter(torch.ones(num_channels))
        self.beta = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        nu2 = x.pow(2).mean(dim=(-2, -1), keepdim=True)
        x_hat = x * torch.rsqrt(nu2 + self.eps)
        y = self.gamma.view(-1, 1, 1) * x_hat + self.beta.view(-1, 1, 1)
        return torch.maximum(y, self.tau.view(-1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
