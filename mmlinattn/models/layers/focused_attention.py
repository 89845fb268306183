"""Focused linear attention (FLatten) over a whole channels-last map, as released."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import attention, focusing_map
from ...ops.inline import InLineSums
from ...parallel import (
    SpatialGroup,
    current_group,
    halo_rows,
    resized_rows,
    row_spans,
    summing_over,
)
from .chunked import SummedAttentionPlan
from .linear import Linear
from .projection import QKVProjection
from .regions import check_map, merge_heads, split_heads

__all__ = ['FocusedLinearAttention', 'FocusedTables', 'resize_positional_encoding']


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


class FocusedTables(nn.Module):
    """The released parameters of focused linear attention beside its projections, and
    the attention over one map: the base of :class:`FocusedLinearAttention` and of
    FLatten-CSwin's branch. Subclasses call :meth:`add_focused_parts` in ``__init__``.

    Parameters: ``dwc`` (one ``head_dim``-channel depthwise filter shared by the
    heads), ``scale`` ``(1, 1, C)``, ``positional_encoding`` ``(1, gh*gw, C)``.
    """

    dim: int
    num_heads: int
    grid: tuple[int, int]
    focusing_factor: float

    def add_focused_parts(self, dim: int, num_heads: int, grid: tuple[int, int],
                          focusing_factor: float, kernel_size: int) -> None:
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        head_dim = dim // num_heads
        self.dim, self.num_heads, self.grid = dim, num_heads, tuple(grid)
        self.focusing_factor = focusing_factor
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2,
                             groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))

    def channel_scale(self) -> Tensor:
        """``softplus(scale)`` as ``(heads, head_dim)``: the focusing map's divisor."""
        return F.softplus(self.scale).view(self.num_heads, self.dim // self.num_heads)

    def local(self, v: Tensor) -> Tensor:
        """The depthwise convolution of the values ``(B, H, W, C)``, one ``head_dim``
        filter shared by the heads -> ``(B, H, W, C)``."""
        b, h, w, c = v.shape
        heads, d = self.num_heads, c // self.num_heads
        vh = v.view(b, h, w, heads, d).permute(0, 3, 4, 1, 2).reshape(b * heads, d, h, w)
        return self.dwc(vh).view(b, heads, d, h, w).permute(0, 3, 4, 1, 2).reshape(b, h, w, c)

    def focused_plan(self, h: int, w: int, project_part: Callable[..., Tensor],
                     out: Callable[[Tensor], Tensor],
                     extra_local: Optional[nn.Conv2d] = None) -> SummedAttentionPlan:
        """Token-chunked inference on an ``h x w`` map (:mod:`.chunked`): pass 1 sums the
        focused keys and ``K^T V`` band by band (the positional encoding resized row by
        row), pass 2 reads each band out with a halo of ``kernel // 2`` rows for the
        depthwise convolution.

        ``project_part(tokens, part, count=1)`` gives q, k or v of normed tokens; ``out``
        maps the attention plus the local terms to the module's output; ``extra_local``
        (CSwin's LePE, a depthwise convolution of v no wider than ``dwc``) adds to them.
        """
        heads, c = self.num_heads, self.dim
        sums = InLineSums()
        table = self.positional_encoding.view(1, *self.grid, c).permute(0, 3, 1, 2)

        def collect(t: Tensor, r0: int, r1: int) -> None:
            tokens = t.reshape(t.shape[0], -1, c)
            pe = resized_rows(table, (h, w), r0, r1).permute(0, 2, 3, 1).reshape(1, -1, c)
            k = focusing_map(split_heads(project_part(tokens, 1) + pe, heads),
                             self.focusing_factor, self.channel_scale())
            sums.add(k, split_heads(project_part(tokens, 2), heads))

        def attend(t: Tensor, lo: int, r0: int, r1: int) -> Tensor:
            b, rows = t.shape[:2]
            kbar, _, kv = sums.means()
            tokens = t.reshape(b, -1, c)
            q = focusing_map(split_heads(project_part(tokens[:, (r0 - lo) * w:
                                                            (r1 - lo) * w], 0), heads),
                             self.focusing_factor, self.channel_scale())
            att = merge_heads((q @ kv) / (q @ kbar.transpose(-2, -1) + 1e-6)).to(t.dtype)
            v = project_part(tokens, 2).view(b, rows, w, c)
            near = self.local(v)
            if extra_local is not None:
                near = near + extra_local(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return out(att.view(b, r1 - r0, w, c) + near[:, r0 - lo:r1 - lo])

        return SummedAttentionPlan(self.dwc.kernel_size[0] // 2, (collect, ), attend)

    def attend_focused(self, q: Tensor, k: Tensor, v: Tensor, hw: tuple[int, int]) -> Tensor:
        """Focused linear attention of ``q, k, v (B, h*w, C)`` over an ``h x w`` map plus
        the depthwise convolution of v -> ``(B, h, w, C)``, before any projection."""
        b, n, c = q.shape
        h, w = hw
        heads = self.num_heads
        k = k + resize_positional_encoding(self.positional_encoding, self.grid, hw)
        out = merge_heads(attention(
            'focused', split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
            focusing_factor=self.focusing_factor, channel_scale=self.channel_scale()))
        return out.view(b, h, w, c) + self.local(v.view(b, h, w, c))


class FocusedLinearAttention(QKVProjection, FocusedTables):
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
        self.add_focused_parts(dim, num_heads, grid, focusing_factor, kernel_size)
        self.add_projections(dim, qkv_layout, qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}, '
                f'focusing_factor={self.focusing_factor}')

    def _forward_sharded(self, x: Tensor, group: SpatialGroup) -> Tensor:
        """This rank's rows ``(B, h, W, C)`` of the map (spatial parallelism): the sums of
        the focused keys and ``K^T V`` are reduced over the group, the positional
        encoding is resized for this rank's rows, and the depthwise convolution reads
        ``kernel // 2`` rows of each neighbour."""
        b, h, w, c = x.shape
        heads = self.num_heads
        spans = row_spans(h, group)
        r0, r1 = spans.mine
        table = self.positional_encoding.view(1, *self.grid, c).permute(0, 3, 1, 2)
        pe = resized_rows(table, (spans.total, w), r0, r1).permute(0, 2, 3, 1).reshape(1, -1, c)
        q, k, v = self.project(x.reshape(b, h * w, c))
        out = merge_heads(attention(
            'focused', split_heads(q, heads), split_heads(k + pe, heads), split_heads(v, heads),
            focusing_factor=self.focusing_factor, channel_scale=self.channel_scale(),
            reduce=summing_over(group)))
        halo = self.dwc.kernel_size[0] // 2
        local = self.local(halo_rows(v.view(b, h, w, c), 1, halo, halo, group))[:, halo:-halo]
        return self.proj_drop(self.proj(out.view(b, h, w, c) + local))

    def chunk_plan(self, h: int, w: int) -> SummedAttentionPlan:
        """Token-chunked inference on an ``h x w`` map (:meth:`~FocusedTables.focused_plan`)
        with this module's projections and ``proj``."""
        return self.focused_plan(h, w, self.project_part,
                                 lambda a: self.proj_drop(self.proj(a)))

    def forward(self, x: Tensor) -> Tensor:
        check_map(self, x, self.dim)
        group = current_group()
        if group is not None:
            return self._forward_sharded(x, group)
        b, h, w, c = x.shape
        q, k, v = self.project(x.reshape(b, h * w, c))
        return self.proj_drop(self.proj(self.attend_focused(q, k, v, (h, w))))
