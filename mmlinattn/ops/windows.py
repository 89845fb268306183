"""Padding to a multiple, window partitioning and the validity masks that go with them.

Feature maps are channels-last ``(B, H, W, C)`` throughout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['pad_to_multiple', 'window_partition', 'window_merge', 'valid_mask']


def pad_to_multiple(x: Tensor, multiple_h: int, multiple_w: Optional[int] = None) -> Tensor:
    """Zero-pad ``(B, H, W, C)`` at the bottom/right up to multiples of the given sizes."""
    multiple_w = multiple_h if multiple_w is None else multiple_w
    h, w = x.shape[1:3]
    pad_h = (multiple_h - h % multiple_h) % multiple_h
    pad_w = (multiple_w - w % multiple_w) % multiple_w
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


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
