"""Semantic FPN (mmseg's ``FPN`` neck and ``FPNHead``) on a tile, each level with its own halo.

A tile's neck and head read the feature pyramid within their receptive field, which
is wide only at the coarse levels: the stride-32 branch (its FPN convolution, then
three 3x3 convolutions each followed by a 2x bilinear upsampling) reads at most 36
stride-4 pixels past a logit, the stride-4 branch (two 3x3 convolutions) 2. Cropping
every level with the widest halo, as a generic tile does, computes the stride-4 level
(most of the work: its FPN convolution is 256 -> 256 channels at the finest
resolution) on (512 + 2 * 64)^2 pixels for a 512^2-pixel core, 1.56 times the core.

:class:`SemanticFPNLevels` runs the same modules level by level, each on what it must
read for the logits of the tile's core and one pixel around it (which the labels'
bilinear upsampling reads):

* the laterals (1x1) and the top-down sums from the coarsest level down, each on its
  level's region: what its branch reads, widened to what the finer level's top-down
  sum reads of it (the top-down path is pointwise: nearest-neighbour upsampling);
* each module of a level's branch (its FPN convolution, the scale head's
  convolutions and upsamplings) on the part of its input that the rest of the
  branch reads, regions rounded out to whole pixels of the module's input;
* the sum of the branches and the classifier on the core and its one-pixel margin.

Values away from a crop's edge by more than what reads them equal the whole-image
computation, as in a generic tile, up to the order of float sums in convolutions of
other sizes. Units: pixels of the finest (stride-4) map.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from torch import Tensor, nn

__all__ = ['SemanticFPNLevels', 'semantic_fpn_levels']

#: Finest pixels around a tile's own part that its logits must cover: the labels'
#: bilinear upsampling reads one more row and column on each side.
LOGIT_MARGIN = 1


@dataclass(frozen=True)
class _Region:
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` in finest pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    def widened(self, by: int, align: int, within: _Region) -> _Region:
        """Widened by ``by`` on every side, out to multiples of ``align``, within ``within``."""
        return _Region(max(within.y0, (self.y0 - by) // align * align),
                       min(within.y1, -(-(self.y1 + by) // align) * align),
                       max(within.x0, (self.x0 - by) // align * align),
                       min(within.x1, -(-(self.x1 + by) // align) * align))

    def hull(self, other: _Region) -> _Region:
        return _Region(min(self.y0, other.y0), max(self.y1, other.y1),
                       min(self.x0, other.x0), max(self.x1, other.x1))


def _cut(t: Tensor, inside: _Region, region: _Region, scale: int) -> Tensor:
    """The part on ``region`` of ``t``, a map on ``inside`` of ``scale`` finest pixels a
    pixel (both regions aligned to ``scale``)."""
    return t[:, :, (region.y0 - inside.y0) // scale:(region.y1 - inside.y0) // scale,
             (region.x0 - inside.x0) // scale:(region.x1 - inside.x0) // scale]


@dataclass(frozen=True)
class _Step:
    """A module of a level's branch: it reads ``reach`` finest pixels past an output
    pixel, from an input of ``scale`` finest pixels a pixel."""

    module: nn.Module
    reach: int
    scale: int


def _conv_reach(module: nn.Module) -> Optional[int]:
    """How far (in its own pixels) a same-size convolution reads, or None if it is not
    one (strided, unpadded, or not a plain 2-D convolution)."""
    conv = getattr(module, 'conv', module)
    if not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1) or conv.groups != 1:
        return None
    reach = []
    for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding):
        if p != d * (k - 1) // 2 or k % 2 == 0:
            return None
        reach.append(p)
    return max(reach) if reach[0] == reach[1] else None


def _branch(fpn_conv: nn.Module, scale_head: nn.Sequential, scale: int
            ) -> Optional[list[_Step]]:
    """A level's FPN convolution and FPNHead scale head as steps, for a level of
    ``scale`` finest pixels a pixel; None when they hold something other than same-size
    convolutions and 2x bilinear upsamplings (``align_corners=False``) that end at the
    finest level."""
    from mmseg.models.utils import Upsample

    steps = []
    for m in [fpn_conv, *scale_head]:
        if isinstance(m, Upsample):
            if (m.size is not None or m.scale_factor != 2 or m.mode != 'bilinear'
                    or m.align_corners):
                return None
            steps.append(_Step(m, scale, scale))  # one input pixel on either side
            scale //= 2
            continue
        conv = _conv_reach(m)
        if conv is None:
            return None
        steps.append(_Step(m, conv * scale, scale))
    return steps if scale == 1 else None


class SemanticFPNLevels:
    """The neck and decode head of an mmseg ``EncoderDecoder`` with mmseg's ``FPN`` and
    ``FPNHead``, computed on a tile with a halo per level (see the module's docstring).

    ``branches[k]``: level ``k``'s FPN convolution and scale head, as steps."""

    def __init__(self, neck: Any, head: Any, branches: Sequence[list[_Step]]) -> None:
        self.neck, self.head, self.branches = neck, head, list(branches)

    @property
    def reaches(self) -> tuple[int, ...]:
        """Finest pixels each level's branch reads past a logit."""
        return tuple(sum(s.reach for s in steps) for steps in self.branches)

    def __call__(self, crops: list[Tensor], tile: Any) -> tuple[Any, Tensor]:
        """``crops``: the pyramid (NCHW, finest first) on ``tile``'s crop; returns the
        tile narrowed to the crop the logits cover, and the logits ``(1, classes, h,
        w)`` on it."""
        neck, head = self.neck, self.head
        n = len(crops)
        crop = _Region(tile.cy0, tile.cy1, tile.cx0, tile.cx1)
        out = _Region(tile.y0, tile.y1, tile.x0, tile.x1).widened(LOGIT_MARGIN, 1, crop)
        # Each level's region: what its branch reads, and what the finer level's
        # top-down sum reads of it (whole pixels of this level).
        regions = []
        for k, reach in enumerate(self.reaches):
            region = out.widened(reach, 2 ** k, crop)
            if k:
                region = region.hull(regions[-1].widened(0, 2 ** k, crop))
            regions.append(region)
        # Top-down, coarsest first: each level's lateral sum on its region, then its branch.
        branches: list[Optional[Tensor]] = [None] * n
        above: Optional[Tensor] = None
        for k in range(n - 1, -1, -1):
            scale = 2 ** k
            lateral = neck.lateral_convs[k](_cut(crops[k], crop, regions[k], scale))
            if above is not None:
                wide = regions[k].widened(0, 2 * scale, crop)
                coarse = _cut(above, regions[k + 1], wide, 2 * scale)
                # FPN's own resize (nearest, to twice the size), then this level's part.
                up = _resize(coarse, [2 * s for s in coarse.shape[2:]], **neck.upsample_cfg)
                lateral = lateral + _cut(up, wide, regions[k], scale)
            above = lateral
            branches[k] = self._run(self.branches[k], lateral, regions[k], out, crop)
        # FPNHead's sum, in its order, of the branches (each at the finest scale on
        # ``out``). FPNHead resizes each to the finest branch's size, which it already
        # has (as on the whole padded image): a bilinear resize to the same size weighs
        # each pixel by 1 and its neighbour by 0, so it is skipped (it only differs where
        # a neighbour is not finite, and costs as much as the sum).
        output = branches[0]
        for k in range(1, n):
            part = branches[k]
            if part.shape[2:] != output.shape[2:]:
                raise RuntimeError(f'level {k} of the FPN head gave {tuple(part.shape[2:])} '
                                   f'pixels where {tuple(output.shape[2:])} were expected')
            output = output + part
        logits = head.cls_seg(output)
        return replace(tile, cy0=out.y0, cy1=out.y1, cx0=out.x0, cx1=out.x1), logits

    @staticmethod
    def _run(steps: list[_Step], x: Tensor, region: _Region, out: _Region,
             crop: _Region) -> Tensor:
        """The steps on ``x`` (on ``region``), each on the part of its input the rest
        of the branch reads for ``out``; the result on ``out`` (finest scale)."""
        left = sum(s.reach for s in steps)
        for step in steps:
            want = out.widened(left, step.scale, crop)
            x, region = step.module(_cut(x, region, want, step.scale)), want
            left -= step.reach
        return _cut(x, region, out, 1)


def _resize(t: Tensor, size: Any, **kwargs: Any) -> Tensor:
    from mmseg.models.utils import resize
    return resize(t, size=tuple(size), **kwargs)


def semantic_fpn_levels(model: Any) -> Optional[SemanticFPNLevels]:
    """A :class:`SemanticFPNLevels` for ``model`` when its neck is mmseg's ``FPN`` (one
    output per input level, 1x1 laterals, nearest top-down) and its head mmseg's
    ``FPNHead`` over those outputs in order at strides doubling from the finest; else
    None (the caller computes the neck and head on the whole crop)."""
    from mmseg.models.decode_heads import FPNHead
    from mmseg.models.necks import FPN

    neck, head = getattr(model, 'neck', None), model.decode_head
    if type(neck) is not FPN or type(head) is not FPNHead:
        return None
    n = len(neck.lateral_convs)
    if (neck.num_outs != n or neck.start_level != 0 or neck.upsample_cfg != dict(mode='nearest')
            or head.input_transform != 'multiple_select' or list(head.in_index) != list(range(n))
            or head.align_corners):
        return None
    strides = list(head.feature_strides)
    if strides != [strides[0] * 2 ** k for k in range(n)]:
        return None
    if any(_conv_reach(m) != 0 for m in neck.lateral_convs):
        return None
    branches = [_branch(neck.fpn_convs[k], head.scale_heads[k], 2 ** k) for k in range(n)]
    return None if any(b is None for b in branches) else SemanticFPNLevels(neck, head, branches)
