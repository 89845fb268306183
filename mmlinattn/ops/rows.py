"""Rows of a convolution's output from the rows of its input that they read.

Chunked inference (bands of one map) and spatial parallelism (bands on other
processes) both compute a convolution's output rows ``[r0, r1)`` from a band of its
input; this is that one computation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['conv_out_rows', 'conv2d_rows']


def conv_out_rows(conv: nn.Conv2d, height: int, pad_bottom: int = 0) -> int:
    """Output rows of ``conv`` on ``height`` input rows (plus ``pad_bottom`` zero rows)."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (height + pad_bottom + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d_rows(conv: nn.Conv2d, x: Tensor, r0: int, r1: int, pad_right: int = 0,
                channels_last: bool = False, offset: int = 0,
                height: Optional[int] = None) -> Tensor:
    """Output rows ``[r0, r1)`` of ``conv(x)`` for NCHW ``x``, reading only the input
    rows they need; ``conv``'s zero padding (and ``pad_right`` extra zero columns, with
    zero rows below the map as far as needed) is applied as the whole-map conv would.

    ``x`` may be a band of a taller map: its rows are the map's rows from ``offset``
    on, and the map has ``height`` rows (default: ``x`` ends the map).
    """
    if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise ValueError(f'conv2d_rows needs numeric zero padding; got {conv}')
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    height = x.shape[2] + offset if height is None else height
    lo, hi = r0 * s - p, (r1 - 1) * s - p + d * (k - 1) + 1
    first, stop = max(0, lo), min(height, hi)
    if first < offset or stop > offset + x.shape[2]:
        raise ValueError(f'conv2d_rows: rows [{first}, {stop}) are needed; the band holds '
                         f'[{offset}, {offset + x.shape[2]})')
    band = x[:, :, first - offset:stop - offset]
    pw = conv.padding[1]
    band = F.pad(band, (pw, pw + pad_right, max(0, -lo), max(0, hi - height)))
    if channels_last:
        band = band.contiguous(memory_format=torch.channels_last)
    return F.conv2d(band, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
