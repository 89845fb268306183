"""Focused linear attention (FLatten) over a whole channels-last map, as released."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import attention
from ...parallel import current_group, gathered
from .projection import QKVProjection
from .regions import check_map, merge_heads, split_heads

__all__ = ['FocusedLinearAttention', 'resize_positional_encoding']


def resize_positional_encoding(table: Tensor, grid: tuple[int, int],
                               hw: tuple[int, int]) -> Tensor:
    """``(1, gh*gw, C)`` encoding learned on a ``grid`` -> ``(1, h*w, C)`` for an
    ``h x w`` map, bilinearly (align_corners=False); the same size as is.

    The release has no rule for other sizes (its encoding is fixed to the
    classification window). We resize it like PVT's position embeddings: at 224 px
    the encoding covers the whole map of each global stage, so it encodes a
    token's place in the image, and resizing keeps that meaning at any size.
    Repeating it per 56 px window instead would tell every window it is the image.
    """
    c = table.shape[-1]
    if tuple(grid) == tuple(hw):
        return table
    t = table.reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=hw, mode='bilinear', align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], c)


class FocusedLinearAttention(QKVProjection):
    """FLatten's focused linear attention (:func:`mmlinattn.ops.focused_linear_attention`)
    over a whole map, with the depthwise convolution of v shared by the heads.

    Args:
        dim: channels ``C``.
        num_heads: heads.
        grid: the ``gh x gw`` map of the positional encoding (the stage's map at
            the classification size: 56, 28 at 224 px for Swin).
        focusing_factor: ``p`` (3).
        kernel_size: of the depthwise convolution (5), one ``head_dim``-channel
            filter applied to every head's values.
        qkv_bias, proj_drop: as in Swin.
        qkv_layout: ``'qkv'`` (Swin) or ``'q_kv'`` (PVT: ``q`` and ``kv`` Linear layers).

    Shapes: ``forward(x: (B, H, W, C)) -> (B, H, W, C)``, any ``H x W``.
    Parameters ``qkv`` (or ``q``, ``kv``), ``proj``, ``dwc``, ``scale``,
    ``positional_encoding`` as released.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 grid: tuple[int, int],
                 focusing_factor: float = 3.,
                 kernel_size: int = 5,
                 qkv_bias: bool = True,
                 proj_drop: float = 0.,
                 qkv_layout: str = 'qkv') -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        head_dim = dim // num_heads
        self.dim, self.num_heads, self.grid = dim, num_heads, tuple(grid)
        self.focusing_factor = focusing_factor
        self.add_projections(dim, qkv_layout, qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2,
                             groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}, '
                f'focusing_factor={self.focusing_factor}')

    def forward(self, x: Tensor) -> Tensor:
        check_map(self, x, self.dim)
        if current_group() is not None:
            return gathered(self.forward, x)
        b, h, w, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q, k, v = self.project(x.reshape(b, h * w, c))
        k = k + resize_positional_encoding(self.positional_encoding, self.grid, (h, w))
        out = merge_heads(attention(
            'focused', split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
            focusing_factor=self.focusing_factor,
            channel_scale=F.softplus(self.scale).view(heads, d)))
        # One head_dim-channel filter for every head: heads go to the batch axis.
        vh = split_heads(v, heads).reshape(b * heads, h, w, d).permute(0, 3, 1, 2)
        local = self.dwc(vh).reshape(b, c, h * w).transpose(1, 2)
        return self.proj_drop(self.proj((out + local).view(b, h, w, c)))
