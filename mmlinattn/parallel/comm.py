"""Autograd-aware collectives over the rows of a spatially sharded map.

Semantics of the gradients: each rank back-propagates its own loss ``L_r`` and the
model is trained on ``L = sum_r L_r`` (the wrapper scales each rank's loss so that
this sum is the single-process loss). So the backward of an all-reduce is an
all-reduce of the gradients, the backward of sending rows to a neighbour is
receiving (and adding) that neighbour's gradient of them, and the backward of an
all-gather is the sum of every rank's gradient of one's own rows.

Rows live on axis ``dim`` of a local tensor; :class:`RowSpans` says which global
rows every rank of the group holds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .group import SpatialGroup

__all__ = ['RowSpans', 'row_spans', 'all_reduce_sum', 'fetch_rows', 'gather_rows', 'own_rows',
           'gather_rows_to', 'broadcast_tensor', 'collective_device', 'summing_over']


@dataclass(frozen=True)
class RowSpans:
    """Global rows ``[starts[r], starts[r + 1])`` held by each rank ``r`` of a map of
    ``total`` rows; ``rank`` is this process's index."""

    starts: tuple[int, ...]
    rank: int

    @property
    def total(self) -> int:
        return self.starts[-1]

    @property
    def size(self) -> int:
        return len(self.starts) - 1

    def span(self, r: int) -> tuple[int, int]:
        return self.starts[r], self.starts[r + 1]

    @property
    def mine(self) -> tuple[int, int]:
        return self.span(self.rank)

    def counts(self) -> list[int]:
        return [b - a for a, b in zip(self.starts[:-1], self.starts[1:])]


def collective_device(g: SpatialGroup) -> torch.device:
    """Where small bookkeeping tensors go for ``g``'s backend (NCCL: the current GPU)."""
    if dist.get_backend(g.group) == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def row_spans(rows: int, g: SpatialGroup) -> RowSpans:
    """Every rank's global rows, from each rank's local row count (one tiny all-gather)."""
    device = collective_device(g)
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(g.size)]
    dist.all_gather(counts, mine, group=g.group)
    g.stats.add('sizes', 8 * g.size)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + int(c))
    return RowSpans(tuple(starts), g.rank)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, g: SpatialGroup) -> Tensor:
        ctx.g = g
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, group=g.group)
        g.stats.add('all_reduce', out.numel() * out.element_size())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], None]:
        out = grad.detach().clone().contiguous()
        dist.all_reduce(out, group=ctx.g.group)
        ctx.g.stats.add('all_reduce', out.numel() * out.element_size())
        return out, None


def all_reduce_sum(t: Tensor, g: SpatialGroup) -> Tensor:
    """Sum of ``t`` over the group; differentiable (backward sums the gradients)."""
    return _AllReduceSum.apply(t, g)


def all_reduce_max(t: Tensor, g: SpatialGroup) -> Tensor:
    """Elementwise maximum of ``t`` over the group, detached (for a softmax's shift,
    which does not change its value or gradient)."""
    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=g.group)
    g.stats.add('all_reduce', out.numel() * out.element_size())
    return out


def summing_over(g: SpatialGroup) -> Callable[[Tensor], Tensor]:
    """``t -> all_reduce_sum(t, g)``: the ``reduce`` argument of the summed attentions
    and of :meth:`~mmlinattn.ops.InLineSums.reduce`."""
    return functools.partial(all_reduce_sum, g=g)


def _exchange(sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]],
              g: SpatialGroup) -> None:
    """Point-to-point: ``sends`` (group index, tensor) out, ``recvs`` filled in place."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), g.global_rank(r), g.group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, g.global_rank(r), g.group) for r, t in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    g.stats.add('halo', sum(t.numel() * t.element_size() for _, t in sends))


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else (0, 0)


class _FetchRows(torch.autograd.Function):
    """Global rows ``[lo, hi)`` of a sharded map (zeros outside ``[0, total)``)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, spans: RowSpans, needs: tuple[tuple[int, int], ...],
                g: SpatialGroup) -> Tensor:
        ctx.dim, ctx.spans, ctx.needs, ctx.g = dim, spans, needs, g
        me = spans.rank
        my_lo, my_hi = spans.mine
        lo, hi = needs[me]
        shape = list(x.shape)
        shape[dim] = hi - lo
        out = x.new_zeros(shape)
        sends, recvs = [], []
        for r in range(spans.size):
            if r == me:
                a, b = _overlap((lo, hi), (my_lo, my_hi))
                if b > a:
                    out.narrow(dim, a - lo, b - a).copy_(x.narrow(dim, a - my_lo, b - a))
                continue
            a, b = _overlap(needs[r], (my_lo, my_hi))  # rows of mine that r needs
            if b > a:
                sends.append((r, x.narrow(dim, a - my_lo, b - a)))
            a, b = _overlap((lo, hi), spans.span(r))  # rows of r's that I need
            if b > a:
                recvs.append((r, out.narrow(dim, a - lo, b - a)))
        bufs = [(r, torch.empty_like(view)) for r, view in recvs]
        _exchange(sends, bufs, g)
        for (_, view), (_, buf) in zip(recvs, bufs):
            view.copy_(buf)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        dim, spans, needs, g = ctx.dim, ctx.spans, ctx.needs, ctx.g
        me = spans.rank
        my_lo, my_hi = spans.mine
        lo, hi = needs[me]
        shape = list(grad.shape)
        shape[dim] = my_hi - my_lo
        dx = grad.new_zeros(shape)
        sends, recvs = [], []
        for r in range(spans.size):
            if r == me:
                a, b = _overlap((lo, hi), (my_lo, my_hi))
                if b > a:
                    dx.narrow(dim, a - my_lo, b - a).add_(grad.narrow(dim, a - lo, b - a))
                continue
            a, b = _overlap((lo, hi), spans.span(r))  # gradient of r's rows I used: to r
            if b > a:
                sends.append((r, grad.narrow(dim, a - lo, b - a)))
            a, b = _overlap(needs[r], (my_lo, my_hi))  # gradient of my rows r used: from r
            if b > a:
                recvs.append((r, a, b))
        bufs = [(r, dx.new_empty([*shape[:dim], b - a, *shape[dim + 1:]])) for r, a, b in recvs]
        _exchange(sends, bufs, g)
        for (_, a, b), (_, buf) in zip(recvs, bufs):
            dx.narrow(dim, a - my_lo, b - a).add_(buf)
        return dx, None, None, None, None


def fetch_rows(x: Tensor, dim: int, spans: RowSpans, needs: Sequence[tuple[int, int]],
               g: SpatialGroup) -> Tensor:
    """Global rows ``needs[rank]`` of the map whose local rows ``x`` holds (axis ``dim``).

    Every rank passes every rank's needs (computed the same way everywhere), so each
    knows what to send without asking. Rows outside ``[0, total)`` are zeros (the
    zero padding of a convolution). Differentiable.
    """
    needs = tuple((int(a), int(b)) for a, b in needs)
    if len(needs) != spans.size:
        raise ValueError(f'fetch_rows: {len(needs)} needs for a group of {spans.size}')
    if x.shape[dim] != spans.mine[1] - spans.mine[0]:
        raise ValueError(f'fetch_rows: local tensor has {x.shape[dim]} rows on axis {dim}; '
                         f'its span says {spans.mine}')
    return _FetchRows.apply(x, dim, spans, needs, g)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, spans: RowSpans, g: SpatialGroup) -> Tensor:
        ctx.dim, ctx.spans, ctx.g = dim, spans, g
        counts = spans.counts()
        top = max(counts)
        xm = x.movedim(dim, 0)
        pad = xm.new_zeros((top, *xm.shape[1:]))
        pad[:xm.shape[0]] = xm
        parts = [torch.empty_like(pad) for _ in range(spans.size)]
        dist.all_gather(parts, pad, group=g.group)
        g.stats.add('gather', pad.numel() * pad.element_size())
        full = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
        return full.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        total = grad.detach().clone().contiguous()
        dist.all_reduce(total, group=ctx.g.group)
        ctx.g.stats.add('gather', total.numel() * total.element_size())
        a, b = ctx.spans.mine
        return total.narrow(ctx.dim, a, b - a).contiguous(), None, None, None


def gather_rows(x: Tensor, dim: int, spans: RowSpans, g: SpatialGroup) -> Tensor:
    """The whole map on every rank from each rank's rows. Differentiable: the gradient
    of one's rows is the sum of every rank's gradient of them."""
    return _GatherRows.apply(x, dim, spans, g)


def gather_rows_to(x: Tensor, dim: int, dst: int, g: SpatialGroup) -> Optional[Tensor]:
    """Every rank's rows (axis ``dim``) concatenated on group rank ``dst`` only (None
    elsewhere); not differentiable: for predictions."""
    spans = row_spans(x.shape[dim], g)
    counts = spans.counts()
    xm = x.movedim(dim, 0)
    pad = xm.new_zeros((max(counts), *xm.shape[1:]))
    pad[:xm.shape[0]] = xm
    parts = [torch.empty_like(pad) for _ in counts] if g.rank == dst else None
    dist.gather(pad, parts, dst=g.global_rank(dst), group=g.group)
    g.stats.add('gather', pad.numel() * pad.element_size())
    if g.rank != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).movedim(0, dim)


def broadcast_tensor(x: Optional[Tensor], src: int, g: SpatialGroup,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``x`` of group rank ``src`` on every rank (shape first, so others pass None)."""
    device = collective_device(g)
    shape = torch.zeros(8, dtype=torch.int64, device=device)
    if g.rank == src:
        shape[0] = x.dim()
        shape[1:1 + x.dim()] = torch.tensor(x.shape)
    dist.broadcast(shape, g.global_rank(src), group=g.group)
    dims = [int(s) for s in shape[1:1 + int(shape[0])]]
    out = x.contiguous() if g.rank == src else torch.empty(dims, dtype=dtype, device=device)
    dist.broadcast(out, g.global_rank(src), group=g.group)
    return out


def own_rows(full: Tensor, dim: int, spans: RowSpans) -> Tensor:
    """This rank's rows of a whole map every rank holds."""
    a, b = spans.mine
    return full.narrow(dim, a, b - a)
