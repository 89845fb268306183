"""A detector's neck (and its local dense head) over the whole image, each pixel once.

A detector's tiles overlap: a core of ``tile`` pixels is read with ``margin + halo``
pixels around it, and the neck on ``margin + 2 * halo``, so a neck computed tile by tile
computes each pixel about three times at the default 2048 / 256 / 256 (3584^2 crops for
2048^2 cores), and more of them on interior tiles than on border ones: the time per
megapixel grows with the image. :class:`TilePyramid` computes the neck once, over the
image rows the tiles' head regions cover, by rectangles (``halo`` pixels of backbone
context around each, the neck's receptive field), as the rows of tiles reach them, into
maps (memory-mapped files under a spill) from which each tile crops its head region.

The dense head (the RPN of a two-stage detector, a single-stage detector's head) is
computed the same way when it is *local*: convolutions without statistics over the map
(no group, layer or instance norms), outputs of at most the neck's channels (so its
maps cost no more than the neck's; RetinaNet's 720 class channels do not qualify and
keep running per tile). A tile then reads its objectness and box deltas from those maps:
at the border of its head region they see the real neighbouring features, as on the
whole image, instead of zero padding.

Units: image pixels (of the level read); rectangles, crops and rows start on multiples
of the neck's coarsest stride, so every level of every crop starts on a whole pixel.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..utils.spill import new_map, release_rows
from .large_image import _box

__all__ = ['TilePyramid', 'local_dense_head', 'dense_head_reach', 'neck_reach',
           'precomputed_outputs']

#: Norm layers whose statistics span the map: a head holding one is not local.
_GLOBAL_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                 nn.InstanceNorm3d, nn.LocalResponseNorm)


def dense_head_of(model: Any) -> Optional[nn.Module]:
    """The detector's dense head: the RPN of a two-stage detector, else the ``bbox_head``
    of a single-stage one."""
    rpn = getattr(model, 'rpn_head', None)
    return rpn if rpn is not None else getattr(model, 'bbox_head', None)


def dense_head_reach(head: nn.Module) -> int:
    """An upper bound of the head's receptive radius, in pixels of any one level: the sum
    of the radii of all its convolutions (parallel branches counted as if stacked)."""
    reach = 0
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            reach += max(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
    return reach


#: Layers of an FPN whose output at a pixel reads only that pixel (besides convolutions).
_POINTWISE = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.ReLU, nn.Identity, nn.Sequential,
              nn.ModuleList)


def neck_reach(neck: nn.Module, feats: Sequence[Tensor], stride: int) -> Optional[int]:
    """The receptive radius of mmdet's ``FPN`` in image pixels: the radii of its
    convolutions, each times the stride of the map it reads (measured on ``feats``,
    the backbone's maps, ``stride`` image pixels per finest pixel), summed (every path
    through them is at most that); lateral 1x1 convolutions and nearest upsampling
    reach nothing, the extra levels by max-pooling with a kernel of 1 neither. For
    another neck, or an FPN with other layers or upsampling, ``None``: its reach is
    not known here (the tiling's ``halo`` is used)."""
    if type(neck).__name__ != 'FPN' or \
            dict(getattr(neck, 'upsample_cfg', {})).get('mode', 'nearest') != 'nearest':
        return None
    convs = []
    for m in neck.modules():
        if m is neck or isinstance(m, _POINTWISE) or type(m).__name__ == 'ConvModule':
            continue
        if not isinstance(m, nn.Conv2d):
            return None  # a norm with statistics over the map, an attention, ...
        convs.append(m)
    read: dict[nn.Module, int] = {}  # a convolution -> the width of the map it reads

    def record(conv: nn.Module, args: tuple) -> None:
        read.setdefault(conv, args[0].shape[-1])
    hooks = [c.register_forward_pre_hook(record) for c in convs]
    try:
        with torch.no_grad():
            neck(list(feats))
    finally:
        for h in hooks:
            h.remove()
    width = feats[0].shape[-1] * stride
    reach = 0.0
    for conv, side in read.items():
        radius = max(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        reach += radius * width / side
    return math.ceil(reach)


def local_dense_head(model: Any, neck_outs: Sequence[Tensor]) -> Optional[nn.Module]:
    """The dense head when it can be computed over the whole image by rectangles (see
    the module's note), from its outputs on ``neck_outs`` (a small run), else ``None``."""
    head = dense_head_of(model)
    if head is None or any(isinstance(m, _GLOBAL_NORMS) for m in head.modules()):
        return None
    with torch.no_grad():
        outs = head(list(neck_outs))
    if not isinstance(outs, (tuple, list)) or not all(
            isinstance(o, (tuple, list)) and len(o) == len(neck_outs) for o in outs):
        return None  # not one map per level and kind: not a head we can crop
    channels = sum(o[0].shape[1] for o in outs)
    return head if channels <= neck_outs[0].shape[1] else None


@contextlib.contextmanager
def precomputed_outputs(head: nn.Module, outs: tuple) -> Iterator[None]:
    """Within the block, ``head(x)`` returns ``outs`` (its maps on the same region,
    computed before) after checking that they are the size of ``x``."""
    def forward(x: Sequence[Tensor]) -> tuple:
        for level, f in enumerate(x):
            if any(o[level].shape[2:] != f.shape[2:] for o in outs):
                raise RuntimeError(f'precomputed head maps of level {level} do not match '
                                   f'its features {tuple(f.shape[2:])}')
        return outs
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _spans(lo: int, hi: int, longest: int, step: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into equal spans of at most ``longest`` (multiples of ``step``
    except the last end)."""
    if hi <= lo:
        return []
    count = math.ceil((hi - lo) / longest)
    side = math.ceil((hi - lo) / count / step) * step
    return [(a, min(hi, a + side)) for a in range(lo, hi, side)]


#: A ring's levels are held in memory even under a spill, finest first, as long as the
#: rings of one pyramid stay within this many bytes; the levels past it go to the spill.
#: Written and read once per row of tiles, a ring in the spill goes through the page
#: cache to the disk (23 GB of neck maps at 16384^2 px, written back before the tiles
#: read them); the finest level is three quarters of a ring's bytes, so keeping it alone
#: in memory saves most of that traffic.
RING_MEMORY_BYTES = 4 * 2**30


class TilePyramid:
    """The neck's maps, and those of a local dense head (``head``, else ``None``), over
    image rows ``rows = (n0, n1)`` of a padded image ``width`` pixels wide.

    ``feats``: the backbone's maps (finest first, ``stride`` image pixels per finest
    pixel) holding the image rows from ``row0``; ``strides``: the neck's output strides;
    ``halo``: backbone context around a rectangle of the neck (its receptive field);
    ``rect``: the longest side of a rectangle (image pixels). The neck covers ``rows``
    widened by the head's reach, so that the head's maps at ``n0`` and ``n1`` see
    real features. Call :meth:`reach` before a row of tiles, then :meth:`neck_crop`
    and :meth:`head_crop` for each tile; ``timings`` gets ``neck_s`` and ``dense_s``.

    ``ring``: the most image rows the head regions of one row of tiles span. The maps
    then hold a window of rows, reused from the top as the tiles move down (a ring:
    image row ``y`` at map row ``(y - origin) / s`` modulo the window), instead of the
    whole image's rows: a row of tiles at a time, its levels in memory finest first (up
    to :data:`RING_MEMORY_BYTES`), the others in the spill. The rows must then be
    reached and read in order (:meth:`release` before :meth:`reach`, as the tiles go down); reading
    a row the window no longer holds raises. ``None``: every row kept."""

    def __init__(self, model: Any, feats: Sequence[Tensor], stride: int, row0: int,
                 strides: Sequence[int], rows: tuple[int, int], width: int, halo: int,
                 rect: int, head: Optional[nn.Module], timings: dict,
                 ring: Optional[int] = None) -> None:
        self.model, self.feats, self.stride, self.row0 = model, feats, stride, row0
        self.strides, self.halo, self.head, self.timings = list(strides), halo, head, timings
        self.step = max(self.strides)
        self.width, self.rect = width, rect
        self.avail = (row0, row0 + feats[0].shape[2] * stride)
        n0, n1 = rows
        self.head_reach = dense_head_reach(head) * self.step if head is not None else 0
        self.rows = (n0, n1)
        self.neck_rows = (max(self.avail[0], n0 - self.head_reach),
                          min(self.avail[1], n1 + self.head_reach))
        # Image rows each kind of map holds at once: the rows a row of tiles reads and
        # what is computed ahead of them (the head's reach, rounding to the stride).
        self.neck_window = (None if ring is None else
                            ring + 2 * self.head_reach + 2 * self.step)
        self.head_window = None if ring is None else ring + 2 * self.step
        self.cols = _spans(0, width, rect, self.step)
        self.neck_maps: Optional[list[Tensor]] = None
        self.head_maps: Optional[list[list[Tensor]]] = None
        self.neck_done = self.neck_rows[0]
        self.head_done = n0
        self.ring_bytes = 0  # of rings held in memory

    # -- computing --------------------------------------------------------------------
    def _lap(self, name: str, start: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _alloc(self, outs: Sequence[Tensor], rows: tuple[int, int], window: Optional[int]
               ) -> list[Tensor]:
        """Maps like ``outs`` (one per level) for image rows ``rows``, or a ring of
        ``window`` of them (plus a row of slack for a level's partial rows)."""
        shapes = []
        for o, s in zip(outs, self.strides):
            total = -(-(rows[1] - rows[0]) // s)
            held = total if window is None else min(total, -(-window // s) + 1)
            shapes.append((1, o.shape[1], held, -(-self.width // s)))
        wraps = any(sh[2] < -(-(rows[1] - rows[0]) // s) for sh, s in zip(shapes, self.strides))
        maps = []
        for sh, o in zip(shapes, outs):
            nbytes = torch.Size(sh).numel() * o.element_size()
            if wraps and self.ring_bytes + nbytes <= RING_MEMORY_BYTES:
                self.ring_bytes += nbytes
                maps.append(torch.empty(sh, dtype=o.dtype))
            else:
                maps.append(new_map(sh, o.dtype))
        return maps

    @staticmethod
    def _pieces(m: Tensor, r0: int, r1: int) -> list[tuple[int, int, int]]:
        """Level rows ``[r0, r1)`` of a ring ``m`` as ``(offset, start, stop)``: rows
        ``offset...`` of the span are map rows ``start:stop``."""
        held = m.shape[2]
        out, r = [], r0
        while r < r1:
            start = r % held
            n = min(r1 - r, held - start)
            out.append((r - r0, start, start + n))
            r += n
        return out

    def _place(self, maps: list[Tensor], extent: tuple[int, int], outs: Sequence[Tensor],
               crop: tuple[int, int, int, int], keep: tuple[int, int, int, int]) -> None:
        """Write the part ``keep`` (image y0, y1, x0, x1) of ``outs`` (the maps of the
        region ``crop``) into ``maps`` (of image rows ``extent``, whole or a ring)."""
        origin = extent[0]
        for m, o, s in zip(maps, outs, self.strides):
            oy0, ox0 = (keep[0] - crop[0]) // s, (keep[2] - crop[2]) // s
            rows = min(-(-(keep[1] - crop[0]) // s), o.shape[2]) - oy0
            cols = min(-(-(keep[3] - crop[2]) // s), o.shape[3]) - ox0
            dy, dx = (keep[0] - origin) // s, keep[2] // s
            total = -(-(extent[1] - origin) // s)
            rows, cols = min(rows, total - dy), min(cols, m.shape[3] - dx)
            for off, a, b in self._pieces(m, dy, dy + rows):
                m[:, :, a:b, dx:dx + cols] = o[:, :, oy0 + off:oy0 + off + b - a,
                                               ox0:ox0 + cols]

    def _align(self, y: int, origin: int, end: int) -> int:
        """``y`` rounded up to a multiple of the coarsest stride from ``origin``, at
        most ``end``: every band starts on a whole pixel of every level."""
        return min(end, origin + -(-(y - origin) // self.step) * self.step)

    def _neck_band(self, a: int, b: int) -> None:
        start = time.perf_counter()
        finest = self.feats[0]
        scales = [finest.shape[2] / f.shape[2] for f in self.feats]
        y0, y1 = max(self.avail[0], a - self.halo), min(self.avail[1], b + self.halo)
        for c, d in self.cols:
            x0, x1 = max(0, c - self.halo), min(self.width, d + self.halo)
            crops = [_box(f, (y0 - self.row0) // self.stride, (y1 - self.row0) // self.stride,
                          x0 // self.stride, x1 // self.stride, s).contiguous()
                     for f, s in zip(self.feats, scales)]
            outs = self.model.neck(crops)
            if self.neck_maps is None:
                self.neck_maps = self._alloc(outs, self.neck_rows, self.neck_window)
            self._place(self.neck_maps, self.neck_rows, outs, (y0, y1, x0, x1), (a, b, c, d))
            del outs, crops
        self._lap('neck_s', start)

    def _head_band(self, a: int, b: int) -> None:
        start = time.perf_counter()
        n0 = self.neck_rows[0]
        y0, y1 = max(n0, a - self.head_reach), min(self.neck_rows[1], b + self.head_reach)
        for c, d in self.cols:
            x0, x1 = max(0, c - self.head_reach), min(self.width, d + self.head_reach)
            crops = [self._crop_level(m, n0, (y0, y1, x0, x1), s, self.neck_done)
                     for m, s in zip(self.neck_maps, self.strides)]
            kinds = self.head(crops)
            if self.head_maps is None:
                self.head_maps = [self._alloc(k, self.rows, self.head_window) for k in kinds]
            for maps, outs in zip(self.head_maps, kinds):
                self._place(maps, self.rows, outs, (y0, y1, x0, x1), (a, b, c, d))
            del kinds, crops
        self._lap('dense_s', start)

    def reach(self, y: int) -> None:
        """Compute the maps up to image row ``y`` (the bottom of a row of head regions)."""
        y = self._align(min(y, self.rows[1]), self.rows[0], self.rows[1])
        if self.head is not None and self.head_done < y:
            self._neck_up_to(y + self.head_reach)
            for a, b in _spans(self.head_done, y, self.rect, self.step):
                self._head_band(a, b)
            self.head_done = y
        self._neck_up_to(y)

    def _neck_up_to(self, y: int) -> None:
        y = self._align(y, self.neck_rows[0], self.neck_rows[1])
        if self.neck_done < y:
            for a, b in _spans(self.neck_done, y, self.rect, self.step):
                self._neck_band(a, b)
            self.neck_done = y

    def release(self, y: int) -> None:
        """Nothing above image row ``y`` (the top of the head regions still to do) will
        be read again: give the file-backed maps' pages above what those need back
        (:func:`~mmlinattn.utils.spill.release_rows`), so that a pass over maps larger
        than memory keeps a band's worth in the page cache and writes no dead page to
        the disk. Tied to the tiles done, so that a resumed run finds every row it
        needs. (A ring's rows are reused instead.)"""
        finest = self.feats[0]
        reach = y - self.head_reach - self.halo - self.row0  # backbone rows still read
        for f in self.feats:
            per = self.stride * finest.shape[2] // f.shape[2]
            release_rows(f, reach // per)
        if self.neck_window is not None:
            return
        neck_reach = min(y, self.head_done) - self.head_reach - self.neck_rows[0]
        for m, s in zip(self.neck_maps or (), self.strides):
            release_rows(m, neck_reach // s)
        for maps in self.head_maps or ():
            for m, s in zip(maps, self.strides):
                release_rows(m, (y - self.rows[0]) // s)

    # -- reading ----------------------------------------------------------------------
    def _crop_level(self, m: Tensor, origin: int, region: tuple[int, int, int, int], s: int,
                    done: int) -> Tensor:
        """Level ``s`` of ``region`` (image y0, y1, x0, x1) from ``m`` (rows from image
        row ``origin``, computed up to image row ``done``), a contiguous copy."""
        y0, y1, x0, x1 = region
        r0, r1 = (y0 - origin) // s, -(-(y1 - origin) // s)
        written = -(-(done - origin) // s)
        if r1 > written or r0 < written - m.shape[2]:
            raise RuntimeError(f'rows {y0}-{y1} of the pyramid at stride {s} are not held '
                               f'(computed up to row {done}, {m.shape[2] * s} rows held): '
                               'read in order, after reach()')
        parts = [m[:, :, a:b, x0 // s:-(-x1 // s)] for _, a, b in self._pieces(m, r0, r1)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).contiguous()

    def neck_crop(self, region: tuple[int, int, int, int]) -> list[Tensor]:
        """The neck's maps on ``region`` (image y0, y1, x0, x1), contiguous copies (mmcv's
        CPU RoIAlign reads its input as a dense array)."""
        return [self._crop_level(m, self.neck_rows[0], region, s, self.neck_done)
                for m, s in zip(self.neck_maps, self.strides)]

    def head_crop(self, region: tuple[int, int, int, int]) -> Optional[tuple]:
        """The dense head's outputs on ``region`` (a tuple of per-level lists, as the
        head's ``forward`` returns them), or ``None`` when the head runs per tile."""
        if self.head_maps is None:
            return None
        return tuple([self._crop_level(m, self.rows[0], region, s, self.head_done)
                      for m, s in zip(maps, self.strides)] for maps in self.head_maps)
