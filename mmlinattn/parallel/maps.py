"""Layers over row-sharded maps: each rank holds a band of rows, results equal the
whole-map computation.

* :func:`strided_rows` runs anything that computes output rows ``[r0, r1)`` from
  input rows ``[r0 s - p, (r1 - 1) s - p + k)`` (convolutions, patch embeddings,
  merges): the rank fetches the few rows it lacks from its neighbours.
* :func:`conv2d` is that for an ``nn.Conv2d`` (or its parameters).
* :func:`resize` is ``F.interpolate`` (bilinear or nearest) to another map's rows:
  the source rows of each output row are computed as torch computes them.
* :func:`batch_norm` normalises with moments over the whole group (SyncBN semantics,
  on any device and backend).
* :func:`mean_tokens` / :func:`global_sum` are means and sums over every rank's rows.

Ownership: a map produced with row stride ``s`` from a map whose rank ``r`` holds
rows from ``a_r`` gives rank ``r`` the output rows from ``ceil(a_r / s)``; bands cut
on multiples of the coarsest stride (what :func:`image_bands` does) make this exact
at every level, so only kernels that overlap band borders move rows.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import conv2d_rows, conv_out_rows
from .comm import RowSpans, all_reduce_sum, fetch_rows, gather_rows, own_rows, row_spans
from .group import SpatialGroup, current_group, suspended

__all__ = ['image_bands', 'strided_spans', 'strided_rows', 'conv2d', 'resize', 'resized_rows',
           'batch_norm',
           'global_sum', 'mean_tokens', 'source_rows', 'split_rows', 'halo_rows', 'gathered']


def image_bands(height: int, size: int, unit: int = 32) -> list[tuple[int, int]]:
    """Rows ``[a, b)`` of an image of ``height`` rows for each of ``size`` ranks: bands
    of whole ``unit``-row blocks as even as possible, the remainder on the last rank.

    Raises ``ValueError`` when the image has fewer ``unit``-row blocks than ranks.
    """
    blocks = math.ceil(height / unit)
    if size < 1:
        raise ValueError(f'spatial size must be >= 1, got {size}')
    if blocks < size:
        raise ValueError(
            f'an image of {height} rows has {blocks} rows at the coarsest stride ({unit} px), '
            f'fewer than the {size} ranks of the spatial group: use fewer spatial ranks or a '
            f'taller image (at least {unit * (size - 1) + 1} rows)')
    per, extra = divmod(blocks, size)
    bounds = [0]
    for r in range(size):
        bounds.append(bounds[-1] + (per + (1 if r < extra else 0)) * unit)
    bounds[-1] = height
    return [(bounds[r], bounds[r + 1]) for r in range(size)]


def strided_spans(spans: RowSpans, stride: int, out_total: int) -> RowSpans:
    """Output ownership for a row stride ``stride``: rank r from ``ceil(a_r / stride)``."""
    starts = [min(out_total, -(-a // stride)) for a in spans.starts[:-1]] + [out_total]
    return RowSpans(tuple(starts), spans.rank)


def strided_rows(fn: Callable[[Tensor, int, int, int, int], Tensor], x: Tensor, dim: int,
                 kernel: int, stride: int, padding: int, out_total_of: Callable[[int], int],
                 g: SpatialGroup) -> Tensor:
    """Output rows of a row-local operator over a sharded map.

    ``fn(band, r0, r1, offset, H)`` must return global output rows ``[r0, r1)`` from
    ``band``, which holds global input rows from ``offset`` on (exactly the rows
    ``[r0 s - p, (r1 - 1) s - p + k)`` within ``[0, H)`` of the ``H``-row input);
    ``out_total_of(H)`` is the output height of an input of ``H`` rows.
    """
    spans = row_spans(x.shape[dim], g)
    out = strided_spans(spans, stride, out_total_of(spans.total))
    needs = []
    for r in range(g.size):
        r0, r1 = out.span(r)
        lo = max(0, r0 * stride - padding)
        hi = min(spans.total, (r1 - 1) * stride - padding + kernel) if r1 > r0 else lo
        needs.append((lo, max(lo, hi)))
    band = fetch_rows(x, dim, spans, needs, g)
    r0, r1 = out.mine
    return fn(band, r0, r1, needs[g.rank][0], spans.total)


def conv2d(conv: nn.Conv2d, x: Tensor, g: SpatialGroup) -> Tensor:
    """``conv(x)`` for an NCHW band ``x``: this rank's output rows (zero padding only
    at the top and bottom of the whole map)."""
    if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise ValueError(f'spatial parallelism needs numeric zero padding; got {conv}')
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]

    def rows(band: Tensor, r0: int, r1: int, offset: int, height: int) -> Tensor:
        return conv2d_rows(conv, band, r0, r1, offset=offset, height=height)

    return strided_rows(rows, x, 2, d * (k - 1) + 1, s, p,
                        lambda h: conv_out_rows(conv, h), g)


def source_rows(in_rows: int, out_rows: int, mode: str, align_corners: Optional[bool],
                scale_factor: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """For every output row of ``F.interpolate`` along one axis: the two source rows
    and the weight of the second, ``(i0, i1, lambda1)``, computed as torch's CPU
    kernels compute them (float32 arithmetic)."""
    dst = torch.arange(out_rows, dtype=torch.float32)
    # torch: 1 / scale_factor when one is given, else in / out, in float32
    scale = (torch.tensor(1.0 / scale_factor, dtype=torch.float32) if scale_factor
             else torch.tensor(in_rows, dtype=torch.float32) / out_rows)
    if mode == 'nearest':
        if out_rows == in_rows:
            idx = torch.arange(out_rows)
        elif out_rows == 2 * in_rows:
            idx = torch.arange(out_rows) // 2
        else:
            idx = torch.floor(dst * scale).long().clamp_max(in_rows - 1)
        return idx, idx, torch.zeros(out_rows)
    if mode != 'bilinear':
        raise ValueError(f'spatially sharded resize supports bilinear and nearest, not {mode!r}')
    if out_rows == in_rows:
        idx = torch.arange(out_rows)
        return idx, idx, torch.zeros(out_rows)
    if align_corners:
        src = dst * torch.tensor((in_rows - 1) / (out_rows - 1) if out_rows > 1 else 0.,
                                 dtype=torch.float32)
    else:
        src = (scale * (dst + 0.5) - 0.5).clamp_min(0.)
    i0 = torch.floor(src).long().clamp_max(in_rows - 1)
    lam = (src - i0.float()).clamp(0., 1.)
    i1 = torch.where(i0 < in_rows - 1, i0 + 1, i0)
    return i0, i1, lam


def resize(x: Tensor, out_spans: RowSpans, width: int, mode: str = 'bilinear',
           align_corners: Optional[bool] = False, scale_factor: Optional[float] = None,
           g: Optional[SpatialGroup] = None, spans: Optional[RowSpans] = None) -> Tensor:
    """``F.interpolate(x, size=(out_total, width))`` for an NCHW band: this rank's
    output rows ``out_spans.mine``, reading the source rows they need (fetched from
    neighbours when ``g`` is given, else ``x`` is the whole map on every rank)."""
    in_spans = spans if spans is not None else (
        row_spans(x.shape[2], g) if g is not None else RowSpans((0, x.shape[2]), 0))
    i0, i1, lam = source_rows(in_spans.total, out_spans.total, mode, align_corners,
                              scale_factor)
    if g is not None:
        needs = []
        for r in range(out_spans.size):
            a, b = out_spans.span(r)
            needs.append((int(i0[a]), int(i1[b - 1]) + 1) if b > a else (0, 0))
        lo = needs[out_spans.rank][0]
        band = fetch_rows(x, 2, in_spans, needs, g)
    else:
        lo, band = 0, x
    a, b = out_spans.mine
    i0, i1, lam = i0[a:b] - lo, i1[a:b] - lo, lam[a:b].to(x.dtype)
    rows = band.index_select(2, i0)
    if mode == 'bilinear':
        lam = lam.view(1, 1, -1, 1)
        rows = rows * (1 - lam) + band.index_select(2, i1) * lam
    if rows.shape[3] == width:
        return rows
    # The same height in and out: interpolate reads each row as it is (weight 1, 0).
    return F.interpolate(rows, size=(rows.shape[2], width), mode=mode,
                         align_corners=align_corners if mode == 'bilinear' else None)


def resized_rows(src: Tensor, size: tuple[int, int], r0: int, r1: int) -> Tensor:
    """Rows ``[r0, r1)`` of a bilinear (``align_corners=False``) resize of the small NCHW
    map ``src`` to ``size``, computed without the whole output: columns first (a
    ``(src rows, W)`` map), then each output row blended from its two source rows.
    Equal to the whole resize up to float rounding (about 1e-7 relative)."""
    h, w = size
    cols = F.interpolate(src, size=(src.shape[2], w), mode='bilinear', align_corners=False)
    i0, i1, lam = source_rows(src.shape[2], h, 'bilinear', False)
    i0, i1, lam = i0[r0:r1], i1[r0:r1], lam[r0:r1].to(src.dtype).view(1, 1, -1, 1)
    return cols.index_select(2, i0) * (1 - lam) + cols.index_select(2, i1) * lam


def global_sum(t: Tensor, g: SpatialGroup) -> Tensor:
    """Sum over the group of ``t`` (differentiable)."""
    return all_reduce_sum(t, g)


def mean_tokens(tokens: Tensor, g: SpatialGroup, mask: Optional[Tensor] = None) -> Tensor:
    """Mean over the tokens of every rank of ``(B, n, C)``; ``mask (B, n)`` True for
    tokens that count. ``(B, C)``."""
    if mask is None:
        total = tokens.sum(dim=1)
        count = tokens.new_full((tokens.shape[0], 1), tokens.shape[1])
    else:
        m = mask[..., None].to(tokens.dtype)
        total, count = (tokens * m).sum(dim=1), m.sum(dim=1)
    packed = global_sum(torch.cat([total, count], dim=1), g)
    return packed[:, :-1] / packed[:, -1:].clamp_min(1.0)


class _SyncBatchNorm(torch.autograd.Function):
    """Normalisation with moments over the group; keeps only ``x`` and per-channel
    statistics for backward (as torch's SyncBatchNorm): ``dx = w invstd (dy - mean(dy)
    - xhat mean(dy xhat))`` with both means over the group, the weight and bias
    gradients this rank's share (the wrapper sums them)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                g: SpatialGroup) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        n_local = float(x.numel() // c)
        packed = torch.cat([x.sum(dim=dims, dtype=acc), x.new_full((1, ), n_local, dtype=acc)])
        packed = all_reduce_sum(packed, g)
        count = packed[-1]
        mean = packed[:c] / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape).to(x.dtype)
        var = all_reduce_sum((centred * centred).sum(dim=dims, dtype=acc), g) / count
        invstd = torch.rsqrt(var + eps)
        out = centred.mul_(invstd.view(shape).to(x.dtype))
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.g, ctx.count = g, count
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    def backward(ctx, dy: Tensor, *_: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        g, count = ctx.g, ctx.count
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        c = x.shape[1]
        xhat = (x - mean.view(shape).to(x.dtype)) * invstd.view(shape).to(x.dtype)
        sum_dy = dy.sum(dim=dims, dtype=invstd.dtype)
        sum_dy_xhat = (dy * xhat).sum(dim=dims, dtype=invstd.dtype)
        total = all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]), g)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        dx = (dy - (total[:c] / count).view(shape).to(dy.dtype)
              - xhat * (total[c:] / count).view(shape).to(dy.dtype)) * scale.view(shape).to(
                  dy.dtype)
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        db = sum_dy.to(weight.dtype) if weight is not None else None
        return dx, dw, db, None, None


def batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, g: SpatialGroup) -> Tensor:
    """``bn(x)`` with batch moments over the whole map of every rank (SyncBN semantics
    within the spatial group, on CPU too). Eval mode uses the running statistics."""
    use_batch = bn.training or not bn.track_running_stats
    if not use_batch:
        return bn(x)
    out, mean, var, count = _SyncBatchNorm.apply(x, bn.weight if bn.affine else None,
                                                 bn.bias if bn.affine else None, bn.eps, g)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                        else bn.momentum)
            n = float(count)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            bn.running_var.mul_(1 - momentum).add_(
                var.detach() * (n / max(n - 1, 1.0)) * momentum)
    return out


def split_rows(x: Tensor, dim: int, bands: Sequence[tuple[int, int]], rank: int) -> Tensor:
    """This rank's band of a whole tensor (the image and its labels)."""
    a, b = bands[rank]
    return x.narrow(dim, a, b - a)


def halo_rows(x: Tensor, dim: int, top: int, bottom: int, g: SpatialGroup) -> Tensor:
    """``x`` with ``top`` rows of the rank above and ``bottom`` of the rank below
    (zeros beyond the map's top and bottom): for stride-1 kernels of ``top + bottom + 1``
    rows. Differentiable."""
    spans = row_spans(x.shape[dim], g)
    needs = [(a - top, b + bottom) for a, b in (spans.span(r) for r in range(g.size))]
    return fetch_rows(x, dim, spans, needs, g)


def gathered(fn: Callable[..., Tensor], *maps: Tensor, dim: int = 1) -> Tensor:
    """``fn`` on the whole maps (gathered from every rank); this rank's rows of its
    result. For attention confined to windows or stripes on small maps: each rank
    holds the whole map's activations of ``fn`` and computes all of it."""
    g = current_group()
    if g is None:
        return fn(*maps)
    spans = row_spans(maps[0].shape[dim], g)
    full = [gather_rows(m, dim, spans, g) for m in maps]
    with suspended():
        out = fn(*full)
    return own_rows(out, dim, spans)
