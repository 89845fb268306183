"""Attention modules over channels-last feature maps ``(B, H, W, C)``.

:class:`InLineAttention` is the InLine attention module of Swin, PVT and DeiT
(global or windowed, ``qkv`` or ``q``/``kv`` projections, with the local
residual); CSwin's branches share its region cutting and head attention
(:mod:`.regions`). Its ``operator`` switch swaps in plain linear or global
softmax attention for ablations with an identical parameter layout.
:class:`WindowSoftmaxAttention` is Swin's shifted-window softmax attention with
relative position bias, for the softmax stages of InLine-Swin.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ...ops import (
    QKV_ATTENTIONS,
    SUMMED_ATTENTIONS,
    exporting,
    pad_to_multiple,
    resolve_kernel,
    valid_mask,
    window_merge,
    window_partition,
)
from ...ops.inline import KernelArg
from ...parallel import SpatialGroup, current_group, gathered, mean_tokens, summing_over
from .chunked import BandPlan, InLineBlockParts
from .linear import Linear
from .local_residual import LocalResidual, masked_mean
from .projection import QKVProjection
from .regions import (
    RegionGrid,
    attend_heads,
    check_map,
    check_tokens,
    merge_heads,
    split_heads,
    window_region,
)

__all__ = ['InLineAttention', 'WindowSoftmaxAttention', 'GlobalSoftmaxAttention', 'split_heads',
           'merge_heads']


class InLineAttention(QKVProjection):
    """InLine attention with the local residual, globally or in windows.

    Args:
        dim: channels ``C``.
        num_heads: heads; ``C`` must be divisible by it.
        qkv_layout: ``'qkv'`` (one Linear split as [q | k | v], Swin/DeiT) or
            ``'q_kv'`` (a ``q`` Linear and a ``kv`` Linear split [k | v], PVT).
        window_size: None for global attention over the whole map; an int for
            non-overlapping windows (the map is zero-padded to a multiple). A map no
            larger than the window is one window.
        operator: the attention, ``'inline'`` (default), ``'linear'``
            (division-normalised, non-injective) or ``'softmax'`` (global), with
            the same parameters (ablations).
        kernel: ``phi`` for q and k; ``'default'`` is the attention's own
            (identity for InLine, ReLU for linear, none for softmax).
        impl: the implementation (:mod:`mmlinattn.ops.implementations`), ``'auto'``
            for the best one available for the input.
        local_residual: add the 3x3 local term (``residual.*`` parameters).
        qkv_bias: bias of the projections.
        proj_drop: dropout after the output projection.
        pad_mask: in windows, the padding is masked out of the attention, the means and
            the local term (True), or its tokens (zeros before the projections) take
            part like any other (False, as MMDetection's Swin treats its padding).

    Shapes: ``forward(x: (B, H, W, C)) -> (B, H, W, C)``.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qkv_layout: str = 'qkv',
                 window_size: Optional[int] = None,
                 operator: str = 'inline',
                 kernel: KernelArg = 'default',
                 impl: str = 'auto',
                 local_residual: bool = True,
                 qkv_bias: bool = True,
                 proj_drop: float = 0.,
                 pad_mask: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if operator not in QKV_ATTENTIONS:
            raise ValueError(f'unknown attention operator {operator!r}; '
                             f'expected one of {sorted(QKV_ATTENTIONS)}')
        if window_size is not None and window_size < 1:
            raise ValueError(f'window_size must be a positive int or None, got {window_size}')
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.pad_mask = pad_mask
        self.operator = operator
        self.kernel = resolve_kernel(operator, kernel)
        self.impl = impl
        self.add_projections(dim, qkv_layout, qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.residual = LocalResidual(dim, num_heads) if local_residual else None

    def extra_repr(self) -> str:
        window = 'global' if self.window_size is None else f'window={self.window_size}'
        return (f'dim={self.dim}, num_heads={self.num_heads}, operator={self.operator}, '
                f'kernel={self.kernel}, impl={self.impl}, {window}')

    def chunk_parts(self) -> Optional[InLineBlockParts]:
        """The token-wise pieces for chunked inference (:mod:`.chunked`), for global
        InLine attention; the caller adds the block's norms and MLP."""
        if self.operator != 'inline':
            return None

        def kv(t: Tensor) -> tuple[Tensor, Tensor]:
            return self.project_part(t, 1, 2).unflatten(-1, (2, self.dim)).unbind(-2)

        return InLineBlockParts(
            norm1=nn.Identity(), q=lambda t: self.project_part(t, 0), kv=kv,
            v=lambda t: self.project_part(t, 2),
            proj=lambda a: self.proj_drop(self.proj(a)), norm2=nn.Identity(),
            mlp=nn.Identity(), drop_path=nn.Identity(), num_heads=self.num_heads,
            kernel=self.kernel, residual=self.residual)

    def chunk_plan(self, h: int, w: int) -> Optional[Union[InLineBlockParts, BandPlan]]:
        """How a block around this attention runs chunked on an ``h x w`` map: two passes
        when global InLine, bands of whole windows when windowed, else None."""
        region = self.region(h, w)
        if region is not None:
            return BandPlan(region[0])
        return self.chunk_parts()

    def attend_tokens(self, tokens: Tensor, hw: tuple[int, int], valid: Optional[Tensor] = None,
                      num_prefix: int = 0, group: Optional[SpatialGroup] = None) -> Tensor:
        """Attention over ``tokens (B', P + h*w, C)`` as one region, before ``proj``.

        The first ``num_prefix`` tokens (a class token) take part in the attention
        (they count in N and in the means) but not in the local 3x3 term, which
        runs on the ``h x w`` map of the rest. ``valid (B', h, w)`` marks real map
        tokens (None: all). With ``group`` the map is this rank's rows of the whole
        map (spatial parallelism): the statistics and means are summed over the
        group, and prefix tokens (identical on every rank) count on the first rank
        only. Returns ``(B', P + h*w, C)``.
        """
        b, n, c = tokens.shape
        h, w = hw
        mask = None
        if valid is not None:
            mask = valid.reshape(b, h * w)
            if num_prefix:
                mask = torch.cat([mask.new_ones(b, num_prefix), mask], dim=1)
        if group is not None:
            if valid is not None:
                raise ValueError('a padded (masked) region cannot be spatially sharded')
            if num_prefix:  # a mask on every rank: the reduced counts have one shape
                mask = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
                mask[:, :num_prefix] = group.first
        reduce = None if group is None else summing_over(group)
        q, k, v = self.project(tokens)
        if group is not None:
            group.stats.layers.append((n * group.size, c))  # about: bands are near-equal
        out = attend_heads(self.operator, q, k, v, self.num_heads, mask, self.kernel, self.impl,
                           reduce)
        if self.residual is not None:
            mean = masked_mean(tokens, mask) if group is None else \
                mean_tokens(tokens, group, mask)
            local = self.residual(v[:, num_prefix:].view(b, h, w, c), mean,
                                  valid).reshape(b, h * w, c)
            out = out + local if not num_prefix else torch.cat(
                [out[:, :num_prefix], out[:, num_prefix:] + local], dim=1)
        return out

    def forward_tokens(self, tokens: Tensor, hw: tuple[int, int], num_prefix: int = 0) -> Tensor:
        """Global attention for token sequences with ``num_prefix`` leading non-map tokens
        (DeiT's class token): ``(B, P + h*w, C) -> (B, P + h*w, C)``."""
        check_tokens(self, tokens, hw, num_prefix, self.dim)
        group = current_group()
        if group is not None and self.operator not in SUMMED_ATTENTIONS:
            raise ValueError(f'global {self.operator} attention over class and patch tokens '
                             'cannot be spatially sharded (only summed attentions: '
                             f'{sorted(SUMMED_ATTENTIONS)})')
        return self.proj_drop(self.proj(self.attend_tokens(tokens, hw, None, num_prefix,
                                                           group)))

    def region(self, h: int, w: int) -> Optional[tuple[int, int]]:
        """The attended region for an ``h x w`` map: None (the whole map) or the window."""
        return window_region(self.window_size, h, w)

    def forward(self, x: Tensor) -> Tensor:
        check_map(self, x, self.dim)
        b, h, w, c = x.shape
        group = current_group()
        if group is not None:
            # A band of the map: global summed attention reduces its statistics over
            # the group; windows and softmax run on the gathered map.
            if self.window_size is None and self.operator in SUMMED_ATTENTIONS:
                out = self.attend_tokens(x.reshape(b, h * w, c), (h, w), group=group)
                return self.proj_drop(self.proj(out.view(b, h, w, c)))
            return gathered(self.forward, x)
        grid = RegionGrid(b, h, w, self.region(h, w), x.device)
        regions = grid.split(x)
        rb, rh, rw = regions.shape[:3]
        out = self.attend_tokens(regions.reshape(rb, rh * rw, c), (rh, rw),
                                 grid.valid if self.pad_mask else None)
        return self.proj_drop(self.proj(grid.merge(out.view(rb, rh, rw, c))))


def relative_position_index(window_size: int) -> Tensor:
    """``(ws*ws, ws*ws)`` index into a ``(2ws-1)^2`` relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                        indexing='ij')).flatten(1)  # 2, ws*ws
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def shifted_window_mask(hp: int, wp: int, h: int, w: int, window_size: int, shift: int,
                        device: torch.device, pad_mask: bool = True) -> Optional[Tensor]:
    """Additive ``(nW, ws*ws, ws*ws)`` mask for one (padded, rolled) map, or None.

    -100 between tokens of different cyclic-shift regions (Swin's value) and, with
    ``pad_mask``, towards keys in the bottom/right padding; 0 elsewhere.
    """
    if shift == 0 and (not pad_mask or (hp, wp) == (h, w)) and not exporting():
        return None
    region = torch.zeros(1, hp, wp, 1, device=device)
    if shift > 0:
        cnt = 0
        for hs in (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None)):
            for wsl in (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None)):
                region[:, hs, wsl] = cnt
                cnt += 1
    n = window_size * window_size
    region = window_partition(region, window_size).reshape(-1, n)
    mask = region[:, None, :] != region[:, :, None]
    if pad_mask:
        # Padding is rolled with the map, so build it unrolled and roll it the same way.
        pad = (~valid_mask(1, h, w, hp, wp, device))[..., None].float()
        if shift > 0:
            pad = torch.roll(pad, shifts=(-shift, -shift), dims=(1, 2))
        pad = window_partition(pad, window_size).reshape(-1, n)
        mask = mask | (pad[:, None, :] > 0)
    return mask.float() * -100.0


class WindowSoftmaxAttention(nn.Module):
    """Swin's (shifted) window softmax attention with relative position bias.

    Any map size: the map is zero-padded at the bottom and right to a multiple of the
    window and the cyclic-shift mask is built for the padded size. Two rules for the
    padding (``pad_mask``):

    * ``True``: the padded keys are masked, so a token's output does not depend on how
      far the map is from a multiple of the window, and a map that fits in one window
      is attended unshifted, as Swin's classifiers do.
    * ``False``: every query attends the padded (zero) tokens and every other block is
      shifted whatever the map's size, as MMDetection's Swin and the authors' Agent-Swin
      detection and segmentation code compute it.

    Shapes: ``forward(x: (B, H, W, C)) -> (B, H, W, C)``. Parameters
    ``qkv``, ``proj``, ``relative_position_bias_table`` as in Swin.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 window_size: int = 7,
                 shift_size: int = 0,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 pad_mask: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size must be in [0, {window_size}), got {shift_size}')
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.pad_mask = pad_mask
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1)**2, num_heads))
        # Derived from the window size: not saved, so checkpoints carrying it or not both load.
        self.register_buffer('relative_position_index', relative_position_index(window_size),
                             persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, window={self.window_size}, '
                f'shift={self.shift_size}, pad_mask={self.pad_mask}')

    def forward(self, x: Tensor) -> Tensor:
        check_map(self, x, self.dim)
        if current_group() is not None:
            # Spatially sharded: the (small) map of a softmax stage is gathered; each
            # rank attends the whole map and keeps its rows.
            return gathered(self.forward, x)
        h, w = x.shape[1:3]
        ws = self.window_size
        if not self.pad_mask:  # the downstream rule: shifted at every size
            return self.attend(x, self.shift_size)
        # A map within one window is attended unshifted. Under a dynamic export this
        # test is a guard: a size range on both sides of it fails the export (loudly).
        return self.attend(x, self.shift_size if (h > ws or w > ws) else 0)

    def attend(self, x: Tensor, shift: int) -> Tensor:
        """Window attention of ``x (B, H, W, C)`` with the windows cyclically shifted by
        ``shift`` (0: unshifted) -> ``(B, H, W, C)``."""
        b, h, w, c = x.shape
        ws = self.window_size
        xp = pad_to_multiple(x, ws)
        hp, wp = xp.shape[1:3]
        if shift:
            xp = torch.roll(xp, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(xp, ws)  # (B*nW, ws, ws, C)
        n = ws * ws
        nw = windows.shape[0] // b
        qkv = self.qkv(windows.reshape(-1, n, c))
        heads = self.num_heads
        # Windows and heads share one axis, so attention sees 4-D (B, nW*heads, N, d)
        # operands (what the ONNX exporter supports) and the bias broadcasts over B.
        qkv = qkv.view(b, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, b, nw * heads, n, c // heads).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1)  # heads, N, N
        mask = shifted_window_mask(hp, wp, h, w, ws, shift, x.device, self.pad_mask)
        bias = bias[None] + mask[:, None] if mask is not None else bias.expand(nw, -1, -1, -1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.reshape(nw * heads, n, n).to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.)
        out = out.view(b, nw, heads, n, -1).permute(0, 1, 3, 2, 4).reshape(b * nw, ws, ws, c)
        out = window_merge(out, hp, wp)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return self.proj_drop(self.proj(out[:, :h, :w]))


class GlobalSoftmaxAttention(QKVProjection):
    """ViT's global softmax attention over class and patch tokens (Agent-DeiT-B's last
    blocks): ``qkv`` and ``proj`` as released, nothing else.

    Shapes: ``forward_tokens(tokens: (B, P + h*w, C), (h, w), P) -> (B, P + h*w, C)``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 proj_drop: float = 0.) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim, self.num_heads = dim, num_heads
        self.add_projections(dim, 'qkv', qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'

    def forward_tokens(self, tokens: Tensor, hw: tuple[int, int], num_prefix: int = 0) -> Tensor:
        check_tokens(self, tokens, hw, num_prefix, self.dim)
        if current_group() is not None:
            raise ValueError('global softmax attention over class and patch tokens cannot be '
                             'spatially sharded')
        q, k, v = self.project(tokens)
        out = attend_heads('softmax', q, k, v, self.num_heads, None, None, 'auto')
        return self.proj_drop(self.proj(out))
