"""MLLA's building blocks (Mamba-like linear attention, Han et al., NeurIPS 2024), with
the released parameter names.

Every module here maps channels-last maps ``(B, H, W, C)`` (the stem takes the NCHW
image). Sizes are whatever the input has: the release fixes its RoPE and its stem's
input check to the training size; here RoPE is computed for the map at hand
(:func:`mmlinattn.ops.rope_rotations`), and odd maps are padded before a merge as the
release's detection backbone does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ...ops import apply_rope, attention, get_kernel, linear, rope_rotations
from ...ops.inline import InLineSums
from ...parallel import SpatialGroup, current_group, halo_rows, row_spans, summing_over
from ...utils.spill import new_map
from .chunked import OwnBands, row_bands
from .linear import Linear
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


def recomputed_rows(fn: Callable[[Tensor], Tensor], x: Tensor, axis: int, stride: int,
                    halo: int, r0: int, r1: int, offset: int = 0,
                    height: Optional[int] = None) -> Tensor:
    """Output rows ``[r0, r1)`` of ``fn(x)`` for a stack of convolutions of overall
    ``stride`` whose output row ``r`` reads input rows within ``halo`` of
    ``[r stride, (r + 1) stride)``: ``fn`` runs on those input rows only and the rows its
    slice borders can reach are dropped. ``halo`` is a multiple of ``stride``, so the
    slice keeps the strided grid's phase; at the map's borders the slice ends where the
    map does and ``fn``'s own zero padding applies as on the whole map.

    ``x`` holds the input's rows from ``offset`` (along ``axis``) of a map of ``height``
    rows (default: ``x`` ends the map). ``fn`` returns channels-last ``(B, rows, W, C)``.
    """
    height = x.shape[axis] + offset if height is None else height
    lo, hi = max(0, r0 * stride - halo), min(height, r1 * stride + halo)
    if lo < offset or hi > offset + x.shape[axis]:
        raise ValueError(f'rows [{lo}, {hi}) are needed; the band holds '
                         f'[{offset}, {offset + x.shape[axis]})')
    first = lo // stride
    return fn(x.narrow(axis, lo - offset, hi - lo))[:, r0 - first:r1 - first]


class _RowsByRecompute:
    """``out_rows``, ``rows_out``, ``row_geometry`` and ``forward_rows`` (the interface of
    chunked and sharded embeddings) for a convolution stack of stride ``row_stride``
    whose outputs read within ``row_halo`` input rows (:func:`recomputed_rows`)."""

    row_axis: int
    row_stride: int
    row_halo: int

    def rows_out(self, height: int) -> int:
        return -(-height // self.row_stride)

    def out_rows(self, x: Tensor) -> int:
        return self.rows_out(x.shape[self.row_axis])

    @property
    def row_geometry(self) -> tuple[int, int, int, int]:
        """``(row axis, kernel, stride, padding)``: output rows ``[r0, r1)`` read input rows
        ``[r0 s - halo, r1 s + halo)``."""
        return self.row_axis, 2 * self.row_halo + self.row_stride, self.row_stride, \
            self.row_halo

    def forward_rows(self, x: Tensor, r0: int, r1: int, offset: int = 0,
                     height: Optional[int] = None) -> Tensor:
        return recomputed_rows(self, x, self.row_axis, self.row_stride, self.row_halo, r0, r1,
                               offset, height)


class MLLAStem(_RowsByRecompute, nn.Module):
    """The stride-4 convolutional stem: image ``(B, C_in, H, W)`` -> ``(B, H/4, W/4, dim)``
    (rounded up: the image is zero-padded at the bottom and right to a multiple of 4)."""

    # Output row r reads image rows 4r - 7 ... 4r + 7 (3x3/2, two 3x3/1, 3x3/2).
    row_axis, row_stride, row_halo = 2, 4, 8

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


class MLLAMerge(_RowsByRecompute, nn.Module):
    """Downsampling between stages: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``
    by a 1x1 expansion (x4), a stride-2 depthwise 3x3 and a 1x1 projection. Odd maps
    get a zero row / column at the bottom / right first."""

    # Output row r reads input rows 2r - 1 ... 2r + 1 (channels-last input: rows on axis 1).
    row_axis, row_stride, row_halo = 1, 2, 2

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
        self.qk = Linear(dim, dim * 2, bias=qkv_bias)
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
        self.in_proj = Linear(dim, dim)
        self.act_proj = Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = MLLAAttention(dim, num_heads, qkv_bias)
        self.out_proj = Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    #: Rows of input each output row reads beyond itself: cpe1 and dwc before the
    #: attention's values (2), LePE and cpe2 after it (2).
    halo = 4

    def _branch_inputs(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x + cpe1(x)``, the gate and the attention's input ``y`` for rows ``xs``."""
        x1 = xs + _nhwc(self.cpe1(_nchw(xs)))
        t = self.norm1(x1)
        return x1, self.act(self.act_proj(t)), self.act(_nhwc(self.dwc(_nchw(self.in_proj(t)))))

    def _kernelised(self, y: Tensor, part: int, row0: int) -> tuple[Tensor, Tensor]:
        """``phi(q)`` (part 0) or ``phi(k)`` (part 1) of ``y (B, rows, W, C)`` whose first
        row is the map's row ``row0``, ``(B, heads, n, d)`` in float32 (float64 for
        float64 inputs), and its RoPE."""
        b, rows, w, c = y.shape
        heads = self.attn.num_heads
        qk = self.attn.qk
        bias = None if qk.bias is None else qk.bias[part * c:(part + 1) * c]
        t = linear(y.reshape(b, rows * w, c), qk.weight[part * c:(part + 1) * c], bias)
        rot = rope_rotations((rows, w), heads, c // heads, row_offset=row0, device=y.device)
        t = split_heads(t, heads)
        return get_kernel('elu1')(t if t.dtype == torch.float64 else t.float()), rot

    def _collect(self, sums: InLineSums, xs: Tensor, lo: int, r0: int, r1: int) -> None:
        """Add rows ``[r0, r1)`` to the attention's sums, from the rows ``xs`` of the
        block input starting at row ``lo`` (2 rows around them where the map has them)."""
        y = self._branch_inputs(xs)[2][:, r0 - lo:r1 - lo]
        k, rot = self._kernelised(y, 1, r0)
        v = split_heads(y.reshape(y.shape[0], -1, y.shape[-1]), self.attn.num_heads)
        sums.add(apply_rope(k, rot), v, mean_keys=k)

    def _finish(self, xs: Tensor, lo: int, r0: int, r1: int, sums: InLineSums) -> Tensor:
        """The block's output rows ``[r0, r1)`` from the rows ``xs`` of its input starting
        at row ``lo`` (4 rows around them where the map has them) and the sums over
        every token of the map."""
        x1, gate, y = self._branch_inputs(xs)
        b, rows, w, c = y.shape
        kbar, _, kv = sums.means()
        q, rot = self._kernelised(y, 0, lo)
        with torch.autocast(y.device.type, enabled=False):
            a = (apply_rope(q, rot).to(kv.dtype) @ kv) / (q.to(kv.dtype) @ kbar.transpose(-2, -1)
                                                           + 1e-6)
        a = merge_heads(a).to(y.dtype).view(b, rows, w, c) + _nhwc(self.attn.lepe(_nchw(y)))
        x2 = x1 + self.drop_path(self.out_proj(a * gate))
        x3 = (x2 + _nhwc(self.cpe2(_nchw(x2))))[:, r0 - lo:r1 - lo]
        return x3 + self.drop_path(self.mlp(self.norm2(x3)))

    def forward_bands(self, x: Tensor, rows: int) -> Tensor:
        """Token-chunked inference (:class:`~.chunked.OwnBands`): pass 1 sums the
        attention's statistics band by band (each band's values from 2 rows around it),
        pass 2 computes each band's output from 4 rows around it."""
        h = x.shape[1]
        sums = InLineSums()
        for r0, r1 in row_bands(h, rows):
            lo = max(0, r0 - self.halo // 2)
            self._collect(sums, x[:, lo:min(h, r1 + self.halo // 2)], lo, r0, r1)
        out = new_map(x.shape, x.dtype, x.device)
        for r0, r1 in row_bands(h, rows):
            lo = max(0, r0 - self.halo)
            out[:, r0:r1] = self._finish(x[:, lo:min(h, r1 + self.halo)], lo, r0, r1, sums)
        return out

    def chunk_plan(self, x: Tensor) -> OwnBands:
        return OwnBands(self.forward_bands)

    def _forward_sharded(self, x: Tensor, group: SpatialGroup) -> Tensor:
        """This rank's rows of the block (spatial parallelism): 4 rows of each neighbour
        (none beyond the map), the attention's sums reduced over the group."""
        h = x.shape[1]
        spans = row_spans(h, group)
        g0, g1 = spans.mine
        # Neighbours' rows only where the map has them (a small map's ranks hold few rows).
        top, bottom = min(self.halo, g0), min(self.halo, spans.total - g1)
        xs = halo_rows(x, 1, self.halo, self.halo, group)
        xs = xs[:, self.halo - top:self.halo + h + bottom]
        sums = InLineSums()
        self._collect(sums, xs, g0 - top, g0, g1)
        sums.reduce(summing_over(group))
        return self._finish(xs, g0 - top, g0, g1, sums)

    def forward(self, x: Tensor) -> Tensor:
        group = current_group()
        if group is not None:
            return self._forward_sharded(x, group)
        x = x + _nhwc(self.cpe1(_nchw(x)))
        y = self.norm1(x)
        gate = self.act(self.act_proj(y))
        y = self.act(_nhwc(self.dwc(_nchw(self.in_proj(y)))))
        x = x + self.drop_path(self.out_proj(self.attn(y) * gate))
        x = x + _nhwc(self.cpe2(_nchw(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
