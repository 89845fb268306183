"""MLLA's building blocks (Mamba-like linear attention, Han et al., NeurIPS 2024), with
the released parameter names.

Every module here maps channels-last maps ``(B, H, W, C)`` (the stem takes the NCHW
image). Sizes are whatever the input has: the release fixes its RoPE and its stem's
input check to the training size; here RoPE is computed for the map at hand
(:func:`mmlinattn.ops.rope_rotations`), and odd maps are padded before a merge as the
release's detection backbone does.
"""
from __future__ import annotations

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ...ops import attention, rope_rotations
from .mlp import Mlp
from .regions import merge_heads, split_heads

__all__ = ['ConvNormAct', 'MLLAStem', 'MLLAMerge', 'MLLAAttention', 'MLLABlock']


def _nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


class ConvNormAct(nn.Sequential):
    """``conv`` -> optional BatchNorm ``norm`` -> optional ReLU (the release's ConvLayer),
    on NCHW maps."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, norm: bool = True,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              groups=groups, bias=bias)
        if norm:
            self.norm = nn.BatchNorm2d(out_channels)
        if act:
            self.act = nn.ReLU()


class MLLAStem(nn.Module):
    """The stride-4 convolutional stem: image ``(B, C_in, H, W)`` -> ``(B, H/4, W/4, dim)``
    (rounded up: the image is zero-padded at the bottom and right to a multiple of 4)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.conv1 = ConvNormAct(in_channels, half, 3, 2, 1, bias=False)
        self.conv2 = nn.Sequential(ConvNormAct(half, half, 3, 1, 1, bias=False),
                                   ConvNormAct(half, half, 3, 1, 1, bias=False, act=False))
        self.conv3 = nn.Sequential(ConvNormAct(half, dim * 4, 3, 2, 1, bias=False),
                                   ConvNormAct(dim * 4, dim, 1, bias=False, act=False))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 4, 0, -h % 4))
        x = self.conv1(x)
        x = self.conv2(x) + x
        return _nhwc(self.conv3(x))


class MLLAMerge(nn.Module):
    """Downsampling between stages: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``
    by a 1x1 expansion (x4), a stride-2 depthwise 3x3 and a 1x1 projection. Odd maps
    get a zero row / column at the bottom / right first."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(
            ConvNormAct(dim, hidden, 1, norm=False),
            ConvNormAct(hidden, hidden, 3, 2, 1, groups=hidden, norm=False),
            ConvNormAct(hidden, 2 * dim, 1, act=False))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        return _nhwc(self.conv(_nchw(x)))


class MLLAAttention(nn.Module):
    """MLLA's linear attention (:func:`mmlinattn.ops.mlla_linear_attention`: ELU+1
    kernel, RoPE for the map at hand) with v the input itself, plus LePE (a depthwise
    3x3 convolution of v). Parameters ``qk``, ``lepe`` as released."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2 or dim % 4:
            raise ValueError(f'MLLA attention needs channels divisible by 4 and by num_heads '
                             f'into even heads; got dim {dim}, {num_heads} heads')
        self.dim, self.num_heads = dim, num_heads
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        heads = self.num_heads
        tokens = x.reshape(b, h * w, c)
        q, k = self.qk(tokens).view(b, h * w, 2, c).unbind(2)
        rotations = rope_rotations((h, w), heads, c // heads, device=x.device)
        out = merge_heads(attention('mlla', split_heads(q, heads), split_heads(k, heads),
                                    split_heads(tokens, heads), rotations=rotations))
        return out.view(b, h, w, c) + _nhwc(self.lepe(_nchw(x)))


class MLLABlock(nn.Module):
    """The MLLA block on ``(B, H, W, C)``::

        x = x + cpe1(x)
        x = x + out_proj(attn(SiLU(dwc(in_proj(norm1(x))))) * SiLU(act_proj(norm1(x))))
        x = x + cpe2(x)
        x = x + mlp(norm2(x))

    (``cpe`` are depthwise 3x3 convolutions; drop path on the two residual branches.)
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., drop_path: float = 0.) -> None:
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = MLLAAttention(dim, num_heads, qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + _nhwc(self.cpe1(_nchw(x)))
        y = self.norm1(x)
        gate = self.act(self.act_proj(y))
        y = self.act(_nhwc(self.dwc(_nchw(self.in_proj(y)))))
        x = x + self.drop_path(self.out_proj(self.attn(y) * gate))
        x = x + _nhwc(self.cpe2(_nchw(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
