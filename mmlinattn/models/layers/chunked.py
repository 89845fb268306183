"""Token-chunked inference: a backbone over a map larger than its activations would allow.

A block's token-wise parts (norms, projections, InLine's readout, the MLP) need
one token at a time; only two things look further. InLine's global statistics
are sums over every token, and the local 3x3 terms (the residual, CSwin's LePE)
and overlapping convolutions read neighbouring rows. So a map is processed in
bands of rows:

* a block with global InLine attention (:class:`InLineBlockParts`) runs in two
  passes over the bands: the first accumulates ``sum phi(k)``, ``sum v``,
  ``sum phi(k)^T v`` and the mean token (:class:`~mmlinattn.ops.InLineSums`), the
  second produces each band's output from its rows plus one halo row above and
  below (for the 3x3 terms);
* a block whose attention is another global reduction (FLatten's focused
  attention; agent attention's pooled agents and online softmax over keys,
  :class:`SummedAttentionPlan`) runs the same passes through the attention's own
  statistics;
* a block whose attention stays inside windows runs band by band
  (:class:`BandPlan`), the bands cut along window rows;
* embeddings and merges compute their output rows from the input rows their
  kernel reads (:func:`conv2d_rows`).

Peak memory is then the block's input and output maps plus one band's
temporaries, instead of the qkv and MLP expansions (3x and 4-8x a map) of the
whole map. Whole maps are allocated by :func:`~mmlinattn.utils.spill.new_map`, so
within :func:`~mmlinattn.utils.spill.spill_maps` they live in files on disk and
the memory in use is a few bands. Results equal the ordinary forward up to the order of float sums.
Inference only: with autograd on, the ordinary forward runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ...ops import conv2d_rows, conv_out_rows, dynamic_depthwise_conv3x3, get_kernel, linear
from ...ops.inline import InLineSums, KernelArg, inline_readout
from ...parallel import (
    all_reduce_sum,
    current_group,
    fetch_rows,
    gathered,
    row_spans,
    summing_over,
)
from ...utils.spill import new_map
from .regions import merge_heads, split_heads

__all__ = ['InLineBlockParts', 'BandPlan', 'SummedAttentionPlan', 'OwnBands', 'RowsBeforeWrite',
           'row_bands', 'band_rows', 'fill_rows', 'conv2d_rows', 'conv_out_rows', 'linear_slice',
           'chunked_block', 'chunked_embed', 'DEFAULT_CHUNK_TOKENS']

#: Tokens per band when chunking is switched on without a size (``chunk_tokens=True``
#: in the tools): 2^16 tokens, a few hundred MiB of temporaries at 64-128 channels.
DEFAULT_CHUNK_TOKENS = 65536


@dataclass
class InLineBlockParts:
    """The token-wise pieces of a pre-norm block with global InLine attention.

    The block computes, for tokens ``x (B, N, C)`` of an ``h x w`` map (plus
    optional leading prefix tokens that attend but have no position)::

        t = norm1(x);  q, k, v = projections of t
        a = InLine(phi(q), phi(k), v) + local(v)      # local: 3x3 terms on the map
        x = x + drop_path(proj(a));  x = x + drop_path(mlp(norm2(x)))

    ``q``, ``kv`` and ``v`` map normed tokens ``(B, n, C)`` to ``(B, n, C)``
    tensors; ``taps_from_input`` says whether the residual's taps come from the
    mean of ``x`` (CSwin) or of ``t`` (Swin, PVT, DeiT); ``lepe`` is CSwin's
    depthwise 3x3 on v (None elsewhere).
    """

    norm1: nn.Module
    q: Callable[[Tensor], Tensor]
    kv: Callable[[Tensor], tuple[Tensor, Tensor]]
    v: Callable[[Tensor], Tensor]
    proj: Callable[[Tensor], Tensor]
    norm2: nn.Module
    mlp: nn.Module
    drop_path: nn.Module
    num_heads: int
    kernel: KernelArg
    residual: Optional[nn.Module] = None
    lepe: Optional[nn.Module] = None
    taps_from_input: bool = False


@dataclass
class BandPlan:
    """A block whose output rows depend only on the input rows of the same window row:
    it runs on bands whose heights are multiples of ``multiple`` (its window side),
    with ``kwargs`` (e.g. statistics of the whole map) passed to each call."""

    multiple: int
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SummedAttentionPlan:
    """A pre-norm block whose attention is a global sum over tokens plus a local term
    reading ``halo`` rows each side (FLatten's focused attention): two passes over bands.

    Each of ``passes`` is one pass over the bands: ``collect(t, r0, r1)`` adds the
    normed rows ``t (B, r1 - r0, w, C)`` to the attention's statistics (agent
    attention needs two: its pooled agents, then its keys). ``attend(t, lo, r0, r1)``
    returns the attention's output (after its projection) for rows ``r0:r1`` from the
    normed rows ``lo:hi`` around them. The statistics live in the attention's
    closures, fresh for each plan. With prefix tokens (Agent-DeiT's class token, given
    to the attention when the plan is made), ``attend_prefix()`` returns their
    attention output ``(B, P, C)`` after the passes. The block fills in its norms,
    MLP and drop path.
    """

    halo: int
    passes: tuple[Callable[[Tensor, int, int], None], ...]
    attend: Callable[[Tensor, int, int, int], Tensor]
    attend_prefix: Optional[Callable[[], Tensor]] = None
    norm1: nn.Module = field(default_factory=nn.Identity)
    norm2: nn.Module = field(default_factory=nn.Identity)
    mlp: nn.Module = field(default_factory=nn.Identity)
    drop_path: nn.Module = field(default_factory=nn.Identity)


@dataclass
class OwnBands:
    """A block that runs its own passes over bands of ``rows`` rows: ``run(x, rows)`` on
    the whole map ``x (B, h, w, C)`` returns the block's output (MLLA's block, whose
    local convolutions on both sides of its attention need halos of several rows)."""

    run: Callable[[Tensor, int], Tensor]


ChunkPlan = Union[InLineBlockParts, BandPlan, SummedAttentionPlan, OwnBands, None]


class RowsBeforeWrite:
    """A map ``grid (B, h, w, C)`` that a pass overwrites band after band, top to
    bottom, with the rows it read as they were before.

    A block's second pass reads ``halo`` rows above each band (its 3x3 terms), rows
    the band before it has already replaced with its output. :meth:`write` keeps the
    last ``halo`` rows of a band before writing over them, and :meth:`read` puts them
    back in front of the rows still untouched. The block's output then takes the place
    of its input, with the same values: one map instead of two (half a block's memory;
    on a spill, half the files and disk space, though the kernel may still write the
    map back after each block).
    """

    def __init__(self, grid: Tensor, halo: int) -> None:
        self.grid, self.halo = grid, halo
        self.kept: Optional[Tensor] = None  # original rows [kept_from, written)
        self.kept_from = self.written = 0

    def read(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` (``0 <= lo``) as they were before any write."""
        if lo >= self.written:
            return self.grid[:, lo:hi]
        if self.kept is None or lo < self.kept_from:
            raise RuntimeError(f'rows from {lo} were overwritten: a band reads at most '
                               f'{self.halo} rows above it')
        return torch.cat([self.kept[:, lo - self.kept_from:],
                          self.grid[:, self.written:hi]], dim=1)

    def write(self, r0: int, r1: int, values: Tensor) -> None:
        """Rows ``r0:r1`` (the next band: ``r0`` is where the last write stopped) ``= values``."""
        if r0 != self.written:
            raise RuntimeError(f'bands are written in order: expected rows from '
                               f'{self.written}, got {r0}')
        start = max(0, r1 - self.halo)
        if self.halo:
            old = self.grid[:, max(start, r0):r1]
            if start < r0 and self.kept is not None:
                old = torch.cat([self.kept[:, start - self.kept_from:], old], dim=1)
            self.kept, self.kept_from = old.clone(), start
        self.grid[:, r0:r1] = values
        self.written = r1


def band_rows(chunk_tokens: int, width: int, multiple: int = 1) -> int:
    """Rows per band for about ``chunk_tokens`` tokens of a ``width``-wide map: at least
    one, a multiple of ``multiple``."""
    rows = max(1, chunk_tokens // max(1, width))
    return max(multiple, rows // multiple * multiple)


def row_bands(height: int, rows: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive bands of ``rows`` rows covering ``height``."""
    for start in range(0, height, rows):
        yield start, min(height, start + rows)


def fill_rows(height: int, rows: int, fn: Callable[[int, int], Tensor], dim: int = 1) -> Tensor:
    """Concatenate ``fn(r0, r1)`` over the bands of ``height`` along ``dim`` into one
    tensor allocated once (no list of parts, no second copy)."""
    out = None
    for r0, r1 in row_bands(height, rows):
        part = fn(r0, r1)
        if part.shape[dim] != r1 - r0:
            raise RuntimeError(f'band rows {r0}:{r1} produced {part.shape[dim]} rows')
        if out is None:
            shape = list(part.shape)
            shape[dim] = height
            out = new_map(shape, part.dtype, part.device)
        out.narrow(dim, r0, r1 - r0).copy_(part)
    return out


def chunked_embed(module: nn.Module, x: Tensor, chunk_tokens: int) -> Tensor:
    """``module(x)`` in bands of output rows, for modules with ``out_rows(h)`` and
    ``forward_rows(x, r0, r1)`` (patch embeddings, merges); any other runs whole.

    ``x`` is the module's usual input; the result its usual channels-last output.
    """
    if not hasattr(module, 'forward_rows'):
        return module(x)
    height = module.out_rows(x)
    width = module.forward_rows(x, 0, 1).shape[2]
    return fill_rows(height, band_rows(chunk_tokens, width),
                     lambda r0, r1: module.forward_rows(x, r0, r1))


def linear_slice(layer: nn.Linear, x: Tensor, start: int, stop: int) -> Tensor:
    """Output features ``[start, stop)`` of ``layer(x)`` alone (a slice of a fused qkv
    projection: chunked passes compute only what they use)."""
    bias = None if layer.bias is None else layer.bias[start:stop]
    return linear(x, layer.weight[start:stop], bias)


def _global_inline(parts: InLineBlockParts, x: Tensor, hw: tuple[int, int], num_prefix: int,
                   rows: int, inplace: bool = False) -> Tensor:
    """The block on tokens ``x (B, P + h*w, C)`` in two passes over bands of ``rows`` rows;
    ``inplace``: the output is written over ``x`` (:class:`RowsBeforeWrite`).

    Spatially sharded (:mod:`mmlinattn.parallel`), ``x`` holds this rank's rows: the
    sums and the mean token are reduced over the group between the passes (prefix
    tokens count on the first rank), and the 3x3 terms of the first and last bands
    read one row of the neighbouring ranks.
    """
    b, n, c = x.shape
    h, w = hw
    heads = parts.num_heads
    phi = get_kernel(parts.kernel) or (lambda t: t)
    scale = (c // heads) ** -0.5
    group = current_group()
    prefix, grid = x[:, :num_prefix], x[:, num_prefix:]
    # Sharded: row -1 and row h are the neighbouring ranks' last and first rows.
    top = bottom = 0
    above = below = None
    if group is not None and (parts.residual is not None or parts.lepe is not None):
        top, bottom = int(not group.first), int(not group.last)
        spans = row_spans(h, group)
        starts, ends = spans.starts[:-1], spans.starts[1:]
        rows_map = grid.view(b, h, w, c)
        above = fetch_rows(rows_map, 1, spans, [(a - (r > 0), a) for r, a in enumerate(starts)],
                           group).view(b, -1, c)
        below = fetch_rows(rows_map, 1, spans, [(z, z + (r < group.size - 1))
                                                for r, z in enumerate(ends)],
                           group).view(b, -1, c)

    def band(r0: int, r1: int) -> Tensor:
        part = grid[:, max(0, r0) * w:min(h, r1) * w]
        if r0 < 0 or r1 > h:
            part = torch.cat(([above] if r0 < 0 else []) + [part] + ([below] if r1 > h else []),
                             dim=1)
        return part

    # Pass 1: InLine's sums and the mean token, band by band.
    sums = InLineSums()
    mean_sum = x.new_zeros(b, c, dtype=torch.float64 if x.dtype == torch.float64
                           else torch.float32)
    counted_prefix = num_prefix and (group is None or group.first)
    chunks = ([prefix] if counted_prefix else []) + [band(r0, r1)
                                                     for r0, r1 in row_bands(h, rows)]
    for chunk in chunks:
        t = parts.norm1(chunk)
        k, v = parts.kv(t)
        sums.add(phi(split_heads(k, heads)), split_heads(v, heads))
        mean_sum += (chunk if parts.taps_from_input else t).sum(dim=1, dtype=mean_sum.dtype)
    count: Union[int, Tensor] = n if group is None else h * w + (num_prefix if
                                                                counted_prefix else 0)
    if group is not None:
        sums.reduce(summing_over(group))
        packed = all_reduce_sum(torch.cat([mean_sum, mean_sum.new_full((b, 1), float(count))],
                                          dim=1), group)
        mean_sum, count = packed[:, :-1], packed[:, -1:]
    cov, vbar = sums.readout(scale)
    mean_token = (mean_sum / count).to(x.dtype)
    taps = None if parts.residual is None else parts.residual.taps(mean_token)

    def finish(xc: Tensor, t: Tensor, local: Optional[Tensor]) -> Tensor:
        attn = merge_heads(inline_readout(phi(split_heads(parts.q(t), heads)), cov, vbar))
        attn = attn.to(x.dtype)
        if local is not None:
            attn = attn + local
        xc = xc + parts.drop_path(parts.proj(attn))
        return xc + parts.drop_path(parts.mlp(parts.norm2(xc)))

    # Pass 2: outputs; the 3x3 terms read one halo row above and below each band.
    out = x if inplace else new_map(x.shape, x.dtype, x.device)
    if num_prefix:
        out[:, :num_prefix] = finish(prefix, parts.norm1(prefix), None)
    # In place, the row above a band is kept before the band above overwrites it.
    rewrite = RowsBeforeWrite(grid.view(b, h, w, c), 1) if inplace else None

    def band_before(lo: int, hi: int) -> Tensor:
        if rewrite is None or lo < 0:
            return band(lo, hi)
        return torch.cat([rewrite.read(lo, min(h, hi)).reshape(b, -1, c)]
                         + ([below] if hi > h else []), dim=1)

    for r0, r1 in row_bands(h, rows):
        lo, hi = max(-top, r0 - 1), min(h + bottom, r1 + 1)
        t = parts.norm1(band_before(lo, hi))
        inner = slice((r0 - lo) * w, (r1 - lo) * w)
        local = None
        if parts.residual is not None or parts.lepe is not None:
            vmap = parts.v(t).view(b, hi - lo, w, c)
            keep = slice(r0 - lo, r1 - lo)
            if parts.residual is not None:
                local = dynamic_depthwise_conv3x3(vmap, taps)[:, keep]
            if parts.lepe is not None:
                lepe = parts.lepe(vmap.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[:, keep]
                local = lepe if local is None else local + lepe
            local = local.reshape(b, (r1 - r0) * w, c)
        y = finish(band(r0, r1), t[:, inner], local)
        if rewrite is None:
            out[:, num_prefix + r0 * w:num_prefix + r1 * w] = y
        else:
            rewrite.write(r0, r1, y.view(b, r1 - r0, w, c))
    return out


def _summed_block(plan: SummedAttentionPlan, x: Tensor, rows: int,
                  hw: Optional[tuple[int, int]] = None, inplace: bool = False) -> Tensor:
    """The block on the map ``x (B, h, w, C)`` in passes over bands of ``rows`` rows:
    the attention's statistics, then each band's output from its rows and ``halo``
    rows each side. With ``hw``, ``x`` is tokens ``(B, P + h*w, C)``: ``P`` prefix
    tokens (which the plan's attention already holds, normed) before the map.
    ``inplace``: the output is written over ``x`` (:class:`RowsBeforeWrite`)."""
    out = x if inplace else new_map(x.shape, x.dtype, x.device)
    if hw is not None:
        b, n, c = x.shape
        num_prefix = n - hw[0] * hw[1]
        grid, out_grid = (t[:, num_prefix:].view(b, *hw, c) for t in (x, out))
    else:
        num_prefix, grid, out_grid = 0, x, out
    h = grid.shape[1]
    for collect in plan.passes:
        for r0, r1 in row_bands(h, rows):
            collect(plan.norm1(grid[:, r0:r1]), r0, r1)

    def finish(xc: Tensor) -> Tensor:
        return xc + plan.drop_path(plan.mlp(plan.norm2(xc)))

    if num_prefix:
        if plan.attend_prefix is None:
            raise ValueError('this attention has no plan for prefix tokens')
        out[:, :num_prefix] = finish(x[:, :num_prefix] + plan.drop_path(plan.attend_prefix()))
    rewrite = RowsBeforeWrite(grid, plan.halo) if inplace else None
    for r0, r1 in row_bands(h, rows):
        lo, hi = max(0, r0 - plan.halo), min(h, r1 + plan.halo)
        around = grid[:, lo:hi] if rewrite is None else rewrite.read(lo, hi)
        y = finish(grid[:, r0:r1] + plan.drop_path(plan.attend(plan.norm1(around), lo, r0, r1)))
        if rewrite is None:
            out_grid[:, r0:r1] = y
        else:
            rewrite.write(r0, r1, y)
    return out


def chunked_block(block: nn.Module, x: Tensor, chunk_tokens: int,
                  hw: Optional[tuple[int, int]] = None, inplace: bool = False) -> Tensor:
    """``block(x)`` (``block(x, hw=hw)`` for token inputs) evaluated in bands of about
    ``chunk_tokens`` tokens, as the block's ``chunk_plan(x)`` says.

    ``x`` is a channels-last map ``(B, H, W, C)``, or tokens ``(B, P + h*w, C)``
    with ``hw`` (DeiT's class token first). Blocks without a plan (softmax stages
    with shifted windows or stripes) run whole. ``inplace``: the caller has no further
    use for ``x``, so blocks that run in bands may write their output over it (one map
    instead of two; the values are the same); the result is the tensor to use.
    """
    plan = None
    if hasattr(block, 'chunk_plan'):
        plan = block.chunk_plan(x) if hw is None else block.chunk_plan(x, hw=hw)
    if isinstance(plan, OwnBands) and x.dim() == 4:
        if current_group() is not None:  # this rank's rows: the block's sharded forward
            return block(x)
        return plan.run(x, band_rows(chunk_tokens, x.shape[2]))
    if isinstance(plan, SummedAttentionPlan):
        if current_group() is not None:  # the block's sharded forward
            return block(x) if hw is None else block(x, hw=hw)
        width = x.shape[2] if hw is None else hw[1]
        inplace = inplace and x.is_contiguous()
        return _summed_block(plan, x, band_rows(chunk_tokens, width), hw, inplace)
    if isinstance(plan, InLineBlockParts):
        inplace = inplace and x.is_contiguous()  # else reshape below would write a copy
        if x.dim() == 4:
            b, h, w, c = x.shape
            out = _global_inline(plan, x.reshape(b, h * w, c), (h, w), 0,
                                 band_rows(chunk_tokens, w), inplace)
            return out.view(b, h, w, c)
        h, w = hw
        return _global_inline(plan, x, hw, x.shape[1] - h * w, band_rows(chunk_tokens, w),
                              inplace)
    if isinstance(plan, BandPlan) and x.dim() == 4:
        if current_group() is not None:  # windows on a band of rows: on the gathered map
            return gathered(lambda m: chunked_block(block, m, chunk_tokens), x)
        rows = band_rows(chunk_tokens, x.shape[2], plan.multiple)
        if inplace:  # a band's output rows read only its own input rows
            for r0, r1 in row_bands(x.shape[1], rows):
                x[:, r0:r1] = block(x[:, r0:r1], **plan.kwargs)
            return x
        return fill_rows(x.shape[1], rows, lambda r0, r1: block(x[:, r0:r1], **plan.kwargs))
    return block(x) if hw is None else block(x, hw=hw)
