"""Padding to a multiple, window partitioning and the validity masks that go with them.

Feature maps are channels-last ``(B, H, W, C)`` throughout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import exporting

__all__ = ['ceil_to', 'pad_to', 'pad_to_multiple', 'window_partition', 'window_merge', 'valid_mask']


def ceil_to(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``.

    Written as ``multiple * floor((n + multiple - 1) / multiple)``: for a symbolic ``n``
    (an export with dynamic sizes) that form is divisible by ``multiple`` by
    construction, whereas ``n + (m - n % m) % m`` is not provably so and every later
    reshape by the window would be refused as a guard on the size.
    """
    return (n + multiple - 1) // multiple * multiple


def pad_to(x: Tensor, h: int, w: int) -> Tensor:
    """Zero-pad ``(B, H, W, C)`` at the bottom/right to ``(B, h, w, C)`` (``h >= H``, ``w >= W``).

    Eagerly a map already of that size is returned as is; under an export the pad is
    always in the graph (of zero width at sizes that need none).
    """
    pad_h, pad_w = h - x.shape[1], w - x.shape[2]
    if not exporting() and pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


def pad_to_multiple(x: Tensor, multiple_h: int, multiple_w: Optional[int] = None) -> Tensor:
    """Zero-pad ``(B, H, W, C)`` at the bottom/right up to multiples of the given sizes."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    return pad_to(x, ceil_to(x.shape[1], multiple_h), ceil_to(x.shape[2], multiple_w))


def valid_mask(batch: int, h: int, w: int, padded_h: int, padded_w: int,
               device: torch.device) -> Tensor:
    """``(batch, padded_h, padded_w)`` bool, True on the top-left ``h x w`` region."""
    mask = torch.zeros(padded_h, padded_w, dtype=torch.bool, device=device)
    mask[:h, :w] = True
    return mask.expand(batch, padded_h, padded_w)


def window_partition(x: Tensor, wh: int, ww: Optional[int] = None) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * nH * nW, wh, ww, C)``; H, W must be multiples of the window."""
    ww = wh if ww is None else ww
    b, h, w, c = x.shape
    if h % wh or w % ww:
        raise ValueError(f'map {h}x{w} is not a multiple of the window {wh}x{ww}; pad it first')
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh, ww, c)


def window_merge(windows: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nH * nW, wh, ww, C)`` -> ``(B, h, w, C)``."""
    nwin, wh, ww, c = windows.shape
    b = nwin // ((h // wh) * (w // ww))
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)
