"""Detection and instance segmentation of very large images: a global backbone, tiled heads.

The backbone runs once over the whole image, exactly (token-chunked, by bands), so
every tile's features see the whole image. The neck and the detector's heads (RPN and
RoI heads, or a dense head) run tile by tile:

* The image is cut into **cores** of ``tile`` pixels. Around a core, ``margin`` pixels
  where the objects of the core are seen whole, and around that ``halo`` pixels of
  features the heads' own convolutions read. The neck runs on the core with
  ``margin + 2 * halo`` pixels of backbone features around it and is kept on the core
  with ``margin + halo`` (the **head region**, where its output equals the whole-image
  neck's when ``halo`` covers the neck's receptive field). The heads run on the head
  region as if it were an image of its own.
* **Responsibility**: a detection belongs to the tile whose core holds the centre of
  its box (cores are half-open, so exactly one tile). An object whose box reaches at
  most ``margin`` pixels beyond the core lies, with ``halo`` pixels of context, inside
  the head region: it is seen whole and reported once.
* **Larger objects** reach the head region's border: their boxes are cut there. Such a
  truncated detection is kept aside (they are few) and, after all tiles, the parts
  of one object seen by neighbouring tiles are merged: same class, and their boxes
  agree (IoU >= ``merge_iou``) inside the window both tiles see. The merged object has
  the union of the boxes and masks, the best score and ``parts`` > 1.
* **Nested detections**: Mask R-CNN's per-class suppression compares boxes by IoU and
  keeps a small box inside a large one of the same class, two detections of one
  object. A detection nested with a kept, better-scoring one of its class (more than
  ``nested_ios`` of the smaller box inside the other) is dropped
  (:func:`suppress_nested`), in each head region before responsibility, as on the
  whole image.
* **A coarse pass** (``coarse=F``) is the other answer for large objects, and for
  objects larger than what the detector was trained on: the same detector on the image
  read ``F`` times coarser, where an object of ``2 * F * margin`` pixels is seen whole.
  Objects larger than ``2 * margin`` (what the tiles see whole wherever it lies) come
  from that pass, the rest from the fine one, and
  a fine detection mostly inside a large object of its class is dropped as its
  fragment (:class:`LargeObjects`).
* **Budgets by score**: a whole-image top-k is meaningless at 10^9 pixels, and a top-k
  per tile depends on what else the tile holds. By default every proposal whose
  objectness reaches ``proposal_thr`` and every detection above the config's
  ``score_thr`` is kept, up to caps (the config's budgets scaled by a head region's
  area, which bound memory): what a tile keeps then depends only on what it sees, and
  tiles give the whole image's detections wherever no cap binds (a binding cap is
  reported). Budgets by count (mmdet's top-k) remain an option: :func:`detection_budgets`.
* **Masks** are pasted over each box's own pixels (mmdet's CPU paste, box by box), never
  at image size: :class:`~mmlinattn.rasters.objects.LocalMask`.

Which heads can be tiled: heads made of convolutions over the neck's maps and of
RoI features (single-stage detectors with an anchor-based or anchor-free dense head;
two-stage detectors with an RPN and a standard, cascade, double or dynamic RoI head
with FCN mask heads). Query-based (DETR, Sparse R-CNN), panoptic and image-sized mask
heads (SOLO, YOLACT, RTMDet-Ins, PointRend) are refused by name: :func:`check_tileable`.

Units: image pixels of the level read in the public interface (multiples of the
coarsest stride of the neck, so every level of every crop starts on a whole pixel);
pixels of the finest backbone map inside.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..rasters.objects import DetectedObject, LocalMask
from ..utils.attributes import patched_attributes
from ..utils.heap import reused_heap, trim_retained
from ..utils.spill import current_spill
from .head_kernels import fast_cpu_heads
from .large_image import SIZE_DIVISOR, Progress, _box, features_given
from .tile_pyramid import (
    TilePyramid,
    dense_head_of,
    dense_head_reach,
    local_dense_head,
    neck_reach,
    precomputed_outputs,
)

__all__ = ['DetectionTiling', 'TileRegions', 'check_tileable', 'detection_budgets',
           'threaded_roi_pooling', 'chunked_roi_forwards',
           'detection_tiles',
           'detect_tile', 'merge_truncated', 'neck_strides', 'run_detection_tiles',
           'LargeObjects', 'upscaled', 'suppress_nested',
           'result_objects', 'match_detections']


#: Where the neck runs (see :class:`DetectionTiling`).
NECK_MODES = ('auto', 'global', 'tiles')
#: ``neck='auto'`` without a spill: the most bytes the neck's maps over the rows of one
#: row of tiles (what :class:`TilePyramid` holds at once) may take for the neck to run
#: once over the image.
GLOBAL_NECK_BYTES = 2 * 2**30


@dataclass(frozen=True)
class DetectionTiling:
    """``tile``: core side; ``margin``: how far beyond its core a tile sees objects whole;
    ``halo``: features around the margin for the neck's and heads' receptive fields;
    all in image pixels. ``merge_iou``: agreement of two parts of a large object inside
    the window both tiles see. ``max_per_tile``: the most detections a tile keeps (None:
    the config's ``max_per_img`` times the budget scale). ``proposal_thr``: budgets by
    score, every proposal whose objectness reaches it (None: budgets by count; see
    :func:`detection_budgets`). ``budget_scale``: the config's proposal and detection
    budgets, the caps of a tile, are multiplied by this (None: by the head region's area
    over a 1333 x 800 image, between 1 and 8; see :func:`budget_scale`). ``coarse``: a
    second pass ``coarse`` times coarser finds the objects larger than ``2 * margin``
    (0: none; see :class:`LargeObjects`). ``nested_ios``: a detection nested with a
    better-scoring one of its class (more than this share of the smaller box inside the
    other) is dropped (None: kept; see :func:`suppress_nested`). ``neck``: where the neck
    (and a local dense head) runs: ``'global'`` once over the image by rectangles
    (:class:`~mmlinattn.engine.tile_pyramid.TilePyramid`), ``'tiles'`` on each tile's
    crop, ``'auto'`` global under a spill or when its maps over a row of tiles take at
    most :data:`GLOBAL_NECK_BYTES`, else by tiles."""

    tile: int = 2048
    margin: int = 256
    halo: int = 256
    merge_iou: float = 0.5
    max_per_tile: Optional[int] = None
    budget_scale: Optional[float] = None
    proposal_thr: Optional[float] = 0.05
    coarse: int = 0
    nested_ios: Optional[float] = 0.5
    neck: str = 'auto'

    def check(self, divisor: int) -> None:
        if self.neck not in NECK_MODES:
            raise ValueError(f'neck={self.neck!r}: expected one of {", ".join(NECK_MODES)}')
        for name in ('tile', 'margin', 'halo'):
            value = getattr(self, name)
            if value < (divisor if name == 'tile' else 0) or value % divisor:
                raise ValueError(f'{name}={value} must be a {"positive " if name == "tile" else ""}'
                                 f'multiple of {divisor} image pixels (the coarsest stride of '
                                 'the neck), so that tiles line up with every feature level')


@dataclass(frozen=True)
class TileRegions:
    """One tile in image pixels: its core ``[y0, y1) x [x0, x1)``, the head region
    ``head`` and the neck's crop ``crop`` (each ``(y0, y1, x0, x1)``, clipped to the
    padded image), and its position ``(row, col)`` in the grid of tiles."""

    y0: int
    y1: int
    x0: int
    x1: int
    head: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]
    index: tuple[int, int]


def detection_tiles(height: int, width: int, tiling: DetectionTiling,
                    rows: Optional[tuple[int, int]] = None) -> list[TileRegions]:
    """The tiles covering a ``height x width`` padded image (only those whose cores start
    in rows ``[r0, r1)`` when ``rows`` is given), row by row."""
    t, m, h = tiling.tile, tiling.margin, tiling.halo
    r0, r1 = rows if rows is not None else (0, height)
    out = []
    for i, y0 in enumerate(range(0, height, t)):
        if not r0 <= y0 < r1:
            continue
        for j, x0 in enumerate(range(0, width, t)):
            y1, x1 = min(height, y0 + t), min(width, x0 + t)
            head, crop = ((max(0, y0 - d), min(height, y1 + d), max(0, x0 - d),
                           min(width, x1 + d)) for d in (m + h, m + 2 * h))
            out.append(TileRegions(y0, y1, x0, x1, head, crop, (i, j)))
    return out


def _is(obj: Any, names: Sequence[str]) -> bool:
    return any(c.__name__ in names for c in type(obj).__mro__)


def check_tileable(model: Any) -> None:
    """Refuse, naming it, a detector whose heads cannot run tile by tile."""
    name = type(model).__name__
    refused = ('DetectionTransformer', 'SingleStageInstanceSegmentor', 'MaskFormer', 'GLIP',
               'TwoStagePanopticSegmentor', 'SparseRCNN', 'PointRend')
    if _is(model, refused):
        raise ValueError(f'{name}: its heads are not local (queries over the whole image, or '
                         'masks at image size), so they cannot run tile by tile; whole-image '
                         'detection by regions supports single-stage detectors with dense '
                         'heads and two-stage detectors with RPN + RoI heads')
    dense = ('AnchorHead', 'AnchorFreeHead')
    if _is(model, ('TwoStageDetector', )):
        rpn, roi = getattr(model, 'rpn_head', None), getattr(model, 'roi_head', None)
        if rpn is None or not _is(rpn, dense):
            raise ValueError(f'{name}: the proposal head {type(rpn).__name__} cannot run tile by '
                             'tile (an anchor-based RPN is needed)')
        roi_types = ('StandardRoIHead', 'CascadeRoIHead', 'DoubleHeadRoIHead', 'DynamicRoIHead')
        if type(roi).__name__ not in roi_types or getattr(roi, 'with_semantic', False):
            raise ValueError(f'{name}: the RoI head {type(roi).__name__} cannot run tile by tile '
                             f'(supported: {", ".join(roi_types)})')
        heads = _mask_heads(roi)
        for mh in heads:
            if not _is(mh, ('FCNMaskHead', )) or _is(mh, ('CoarseMaskHead', )):
                raise ValueError(f'{name}: the mask head {type(mh).__name__} cannot run tile by '
                                 'tile (an FCN mask head is needed)')
    elif _is(model, ('SingleStageDetector', )):
        head = getattr(model, 'bbox_head', None)
        if head is None or not _is(head, dense) or _is(head, ('RTMDetInsHead', )):
            raise ValueError(f'{name}: the head {type(head).__name__} cannot run tile by tile '
                             '(an anchor-based or anchor-free dense head is needed)')
    else:
        raise ValueError(f'{name}: not a detector whose heads can run tile by tile')
    if not getattr(model, 'with_neck', False):
        raise ValueError(f'{name}: a detector without a neck is not supported by tiles')


#: Finest pixels of the side of :func:`_probe_neck`'s zero crop: every usual level (down
#: to 1/64 of it) is a whole map.
_PROBE_SIDE = 64


def _probe_crops(feats: Sequence[Tensor]) -> list[Tensor]:
    """Small zero maps shaped as the backbone's (the finest ``_PROBE_SIDE`` pixels)."""
    side = _PROBE_SIDE
    return [f.new_zeros(1, f.shape[1], side * f.shape[2] // feats[0].shape[2] or 1,
                        side * f.shape[3] // feats[0].shape[3] or 1) for f in feats]


def _probe_neck(model: Any, feats: Sequence[Tensor]) -> list[Tensor]:
    """The neck's outputs on a small zero crop of the backbone's maps."""
    with torch.no_grad():
        return list(model.neck(_probe_crops(feats)))


def pyramid_halo(model: Any, feats: Sequence[Tensor], stride: int, strides: Sequence[int],
                 tiling: DetectionTiling) -> int:
    """Backbone context around a rectangle of the neck in :class:`TilePyramid`: the
    neck's own receptive radius (:func:`neck_reach`: 60 px for FPN on strides 4-32)
    rounded up to its coarsest stride, so that every level of a rectangle starts on a
    whole pixel; the tiling's ``halo`` (what the heads need) when that is not known or
    larger. 256 px of halo around 2560 px rectangles computed the neck on 44% more
    pixels than it keeps; 64 px, 10%."""
    reach = neck_reach(model.neck, _probe_crops(feats), stride)
    if reach is None:
        return tiling.halo
    step = max(strides)
    return min(tiling.halo, -(-reach // step) * step)


def _probe_strides(probe: Sequence[Tensor], stride: int) -> list[int]:
    """The stride (image pixels) of each output of :func:`_probe_neck`."""
    return [stride * _PROBE_SIDE // o.shape[2] for o in probe]


def neck_strides(model: Any, feats: Sequence[Tensor], stride: int) -> list[int]:
    """The stride (image pixels) of each of the neck's outputs, from a run on a small
    zero crop of the backbone's maps."""
    return _probe_strides(_probe_neck(model, feats), stride)


def pyramid_reach(model: Any, feats: Sequence[Tensor], stride: int) -> int:
    """Image rows beyond its head regions that a tile row's neck maps are computed over
    when the dense head runs over the image (its receptive radius at the coarsest
    level), else 0: with ``margin + 2 * halo``, what a rank fetches from its
    neighbours."""
    head = dense_head_of(model)
    probe = _probe_neck(model, feats)
    if head is None or local_dense_head(model, probe) is None:
        return 0
    return dense_head_reach(head) * max(_probe_strides(probe, stride))


def row_span(tiles: Sequence[TileRegions]) -> int:
    """The most image rows the head regions of one row of ``tiles`` span."""
    by_row: dict[int, list[TileRegions]] = {}
    for t in tiles:
        by_row.setdefault(t.y0, []).append(t)
    return max(max(t.head[1] for t in r) - min(t.head[0] for t in r) for r in by_row.values())


def global_neck(probe: Sequence[Tensor], strides: Sequence[int], width: int,
                tiling: DetectionTiling, tiles: Sequence[TileRegions]) -> bool:
    """Whether the neck runs once over the image (see :class:`DetectionTiling`), from
    its outputs ``probe`` on a small crop and their ``strides``, for the ``tiles`` of
    an image ``width`` pixels wide."""
    if tiling.neck != 'auto':
        return tiling.neck == 'global'
    if current_spill() is not None:
        return True
    rows = row_span(tiles)
    nbytes = sum(o.shape[1] * o.element_size() * -(-rows // s) * -(-width // s)
                 for o, s in zip(probe, strides))
    return nbytes <= GLOBAL_NECK_BYTES


def _mask_heads(roi: Any) -> list:
    """The mask heads of a RoI head (every stage's for a cascade), or none."""
    if roi is None or not getattr(roi, 'with_mask', False):
        return []
    head = roi.mask_head
    return list(head) if isinstance(head, torch.nn.ModuleList) else [head]


@contextlib.contextmanager
def threaded_roi_pooling(model: Any) -> Iterator[int]:
    """Inside this context the model's average RoIAlign layers (mmcv's, one core) pool
    their regions on every core (:func:`~mmlinattn.ops.roi_align.threaded_roi_align`:
    the same values, bit for bit). Yields how many layers it took over."""
    from mmcv.ops import RoIAlign

    from ..ops.roi_align import threaded_roi_align
    layers = [m for m in model.modules()
              if isinstance(m, RoIAlign) and m.pool_mode == 'avg' and not m.use_torchvision]

    def pooled(layer: Any) -> Callable[[Tensor, Tensor], Tensor]:
        def forward(feats: Tensor, rois: Tensor) -> Tensor:
            return threaded_roi_align(feats, rois, layer.output_size, layer.spatial_scale,
                                      layer.sampling_ratio, layer.aligned)
        return forward
    with patched_attributes((layer, 'forward', pooled(layer)) for layer in layers) as taken:
        yield taken


#: Regions a RoI head's box and mask branches take at once in tiled inference (see
#: :func:`chunked_roi_forwards`).
ROI_CHUNKS = {'_bbox_forward': 2048, '_mask_forward': 128}


def _in_chunks(forward: Callable[..., dict], size: int) -> Callable[..., dict]:
    """``forward(..., rois)`` (a RoI head's ``_bbox_forward`` or ``_mask_forward``) over
    ``size`` regions at a time, its tensors concatenated; the pooled features it also
    returns (``bbox_feats``, ``mask_feats``: read in training only) are dropped."""
    def run(*args: Any, **kwargs: Any) -> dict:
        rois = args[-1] if args else None
        if kwargs or not isinstance(rois, Tensor) or rois.dim() != 2 or len(rois) <= size:
            return forward(*args, **kwargs)
        parts = [forward(*args[:-1], rois[i:i + size]) for i in range(0, len(rois), size)]
        out: dict = {}
        for key in parts[0]:
            values = [p[key] for p in parts]
            if key.endswith('_feats'):
                out[key] = None
            elif all(isinstance(v, Tensor) for v in values):
                out[key] = torch.cat(values)
            else:  # not a tensor per region: this head's outputs cannot be split
                return forward(*args, **kwargs)
        return out
    return run


@contextlib.contextmanager
def chunked_roi_forwards(model: Any) -> Iterator[int]:
    """Inside this context (inference only) the RoI head's box branch pools and
    classifies :data:`ROI_CHUNKS` regions at a time, and its mask branch likewise: each
    region's result is computed from its own features alone, so the results are those
    of one pass, and the pooled features of a tile's thousands of proposals (8000 x 256
    x 7 x 7 float32: 401 MB, twice while the threads' parts are joined) and of its
    masks (800 upsampled 28 x 28 maps of 256 channels: 642 MB) are never held at once.
    Yields how many branches it took over."""
    roi = getattr(model, 'roi_head', None)
    names = [name for name in ROI_CHUNKS if roi is not None and hasattr(roi, name)]
    with patched_attributes((roi, name, _in_chunks(getattr(roi, name), ROI_CHUNKS[name]))
                            for name in names) as taken:
        yield taken


@contextlib.contextmanager
def local_mask_paste(model: Any) -> Iterator[None]:
    """mmdet's mask heads paste each mask at the image's size; inside this context they
    return :class:`LocalMasks` (each mask over its box's own pixels, pasted exactly as
    mmdet pastes on the CPU) instead."""
    heads = _mask_heads(getattr(model, 'roi_head', None))
    with patched_attributes((mh, '_predict_by_feat_single', _local_paste(mh))
                            for mh in heads):
        yield


class LocalMasks:
    """The masks of a tile's detections, each over its box's pixels (``LocalMask`` in the
    head region's coordinates); indexable like the tensor mmdet would hold."""

    def __init__(self, masks: list[LocalMask]) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, int):
            return self.masks[item]
        idx = torch.arange(len(self.masks))[item].tolist()
        return LocalMasks([self.masks[i] for i in idx])

    def cat(self, parts: Sequence[LocalMasks]) -> LocalMasks:
        """``parts`` joined (how mmengine's ``InstanceData`` indexes such fields)."""
        return LocalMasks([m for p in parts for m in p.masks])


def _local_paste(head: Any) -> Callable[..., LocalMasks]:
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask

    def paste(mask_preds: Tensor, bboxes: Tensor, labels: Tensor, img_meta: dict,
              rcnn_test_cfg: Any, rescale: bool = False, activate_map: bool = False
              ) -> LocalMasks:
        if tuple(img_meta.get('scale_factor', (1., 1.))) != (1., 1.):
            raise ValueError('tiled detection pastes masks at the scale of the image read')
        img_h, img_w = img_meta['ori_shape'][:2]
        probs = mask_preds.sigmoid() if not activate_map else mask_preds.to(bboxes)
        if not head.class_agnostic:
            probs = probs[range(len(probs)), labels][:, None]
        threshold = rcnn_test_cfg.mask_thr_binary
        out = []
        for i in range(len(probs)):  # mmdet's CPU paste: one box at a time, its region only
            m, (ys, xs) = _do_paste_mask(probs[i:i + 1], bboxes[i:i + 1], img_h, img_w,
                                         skip_empty=True)
            bits = (m[0] >= threshold).numpy()
            out.append(LocalMask(int(ys.start), int(xs.start), bits))
        return LocalMasks(out)

    return paste


def _samples(model: Any, head: tuple[int, int, int, int], image_hw: tuple[int, int]) -> list:
    from mmdet.structures import DetDataSample
    y0, y1, x0, x1 = head
    shown = (max(0, min(y1, image_hw[0]) - y0), max(0, min(x1, image_hw[1]) - x0))
    meta = dict(img_shape=shown, ori_shape=shown, pad_shape=(y1 - y0, x1 - x0),
                batch_input_shape=(y1 - y0, x1 - x0), scale_factor=(1., 1.))
    return [DetDataSample(metainfo=meta)]


#: The image area (pixels) the configs' budgets are meant for: COCO's 1333 x 800 test scale.
BUDGET_AREA = 1333 * 800
#: The most a tile's count budgets are scaled (each proposal costs the RoI head's work).
MAX_BUDGET_SCALE = 8.0
#: With budgets by score, how many times their count budgets a level's candidates before
#: suppression and the proposals after it may reach (guards against a model that scores
#: everything; the RoI head holds 50 KB of features a proposal).
PRE_NMS_FACTOR = 8
PROPOSALS_FACTOR = 4


def budget_scale(tiling: DetectionTiling) -> float:
    """How many times the config's count budgets a tile gets (``tiling.budget_scale``,
    or the area of a whole head region over :data:`BUDGET_AREA`, between 1 and
    :data:`MAX_BUDGET_SCALE`)."""
    if tiling.budget_scale is not None:
        return float(tiling.budget_scale)
    side = tiling.tile + 2 * (tiling.margin + tiling.halo)
    return min(MAX_BUDGET_SCALE, max(1.0, side * side / BUDGET_AREA))


def _keep_scoring(head: Any, thr: float, reached: list) -> Callable[..., Any]:
    """The RPN's post-processing with the proposals scoring below ``thr`` dropped first.
    Greedy suppression visits boxes by falling score, so the proposals it keeps among
    those scoring ``>= thr`` do not depend on the lower ones: the rule is local. Notes
    in ``reached`` when a level's candidates were cut before all scoring ``>= thr``
    were in, and when the proposals fill ``max_per_img``."""
    post = head._bbox_post_process

    def post_process(results: Any, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        above = results.scores >= thr
        if len(results):
            per_level = torch.bincount(results.level_ids)
            full = torch.bincount(results.level_ids[above], minlength=len(per_level))
            if bool(((per_level >= cfg.nms_pre) & (full == per_level)).any()):
                reached.append('candidates')
        out = post(results[above], cfg, *args, **kwargs)
        if len(out) >= cfg.max_per_img:
            reached.append('proposals')
        return out
    return post_process


@contextlib.contextmanager
def detection_budgets(model: Any, tiling: DetectionTiling, regions: float = 1.0
                      ) -> Iterator[dict]:
    """The budgets of one head region (``regions``: of an image worth that many head
    regions, for the whole-image reference). Yields the budgets in force, with
    ``reached``: a list that gets an entry each time a cap binds.

    The caps are the config's budgets (RPN or dense head ``nms_pre`` per level, RPN
    ``max_per_img``, final ``max_per_img``) times :func:`budget_scale` and ``regions``;
    the final one ``tiling.max_per_tile`` when given. They bound the heads' memory.

    * By score (``tiling.proposal_thr`` set, the default): the RPN keeps every proposal
      whose objectness reaches ``proposal_thr`` (candidates per level up to
      :data:`PRE_NMS_FACTOR` times the cap, proposals up to :data:`PROPOSALS_FACTOR`
      times the cap), and the final detections are those above
      the config's ``score_thr``: what a region keeps then depends only on what it
      sees, so tiles give the whole image's detections, as long as no cap binds
      (``reached`` says when one does).
    * By count (``proposal_thr=None``): the top-k of the caps, as mmdet does for a
      whole image. A top-k depends on the rest of the region, so tiles and the whole
      image differ wherever one binds."""
    rpn = getattr(model, 'rpn_head', None)
    roi = getattr(model, 'roi_head', None)
    head = getattr(model, 'bbox_head', None)
    final = roi.test_cfg if roi is not None else head.test_cfg if head is not None else None
    by_score = tiling.proposal_thr is not None
    scale = budget_scale(tiling) * regions
    pre = PRE_NMS_FACTOR if by_score else 1
    changes = []  # (cfg, shown name, key, new value)
    candidates = rpn.test_cfg if rpn is not None else final if head is not None else None
    if candidates is not None and candidates.get('nms_pre', 0) > 0:
        changes.append((candidates, 'candidates per level', 'nms_pre',
                        int(candidates['nms_pre'] * scale * pre)))
    if rpn is not None and rpn.test_cfg.get('max_per_img', 0) > 0:
        changes.append((rpn.test_cfg, 'proposals', 'max_per_img',
                        int(rpn.test_cfg['max_per_img'] * scale
                            * (PROPOSALS_FACTOR if by_score else 1))))
    if final is not None and final.get('max_per_img', 0) > 0:
        changes.append((final, 'detections', 'max_per_img',
                        tiling.max_per_tile or int(final['max_per_img'] * scale)))
    saved = [(cfg, key, cfg[key]) for cfg, _, key, _ in changes]
    for cfg, _, key, value in changes:
        cfg[key] = value
    reached: list = []
    shown: dict = dict(rule='by score' if by_score else 'by count')
    if by_score:
        if rpn is not None:
            rpn._bbox_post_process = _keep_scoring(rpn, tiling.proposal_thr, reached)
            shown['objectness >='] = tiling.proposal_thr
        shown['score >='] = final.get('score_thr', 0.0) if final is not None else 0.0
    shown.update({name: value for _, name, _, value in changes})
    try:
        yield dict(shown, reached=reached)
    finally:
        if by_score and rpn is not None:
            del rpn._bbox_post_process
        for cfg, key, value in saved:
            cfg[key] = value


def suppress_nested(instances: Any, ios: Optional[float]) -> Any:
    """``instances`` (mmdet's, of one image or head region) without the detections that
    are nested with a better-scoring kept detection of the same class: more than ``ios``
    of the smaller of the two boxes inside the other (greedy, by falling score; ``None``
    or 1: all kept). Mask R-CNN's per-class suppression compares boxes by IoU, which
    keeps a small box nested in a large one: two detections of one object. The rule
    reads only boxes that overlap, so a tile applies it as the whole image would."""
    if ios is None or len(instances) < 2:
        return instances
    order = torch.argsort(instances.scores, descending=True, stable=True)
    b, labels = instances.bboxes.double()[order], instances.labels[order]
    area = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    nested = torch.zeros(len(b), len(b), dtype=torch.bool)
    for r in range(0, len(b), 1024):  # rows in blocks: a boolean n x n at most
        lt = torch.maximum(b[r:r + 1024, None, :2], b[None, :, :2])
        rb = torch.minimum(b[r:r + 1024, None, 2:], b[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        smaller = torch.minimum(area[r:r + 1024, None], area[None, :])
        nested[r:r + 1024] = ((inter > ios * smaller)
                              & (labels[r:r + 1024, None] == labels[None, :]))
    keep = torch.ones(len(b), dtype=torch.bool)
    for i in range(1, len(b)):  # i dropped when nested in a kept, better-scoring one
        keep[i] = not bool((nested[i, :i] & keep[:i]).any())
    return instances[order[keep].sort().values]


def detect_tile(model: Any, feats: Sequence[Tensor], stride: int, strides: Sequence[int],
                t: TileRegions, image_hw: tuple[int, int], row0: int = 0,
                reached: Optional[list] = None, nested_ios: Optional[float] = 0.5,
                timings: Optional[dict] = None, pyramid: Optional[TilePyramid] = None
                ) -> tuple[list[DetectedObject], list[DetectedObject]]:
    """The neck and heads of one tile: its objects (centre in the core, boxes in image
    pixels) and its truncated detections (boxes cut at the head region's border inside
    the image, whose box meets the core). ``feats``: the backbone's maps (finest first,
    ``stride`` image pixels per finest pixel), holding the image rows from ``row0`` (a
    rank's band with its neighbours' rows); ``strides``: of the neck's outputs;
    ``reached`` gets ``'detections'`` when the final budget binds; ``nested_ios``: see
    :func:`suppress_nested`; ``timings``: seconds spent reading the crops (``read_s``),
    in the neck (``neck_s``) and in the heads (``heads_s``) and
    sorting their objects (``objects_s``) are added to it; ``pyramid``: the neck's (and
    the dense head's) maps over the image, computed beyond the tile's head region, from
    which the tile's are cropped (else the neck runs on the tile's crop). Run inside
    :func:`local_mask_paste`, :func:`detection_budgets` and under ``torch.no_grad``."""
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now
    hy0, hy1, hx0, hx1 = t.head
    dense_outs = None
    if pyramid is not None:
        head_feats = pyramid.neck_crop(t.head)
        dense_outs = pyramid.head_crop(t.head)
        lap('read_s')
    else:
        finest = feats[0]
        scales = [finest.shape[2] / f.shape[2] for f in feats]
        cy0, cy1, cx0, cx1 = (v // stride for v in t.crop)
        r0 = row0 // stride
        # Copied once: the maps may be memory-mapped files, read here page by page.
        crops = [_box(f, cy0 - r0, cy1 - r0, cx0, cx1, s).contiguous()
                 for f, s in zip(feats, scales)]
        lap('read_s')
        outs = model.neck(crops)
        lap('neck_s')
        # The neck's outputs on the head region (each level starts on a whole pixel).
        oy, ox = hy0 - t.crop[0], hx0 - t.crop[2]
        # Contiguous: mmcv's CPU RoIAlign reads its input as a dense array (a strided view
        # gives other features, silently).
        head_feats = [o[:, :, oy // s:-(-(oy + hy1 - hy0) // s),
                        ox // s:-(-(ox + hx1 - hx0) // s)].contiguous()
                      for o, s in zip(outs, strides)]
    samples = _samples(model, t.head, image_hw)
    # mmdet's heads run in fp32 even under bf16 autocast: mmcv's CPU NMS and RoIAlign take
    # float32 only, and the heads are a small share of the time. (No-ops in fp32.)
    head_feats = [f.float() for f in head_feats]
    if dense_outs is not None:
        dense_outs = tuple([o.float() for o in kind] for kind in dense_outs)
    with torch.autocast(head_feats[0].device.type, enabled=False), \
            features_given(model, head_feats), contextlib.ExitStack() as stack:
        if dense_outs is not None:
            stack.enter_context(precomputed_outputs(dense_head_of(model), dense_outs))
        result = model.predict(None, samples, rescale=False)[0].pred_instances
    lap('heads_s')
    final = model.roi_head if getattr(model, 'roi_head', None) is not None else model.bbox_head
    if reached is not None and len(result) >= final.test_cfg.get('max_per_img', 10**12) > 0:
        reached.append('detections')
    result = suppress_nested(result, nested_ios)
    shown_h, shown_w = samples[0].metainfo['img_shape']
    boxes = result.bboxes.double() + torch.tensor([hx0, hy0, hx0, hy0], dtype=torch.float64)
    masks = result.masks if 'masks' in result else None
    own, cut = [], []
    eps = 1e-3
    # A border of the head region inside the image cuts what reaches it.
    inner = (hx0 > 0, hy0 > 0, hx0 + shown_w < image_hw[1], hy0 + shown_h < image_hw[0])
    core = (t.y0, t.y1, t.x0, t.x1)
    for i in range(len(boxes)):
        x0, y0, x1, y1 = boxes[i].tolist()
        mask = masks[i].shifted(hy0, hx0) if masks is not None else None
        obj = DetectedObject(int(result.labels[i]), float(result.scores[i]),
                             (x0, y0, x1, y1), mask)
        touches = ((inner[0] and x0 <= hx0 + eps) or (inner[1] and y0 <= hy0 + eps)
                   or (inner[2] and x1 >= hx0 + shown_w - eps)
                   or (inner[3] and y1 >= hy0 + shown_h - eps))
        if touches:
            if x0 < core[3] and x1 > core[2] and y0 < core[1] and y1 > core[0]:
                obj.extra = dict(tile=list(t.index), head=list(t.head))
                cut.append(obj)
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if core[0] <= cy < core[1] and core[2] <= cx < core[3]:
            own.append(obj)
    lap('objects_s')
    return own, cut


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _clip(b: Sequence[float], w: Sequence[int]) -> tuple[float, float, float, float]:
    """Box ``b`` (x0, y0, x1, y1) cut to window ``w`` (y0, y1, x0, x1)."""
    return (max(b[0], w[2]), max(b[1], w[0]), min(b[2], w[3]), min(b[3], w[1]))


def merge_truncated(parts: list[DetectedObject], merge_iou: float = 0.5
                    ) -> list[DetectedObject]:
    """Objects made of the truncated detections of neighbouring tiles: two parts of the
    same class from different tiles are one object when their boxes, cut to the window
    both tiles' head regions see, overlap with IoU >= ``merge_iou``. Each object: the
    union of its parts' boxes and masks, the best score, ``extra['parts']``."""
    n = len(parts)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        a = parts[i]
        for j in range(i + 1, n):
            b = parts[j]
            if a.label != b.label or a.extra['tile'] == b.extra['tile']:
                continue
            ha, hb = a.extra['head'], b.extra['head']
            shared = (max(ha[0], hb[0]), min(ha[1], hb[1]), max(ha[2], hb[2]), min(ha[3], hb[3]))
            if shared[0] >= shared[1] or shared[2] >= shared[3]:
                continue
            if _box_iou(_clip(a.bbox, shared), _clip(b.bbox, shared)) >= merge_iou:
                parent[find(j)] = find(i)
    groups: dict[int, list[DetectedObject]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(parts[i])
    merged = []
    for members in groups.values():
        box = (min(m.bbox[0] for m in members), min(m.bbox[1] for m in members),
               max(m.bbox[2] for m in members), max(m.bbox[3] for m in members))
        best = max(members, key=lambda m: m.score)
        mask = None
        if all(m.mask is not None for m in members):
            y0 = min(m.mask.y0 for m in members)
            x0 = min(m.mask.x0 for m in members)
            y1 = max(m.mask.y0 + m.mask.bits.shape[0] for m in members)
            x1 = max(m.mask.x0 + m.mask.bits.shape[1] for m in members)
            bits = np.zeros((y1 - y0, x1 - x0), bool)
            for m in members:
                h, w = m.mask.bits.shape
                bits[m.mask.y0 - y0:m.mask.y0 - y0 + h, m.mask.x0 - x0:m.mask.x0 - x0 + w] |= \
                    m.mask.bits
            mask = LocalMask(y0, x0, bits)
        merged.append(DetectedObject(best.label, best.score, box, mask,
                                     dict(parts=len(members))))
    return merged


def run_detection_tiles(model: Any, feats: Sequence[Tensor], stride: int,
                        image_hw: tuple[int, int], tiling: DetectionTiling,
                        emit_row: Callable[[int, list[DetectedObject], list[DetectedObject]],
                                           None],
                        rows_done: Optional[set[int]] = None, progress: Progress = None,
                        band: Optional[tuple[int, int, int, int]] = None) -> dict:
    """Every tile of the padded image, tile row by tile row, skipping the rows (first
    image row of each) in ``rows_done``; after each row ``emit_row(row_y0, objects,
    truncated)``. ``band=(a, b, row0, height)``: only the tiles whose cores start in
    image rows ``[a, b)`` of a padded image ``height`` rows high, ``feats`` holding
    its rows from ``row0`` (spatial ranks). Returns timings and the number of tiles."""
    probe = _probe_neck(model, feats)  # one small run: strides, sizes, the dense head
    strides = _probe_strides(probe, stride)
    tiling.check(max(SIZE_DIVISOR, max(strides)))
    a, b, row0, height = band if band is not None else (0, feats[0].shape[2] * stride, 0,
                                                        feats[0].shape[2] * stride)
    tiles = detection_tiles(height, feats[0].shape[3] * stride, tiling, (a, b))
    done = rows_done or set()
    count = sum(1 for t in tiles if t.y0 in done)
    start = time.perf_counter()
    timings: dict = {}
    todo = [t for t in tiles if t.y0 not in done]
    pyramid = None
    width = feats[0].shape[3] * stride
    if todo and global_neck(probe, strides, width, tiling, todo):
        # The maps hold the rows one row of tiles reads (a ring), not the image's.
        ring = row_span(todo)
        pyramid = TilePyramid(
            model, feats, stride, row0, strides,
            (min(t.head[0] for t in todo), max(t.head[1] for t in todo)), width,
            pyramid_halo(model, feats, stride, strides, tiling), tiling.tile + 2 * tiling.margin,
            local_dense_head(model, probe), timings, ring=ring)
    with torch.no_grad(), local_mask_paste(model), threaded_roi_pooling(model), \
            detection_budgets(model, tiling) as budgets, reused_heap(), \
            fast_cpu_heads(dense_head_of(model), getattr(model, 'roi_head', None)), \
            chunked_roi_forwards(model):
        row: list[TileRegions] = []
        for k, t in enumerate(tiles):
            if t.y0 in done:
                continue
            row.append(t)
            if k + 1 < len(tiles) and tiles[k + 1].y0 == t.y0:
                continue
            objects: list[DetectedObject] = []
            truncated: list[DetectedObject] = []
            if pyramid is not None:
                pyramid.release(min(tr.head[0] for tr in row))
                pyramid.reach(max(tr.head[1] for tr in row))
            for tr in row:
                own, cut = detect_tile(model, feats, stride, strides, tr, image_hw, row0,
                                       budgets['reached'], tiling.nested_ios, timings,
                                       pyramid)
                # Tiles allocate sizes that vary with their content: without a bound
                # the kept memory fragments.
                trim_retained()
                objects += own
                truncated += cut
                count += 1
                if progress is not None:
                    progress(count, len(tiles))
            emit_row(t.y0, objects, truncated)
            row = []
    reached = budgets.pop('reached')
    return dict(heads_s=time.perf_counter() - start, tiles=len(tiles), budgets=budgets,
                neck='global' if pyramid is not None else 'tiles',
                dense_head='global' if pyramid is not None and pyramid.head is not None
                else 'tiles',
                tile_s={k: round(v, 2) for k, v in timings.items()},
                budget_reached={k: reached.count(k)
                                for k in ('candidates', 'proposals', 'detections')})


def result_objects(instances: Any) -> list[DetectedObject]:
    """mmdet's predicted instances of a whole image as objects, each mask cut to the
    pixels of its own box (the reference path's masks are image-sized)."""
    boxes = instances.bboxes.double().cpu()
    masks = instances.masks if 'masks' in instances else None
    out = []
    for i in range(len(boxes)):
        x0, y0, x1, y1 = boxes[i].tolist()
        mask = None
        if isinstance(masks, LocalMasks):  # pasted over the box (local_mask_paste)
            mask = masks[i]
        elif masks is not None:
            ys, xs = torch.nonzero(masks[i], as_tuple=True)
            if len(ys):
                top, left = int(ys.min()), int(xs.min())
                mask = LocalMask(top, left, masks[i][top:int(ys.max()) + 1,
                                                     left:int(xs.max()) + 1].numpy().astype(bool))
            else:
                mask = LocalMask(0, 0, np.zeros((0, 0), bool))
        out.append(DetectedObject(int(instances.labels[i]), float(instances.scores[i]),
                                  (x0, y0, x1, y1), mask))
    return out


def match_detections(ours: Sequence[DetectedObject], reference: Any, iou: float = 0.95,
                     score_tol: float = 1e-3) -> dict:
    """How many of the reference detections (mmdet instances or objects) ours match
    one to one (same class, box IoU >= ``iou``, scores within ``score_tol``), greedily
    by the reference's score: ``matched`` and ``extra`` as shares of the reference's
    count, and the counts."""
    ref = reference if isinstance(reference, (list, tuple)) else result_objects(reference)
    used = [False] * len(ours)
    by_label: dict[int, list[int]] = {}
    for j, o in enumerate(ours):
        by_label.setdefault(o.label, []).append(j)
    matched = 0
    for r in sorted(ref, key=lambda o: -o.score):
        best, best_iou = None, iou
        for j in by_label.get(r.label, []):
            if used[j] or abs(ours[j].score - r.score) > score_tol:
                continue
            v = _box_iou(ours[j].bbox, r.bbox)
            if v >= best_iou:
                best, best_iou = j, v
        if best is not None:
            used[best] = True
            matched += 1
    n = max(1, len(ref))
    return dict(reference=len(ref), ours=len(ours), matched_count=matched,
                matched=matched / n if ref else 1.0,
                extra=(len(ours) - matched) / n if ref else float(len(ours) > 0))


# -- the coarse pass for objects larger than the margin ----------------------------------

def upscaled(obj: DetectedObject, factor: int) -> DetectedObject:
    """An object found ``factor`` times coarser, in the pixels of the level read (its
    mask's pixels repeated ``factor x factor``)."""
    box = tuple(v * factor for v in obj.bbox)
    mask = None
    if obj.mask is not None:
        m = obj.mask
        bits = np.repeat(np.repeat(m.bits, factor, 0), factor, 1)
        mask = LocalMask(m.y0 * factor, m.x0 * factor, bits)
    return DetectedObject(obj.label, obj.score, box, mask,  # type: ignore[arg-type]
                          dict(obj.extra, coarse=factor))


def _side(obj: DetectedObject) -> float:
    return max(obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1])


def _inside_share(small: DetectedObject, large: DetectedObject) -> float:
    """The share of ``small`` inside ``large``: of its mask's pixels when both have
    masks, else of its box's area."""
    a, b = small.bbox, large.bbox
    if small.mask is not None and large.mask is not None and small.mask.bits.any():
        s, g = small.mask, large.mask
        y0, x0 = max(s.y0, g.y0), max(s.x0, g.x0)
        y1 = min(s.y0 + s.bits.shape[0], g.y0 + g.bits.shape[0])
        x1 = min(s.x0 + s.bits.shape[1], g.x0 + g.bits.shape[1])
        if y0 >= y1 or x0 >= x1:
            return 0.0
        both = (s.bits[y0 - s.y0:y1 - s.y0, x0 - s.x0:x1 - s.x0]
                & g.bits[y0 - g.y0:y1 - g.y0, x0 - g.x0:x1 - g.x0])
        return float(both.sum()) / float(s.bits.sum())
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area if area > 0 else 0.0


class LargeObjects:
    """The objects of a coarse pass that are larger than ``split`` pixels (their longer
    side, in pixels of the level read), and the rule that joins them with the fine
    pass: a fine detection is kept when its longer side is at most ``split`` (tiles see
    it whole) and no large object of its class holds more than ``inside`` of it (else
    it is a fragment of that object, which the detector saw cut by its field of view).
    Indexed by cells of ``cell`` pixels."""

    def __init__(self, coarse: Sequence[DetectedObject], split: float, inside: float = 0.5,
                 cell: int = 1024) -> None:
        self.objects = [o for o in coarse if _side(o) > split]
        self.split, self.inside, self.cell = split, inside, cell
        self.grid: dict[tuple[int, int], list[int]] = {}
        for i, o in enumerate(self.objects):
            for key in self._cells(o):
                self.grid.setdefault(key, []).append(i)
        self.replaced = self.fragments = 0

    def _cells(self, o: DetectedObject) -> Iterator[tuple[int, int]]:
        c = self.cell
        for cy in range(int(o.bbox[1] // c), int(o.bbox[3] // c) + 1):
            for cx in range(int(o.bbox[0] // c), int(o.bbox[2] // c) + 1):
                yield cy, cx

    def keeps(self, obj: DetectedObject) -> bool:
        """Whether a fine detection stays (counted in ``replaced`` or ``fragments``
        when not)."""
        if _side(obj) > self.split:
            self.replaced += 1
            return False
        seen: set[int] = set()
        for key in self._cells(obj):
            for i in self.grid.get(key, ()):
                if i in seen:
                    continue
                seen.add(i)
                big = self.objects[i]
                if big.label == obj.label and _inside_share(obj, big) > self.inside:
                    self.fragments += 1
                    return False
        return True
