"""Patch embedding and Swin's patch merging, for any input size."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import ceil_to, exporting, pad_to_multiple
from .chunked import conv2d_rows, conv_out_rows
from .linear import Linear

__all__ = ['PatchEmbed', 'PatchMerging', 'ConvRows']


class ConvRows:
    """The row interface (token-chunked bands, spatial shards) of a module whose output
    is one convolution followed by token-wise work (a LayerNorm): CSwin's stem and
    merges, PVT v2's overlapping embeddings.

    Subclasses give ``row_conv`` (the convolution), ``channels_last_input`` (input
    ``(B, H, W, C)`` rather than NCHW) and ``after_conv(y)`` for the convolution's
    output ``y (B, rows, W, C)``.
    """

    channels_last_input: bool = False

    @property
    def row_conv(self) -> nn.Conv2d:
        raise NotImplementedError

    def after_conv(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def row_geometry(self) -> tuple[int, int, int, int]:
        """``(row axis of the input, kernel, stride, padding)`` along the rows."""
        conv = self.row_conv
        return (1 if self.channels_last_input else 2, conv.kernel_size[0], conv.stride[0],
                conv.padding[0])

    def rows_out(self, height: int) -> int:
        """Output rows for ``height`` input rows."""
        return conv_out_rows(self.row_conv, height)

    def out_rows(self, x: Tensor) -> int:
        """Output rows for the module's usual input ``x``."""
        return self.rows_out(x.shape[self.row_geometry[0]])

    def forward_rows(self, x: Tensor, r0: int, r1: int, offset: int = 0,
                     height: Optional[int] = None) -> Tensor:
        """Output rows ``[r0, r1)`` of ``forward(x)`` from the input rows they read
        (``x`` holds the input's rows from ``offset`` of a ``height``-row input)."""
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        y = conv2d_rows(self.row_conv, x, r0, r1, offset=offset, height=height)
        return self.after_conv(y.permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Strided convolution + LayerNorm: ``(B, C_in, H, W)`` -> ``(B, H', W', C)``.

    Sides that are not multiples of the patch size ``p``: with ``remainder='pad'``
    they are zero-padded at the bottom/right first (``H' = ceil(H / p)``, as Swin's and
    MMDetection's patch embeddings); with ``'drop'`` the last ``H mod p`` rows and
    columns are left out (``H' = floor(H / p)``, an unpadded strided convolution, as
    PVT's released detection backbones). Parameters ``proj``, ``norm`` (``norm=False``:
    no normalisation, as ViT/DeiT).
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int,
                 norm_eps: float = 1e-5, norm: bool = True, remainder: str = 'pad') -> None:
        super().__init__()
        if remainder not in ('pad', 'drop'):
            raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.remainder = remainder
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'expected an NCHW input with {self.in_channels} channels, got shape '
                             f'{tuple(x.shape)} (check in_channels / the data pipeline)')
        p = self.patch_size
        h, w = x.shape[-2:]
        if self.remainder == 'drop':
            if exporting() or h % p or w % p:  # the export graph crops at every size
                x = x[:, :, :h // p * p, :w // p * p]
        elif exporting() or h % p or w % p:  # the export graph pads at every size
            x = F.pad(x, (0, ceil_to(w, p) - w, 0, ceil_to(h, p) - h))
        # Channels-last in, channels-last out: the (B, H, W, C) view of the result is
        # contiguous, so neither the convolution nor the norm copies a layout.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def out_rows(self, x: Tensor) -> int:
        """Output rows for an NCHW input ``x``: ``ceil(H / p)`` (``floor`` with ``'drop'``)."""
        return self.rows_out(x.shape[2])

    def rows_out(self, height: int) -> int:
        """Output rows for ``height`` input rows: ``ceil(H / p)`` (``floor`` with ``'drop'``)."""
        if self.remainder == 'drop':
            return height // self.patch_size
        return -(-height // self.patch_size)

    @property
    def row_geometry(self) -> tuple[int, int, int, int]:
        """``(row axis of the input, kernel, stride, padding)`` along the rows."""
        return 2, self.patch_size, self.patch_size, 0

    def forward_rows(self, x: Tensor, r0: int, r1: int, offset: int = 0,
                     height: Optional[int] = None) -> Tensor:
        """Output rows ``[r0, r1)`` of ``forward(x)`` from input rows ``[r0 p, r1 p)``
        (chunked inference, spatial bands: ``x`` holds the rows from ``offset`` of a
        ``height``-row input); ``(B, r1 - r0, W', C)``."""
        p = self.patch_size
        if self.remainder == 'drop':
            x = x[..., :x.shape[3] // p * p]
        out = conv2d_rows(self.proj, x, r0, r1, pad_right=ceil_to(x.shape[3], p) - x.shape[3],
                          channels_last=True, offset=offset, height=height)
        return self.norm(out.permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2x2 merge: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``.

    Concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]
    (odd sides zero-padded), LayerNorm(4C), Linear(4C, 2C) without bias.
    """

    def __init__(self, dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(x, 2)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x))

    def out_rows(self, x: Tensor) -> int:
        """Output rows for a ``(B, H, W, C)`` input: ``ceil(H / 2)``."""
        return self.rows_out(x.shape[1])

    def rows_out(self, height: int) -> int:
        return -(-height // 2)

    #: ``(row axis of the input, kernel, stride, padding)`` along the rows.
    row_geometry = (1, 2, 2, 0)

    def forward_rows(self, x: Tensor, r0: int, r1: int, offset: int = 0,
                     height: Optional[int] = None) -> Tensor:
        """Output rows ``[r0, r1)`` of ``forward(x)``: the merge of input rows
        ``[2 r0, 2 r1)`` (``x`` holds the input's rows from ``offset`` on)."""
        return self.forward(x[:, 2 * r0 - offset:2 * r1 - offset])
