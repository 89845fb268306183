"""Attention over regions of a channels-last map: the whole map, windows or stripes.

Every backbone attends this way: cut the ``(B, H, W, C)`` map into ``wh x ww``
regions (padding it at the bottom/right to a multiple first), attend within each
region with the padding masked, and put the regions back. :class:`RegionGrid`
does the cutting and the one validity mask; :func:`attend_heads` runs an
attention of :mod:`mmlinattn.ops` over the heads of the region tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...ops import (
    attention,
    ceil_to,
    exporting,
    pad_to,
    valid_mask,
    window_merge,
    window_partition,
)
from ...ops.inline import KernelArg

__all__ = ['RegionGrid', 'attend_heads', 'check_map', 'check_tokens', 'split_heads', 'merge_heads',
           'window_region']


def check_tokens(module: object, tokens: Tensor, hw: tuple[int, int], num_prefix: int,
                 dim: int) -> None:
    """Raise a ValueError naming ``module`` unless ``tokens`` are ``(B, P + h*w, dim)``:
    ``P = num_prefix`` class tokens, then an ``h x w`` map."""
    if tokens.dim() != 3 or tokens.shape[-1] != dim or \
            tokens.shape[1] != num_prefix + hw[0] * hw[1]:
        raise ValueError(f'{type(module).__name__} expects (B, {num_prefix} + {hw[0]}*{hw[1]}, '
                         f'{dim}) tokens; got {tuple(tokens.shape)}')


def check_map(module: object, x: Tensor, dim: int) -> None:
    """Raise a ValueError naming ``module`` unless ``x`` is a ``(B, H, W, dim)`` map."""
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ValueError(f'{type(module).__name__} expects (B, H, W, {dim}); '
                         f'got {tuple(x.shape)}')


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(B, N, C)`` -> ``(B, heads, N, C // heads)`` (a view)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, N, d)`` -> ``(B, N, heads * d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def window_region(window: Optional[int], h: int, w: int) -> Optional[tuple[int, int]]:
    """The region an ``h x w`` map is attended in: None (the whole map) without a
    window or, eagerly, when the map fits in one; else ``(window, window)``.

    Under an export the window is kept for small maps too: one padded, masked window
    gives the same result as the whole map, and the graph stays valid at every size.
    """
    if window is None or (not exporting() and h <= window and w <= window):
        return None
    return (window, window)


class RegionGrid:
    """How ``(B, H, W, C)`` maps of one size are cut into ``(wh, ww)`` regions.

    Args:
        batch, h, w: the map's batch and size.
        region: ``(wh, ww)``, or None for the whole map as one region; an entry None
            spans the map along that axis (CSwin's full-height or full-width stripes).
        device: where the validity mask lives.

    Attributes:
        valid: ``(B * nR, wh, ww)`` bool, True on real (unpadded) positions, or None
            when the map is a multiple of the region (nothing is padded).
        mask: the same as ``(B * nR, wh * ww)`` token masks, or None.
    """

    def __init__(self, batch: int, h: int, w: int,
                 region: Optional[tuple[Optional[int], Optional[int]]],
                 device: torch.device) -> None:
        self.size = (h, w)
        self.whole = region is None
        wh, ww = (None, None) if region is None else region
        # A spanning axis is never padded: its padded size is the map's own, not a
        # ceil_to(h, h) that an export could not prove equal to h.
        self.region = (h if wh is None else wh, w if ww is None else ww)
        self.padded = (h if wh is None else ceil_to(h, wh), w if ww is None else ceil_to(w, ww))
        self.valid: Optional[Tensor] = None
        # Under an export the mask is kept even where the export size needs none: the
        # graph must also serve the sizes that do (an all-True mask changes nothing).
        if not self.whole and (exporting() or self.padded != self.size):
            full = valid_mask(batch, h, w, *self.padded, device=device)
            self.valid = window_partition(full[..., None], *self.region)[..., 0]

    @property
    def mask(self) -> Optional[Tensor]:
        return None if self.valid is None else self.valid.reshape(self.valid.shape[0], -1)

    @property
    def num_regions(self) -> int:
        """Regions per map (``nR``)."""
        return (self.padded[0] // self.region[0]) * (self.padded[1] // self.region[1])

    def _one_region(self) -> bool:
        # Eager shortcut; an export always partitions (one region is a plain reshape).
        return not exporting() and self.region == self.padded

    def split(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> ``(B * nR, wh, ww, C)``, zero-padded to whole regions."""
        if self.whole:
            return x
        x = pad_to(x, *self.padded)
        return x if self._one_region() else window_partition(x, *self.region)

    def merge(self, regions: Tensor) -> Tensor:
        """Inverse of :meth:`split`: ``(B * nR, wh, ww, C)`` -> ``(B, H, W, C)``."""
        if self.whole:
            return regions
        h, w = self.size
        x = regions if self._one_region() else window_merge(regions, *self.padded)
        return x if not exporting() and self.padded == self.size else x[:, :h, :w]


def attend_heads(name: str, q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                 mask: Optional[Tensor] = None, kernel: KernelArg = 'default',
                 impl: str = 'auto', reduce: Optional[Callable[[Tensor], Tensor]] = None
                 ) -> Tensor:
    """Attention ``name`` over ``num_heads`` heads of ``(B', N, C)`` tokens -> ``(B', N, C)``.

    ``mask (B', N)``: True for real tokens (None: all); the attention function
    and implementation come from :func:`mmlinattn.ops.attention`; ``reduce`` sums
    over the processes holding the map's other rows (spatial parallelism).
    """
    out = attention(name, split_heads(q, num_heads), split_heads(k, num_heads),
                    split_heads(v, num_heads), mask=mask, kernel=kernel, impl=impl,
                    reduce=reduce)
    return merge_heads(out)
