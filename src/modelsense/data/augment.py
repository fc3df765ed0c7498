"""Training-time augmentation of image minibatches: random crops with padding, horizontal flips, mixup.

Numbers in, numbers out; the random draws are made by the caller's generator (the training layer
draws once per epoch for the epoch's order of examples, so a model's augmentation is fixed by its
seed and does not change its batch order).

Random crop with padding p (He et al. 2016; torchvision's `RandomCrop(H, padding=p)`): pad each
image (C, H, W) with p zeros on every side and cut the H x W window whose top-left corner is
(dy, dx), dy, dx uniform in {0, ..., 2p}:

    out[c, h, w] = x[c, h + dy - p, w + dx - p]   (0 where that falls outside the image)

Horizontal flip: out[c, h, w] = x[c, h, W - 1 - w] for the examples drawn (probability 1/2).
Crop first, then flip. The zeros are the value 0 of the data as stored: for standardised images that
is the mean pixel, where torchvision (padding before normalisation) pads black.

Mixup (Zhang et al. 2018): one λ ~ Beta(α, α) per minibatch and a random pairing π of its examples;
the inputs λ x_i + (1 − λ) x_π(i), the loss λ l(·, y_i) + (1 − λ) l(·, y_π(i)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modelsense.errors import ConfigError


def draw_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
    """Random crop offsets (n, 2) (dy, dx in {0, ..., 2 padding}; None when padding is 0) and flips
    (n,) bool (None when flip is off) for n examples, drawn in that order from `generator`."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator) if padding > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if flip else None
    return offsets, flips


def crop_flip(x: Tensor, padding: int, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
    """Images x (n, C, H, W) cropped at `offsets` (n, 2) from their zero-padded copies and flipped where
    `flips` (n,) is True (see the module docstring); None skips that part (both None: x itself)."""
    if offsets is not None and padding > 0:
        n, c, h, w = x.shape
        padded = F.pad(x, (padding, padding, padding, padding))
        offsets = offsets.to(x.device)
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
                   rows, cols]
    if flips is not None:
        x = torch.where(flips.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
    return x


def check_images(x: Tensor, what: str) -> None:
    """ConfigError unless x holds images (n, C, H, W) (crops and flips need them)."""
    if x.dim() != 4:
        raise ConfigError(f"{what} needs images of shape (C, H, W); the training inputs have shape "
                          f"{tuple(x.shape[1:])}: drop the option for vector data")


def draw_mixup(n: int, alpha: float, rng: np.random.Generator) -> tuple[float, Tensor]:
    """λ ~ Beta(alpha, alpha) and a random permutation π of n examples (the pairing), from `rng`."""
    lam = float(rng.beta(alpha, alpha))
    return lam, torch.as_tensor(rng.permutation(n), dtype=torch.long)


__all__ = ["check_images", "crop_flip", "draw_crop_flip", "draw_mixup"]
