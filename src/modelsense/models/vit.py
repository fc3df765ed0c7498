"""A tiny vision transformer (`vit`; Dosovitskiy et al. 2021), sized for 8x8 digits.

    patches:  (n, C, H, W) -> (n, T, C·p·p), T = (H/p)·(W/p) non-overlapping p x p patches
              (row-major over the patch grid; within a patch channel-major, then rows, then columns)
    embed:    Linear(C·p·p -> width) on every patch, + learned positions `pos.weight` (1, T, width), dropout
    blocks:   `depth` pre-norm blocks  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
              attn: qkv Linear(width -> 3·width), `heads` heads of softmax(q kᵀ / √(width/heads)) v,
                    dropout on the attention weights, proj Linear(width -> width), dropout
              mlp:  fc1 Linear(width -> mlp_ratio·width), GELU, dropout, fc2 Linear(-> width), dropout
    norm:     LayerNorm(width);  pool: mean over the T tokens;  out: Linear(width -> C)

Attention is written out with matmul and softmax (no nn.MultiheadAttention): every weight then
sits in an nn.Linear called as a module (forward hooks for KFAC / representations see them, with
inputs (n, T, d)), and torch.func's vmap batches it without the fallback that
`scaled_dot_product_attention` takes under vmap. Mean pooling (no class token). Initialisation as
timm's ViT: Linear weights and positions truncated normal (std 0.02), biases 0, LayerNorm 1 / 0.
Dropout (default 0.1) is active in train mode only; scoring runs in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modelsense.errors import ConfigError


class Patches(nn.Module):
    """(n, C, H, W) -> (n, (H/p)(W/p), C·p·p): the non-overlapping p x p patches as a sequence."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = int(patch)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.patch
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def extra_repr(self) -> str:
        return f"patch={self.patch}"


class Positions(nn.Module):
    """x + weight: learned position embeddings `weight` (1, T, d) added to (n, T, d) tokens.

    `per_example_rows` gives the per-example gradient of `weight` from the gradient g of the output
    (the same, per example: ∂(x + w)/∂w = I), so K-FAC's exact fallback block of the positions comes
    from its hooked backward passes (curvature/kfac_layers.py) instead of per-example Jacobians.
    """

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight

    def per_example_rows(self, inputs: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        """{"weight": (n, T·d)}: the per-example gradient of `weight` given ∂l/∂output (n, T, d)."""
        return {"weight": grad_output.reshape(grad_output.shape[0], -1)}


class SelfAttention(nn.Module):
    """Multi-head self-attention on (n, T, d): children qkv, attn_drop, proj, proj_drop."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = int(heads)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # (n, heads, T, T)
        weights = self.attn_drop(weights.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj_drop(self.proj(out))


class FeedForward(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout on (n, T, d)."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: children ln1, attn, ln2, mlp."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MeanPool(nn.Module):
    """(n, T, d) -> (n, d): the mean over tokens."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class ViT(nn.Module):
    """The tiny vision transformer of the module docstring.

    Children: patches, embed, pos, drop, blocks (blocks.0 ...), norm, pool, out.
    Input (n, C, H, W) with H, W divisible by `patch`; output (n, num_classes).
    """

    #: every feature is (n, T, channels) (or (n, width) after pooling): representations read the last axis
    channel_axis = -1

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 64, depth: int = 2,
                 patch: int = 2, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ConfigError(
                f"vit cuts images into {patch}x{patch} patches; the image sides must be multiples of {patch}, "
                f"got {h}x{w}; choose a patch size that divides both sides"
            )
        if width % heads:
            raise ConfigError(
                f"vit splits the width over {heads} attention heads; width must be a multiple of {heads}, got {width}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"vit dropout must be in [0, 1), got {dropout}")
        tokens = (h // patch) * (w // patch)
        self.input_shape = tuple(input_shape)
        self.width, self.depth, self.patch, self.heads = width, depth, patch, heads
        self.patches = Patches(patch)
        self.embed = nn.Linear(c * patch * patch, width)
        self.pos = Positions(tokens, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio * width, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pool = MeanPool()
        self.out = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.pos(self.embed(self.patches(x))))
        x = self.norm(self.blocks(x))
        return self.out(self.pool(x))

