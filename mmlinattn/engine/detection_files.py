"""Whole-image detection of an image file, by regions, into streamed object files.

:func:`detect_file` joins the pieces: a region reader feeds the chunked backbone band
by band (the global backbone, exact); the neck and heads run tile by tile
(:mod:`mmlinattn.engine.tiled_detection`); each finished row of tiles is staged as
JSON lines in the run folder; at the end the staged objects, and the merged large
objects, are streamed to every output (:mod:`mmlinattn.rasters.objects`). Memory holds
one row of tiles' objects at a time, whatever their number.

With a spill folder the backbone's maps are memory-mapped files there and the run is
resumable: the maps are kept when the backbone finishes and every staged row is
recorded in ``state.json`` after its file is complete, so ``resume=True`` continues
from the next row of tiles. ``background``: only the tissue's block rows and columns
are predicted (a compacted image), and the objects are mapped back to the image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import os.path as osp
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import parallel as sp
from ..parallel import SpatialGroup
from ..rasters import DownsampledReader, RegionReader
from ..rasters.objects import (
    DetectedObject,
    LocalMask,
    check_outputs,
    open_sinks,
    write_objects,
)
from ..rasters.writers import default_palette
from ..utils.atomic import atomic_write
from .large_files import RunFolder, _counting_blocks, _file_digest, compact_background
from .large_image import SIZE_DIVISOR, Progress, _features, _padded, backbone_maps, row_source
from .tiled_detection import (
    DetectionTiling,
    LargeObjects,
    check_tileable,
    merge_truncated,
    pyramid_reach,
    run_detection_tiles,
    upscaled,
)

__all__ = ['detect_file', 'detection_classes']


def detection_classes(model: Any) -> tuple[list[str], list[list[int]]]:
    """The detector's class names and RGB palette (its dataset's, or indices and a fixed
    palette)."""
    meta = getattr(model, 'dataset_meta', None) or {}
    classes = list(meta.get('classes') or ())
    if not classes:
        roi = getattr(model, 'roi_head', None)
        head = roi.bbox_head if roi is not None else model.bbox_head
        if isinstance(head, torch.nn.ModuleList):  # a cascade: the last stage's
            head = head[-1]
        classes = [str(i) for i in range(head.num_classes)]
    palette = meta.get('palette') or default_palette(len(classes))
    return classes, [list(map(int, c)) for c in palette][:len(classes)]


class _Staging:
    """Rows of tiles' objects as JSON lines: ``objects/row{y}.jsonl`` (objects owned by
    a tile) and ``objects/cut{y}.jsonl`` (truncated parts), each complete before the
    row is recorded done."""

    def __init__(self, folder: str) -> None:
        self.folder = osp.join(folder, 'objects')
        os.makedirs(self.folder, exist_ok=True)

    def clear(self) -> None:
        for name in os.listdir(self.folder):
            os.remove(osp.join(self.folder, name))

    def write(self, kind: str, y: int, objects: Sequence[DetectedObject]) -> None:
        with atomic_write(osp.join(self.folder, f'{kind}{y:09d}.jsonl'), 'w') as f:
            for obj in objects:
                f.write(json.dumps(obj.to_json()) + '\n')

    def read(self, kind: str) -> Iterator[DetectedObject]:
        for name in sorted(os.listdir(self.folder)):
            if name.startswith(kind) and name.endswith('.jsonl'):
                with open(osp.join(self.folder, name)) as f:
                    for line in f:
                        yield DetectedObject.from_json(json.loads(line))


def _uncompact(obj: DetectedObject, rows: np.ndarray, cols: np.ndarray) -> DetectedObject:
    """An object of the compacted image at its place in the whole image."""
    def coord(v: float, keep: np.ndarray, end: bool) -> float:
        i = min(len(keep) - 1, max(0, int(np.ceil(v)) - 1 if end else int(v)))
        base = float(keep[i])
        return base + 1 - (np.ceil(v) - v) if end else base + (v - int(v))

    x0, y0, x1, y1 = obj.bbox
    box = (coord(x0, cols, False), coord(y0, rows, False), coord(x1, cols, True),
           coord(y1, rows, True))
    mask = None
    if obj.mask is not None:
        m = obj.mask
        h, w = m.bits.shape
        ys = rows[max(0, m.y0):min(len(rows), m.y0 + h)]
        xs = cols[max(0, m.x0):min(len(cols), m.x0 + w)]
        bits = m.bits[max(0, -m.y0):max(0, -m.y0) + len(ys), max(0, -m.x0):max(0, -m.x0) + len(xs)]
        if len(ys) and len(xs):
            full = np.zeros((int(ys[-1] - ys[0]) + 1, int(xs[-1] - xs[0]) + 1), bool)
            full[np.ix_(ys - ys[0], xs - xs[0])] = bits
            mask = LocalMask(int(ys[0]), int(xs[0]), full)
    return DetectedObject(obj.label, obj.score, box, mask, obj.extra)


def detect_file(model: Any, reader: RegionReader, outputs: Sequence[str], *,
                chunk_tokens: int, tiling: Optional[DetectionTiling] = None,
                spill: Optional[str] = None, resume: bool = False,
                background: Optional[str] = None, min_spill_bytes: int = 64 * 2**20,
                progress: Progress = None,
                blocks_progress: Optional[Callable[[int, int], None]] = None,
                settings: Optional[dict] = None, keep_objects: bool = False,
                group: Optional[SpatialGroup] = None, viewer: Optional[str] = None) -> dict:
    """Detect every object of the image of ``reader`` and write ``outputs`` (by suffix:
    ``.json`` COCO results, ``.geojson`` QuPath/GIS, ``.gpkg`` GeoPackage, ``.sqlite``
    an object store) and, with ``viewer`` (a folder), a deep-zoom page drawing them over
    the image. Returns an info dict (timings, tiles, object counts; with
    ``keep_objects`` also ``objects``: the list, for tests and small images).

    ``spill``: a folder for maps too large for memory and for ``resume``;
    ``background``: ``'otsu'`` or a mask file (only tissue is predicted);
    ``settings``: what else must match for ``resume`` (config, weights).
    ``group``: spatial parallelism: every rank passes a reader of the same file, runs
    the backbone on its band of rows, fetches its neighbours' feature rows that its
    tiles' crops need and predicts the tiles whose cores start in its band; the
    group's first rank writes the outputs (with ``spill``, a folder every rank sees,
    ranks stage their objects there; without, they are gathered).
    A failed run leaves no output file.
    """
    check_tileable(model)
    check_outputs(outputs)
    tiling = tiling or DetectionTiling()
    tiling.check(SIZE_DIVISOR)  # before any work; the neck's own stride once it is known
    if resume and not spill:
        raise ValueError('--resume needs --spill DIR (the run is kept there)')
    classes, palette = detection_classes(model)
    h, w = reader.height, reader.width
    info: dict = dict(image=[h, w], level=reader.level, mpp=reader.mpp, tile=tiling.tile,
                      margin=tiling.margin, halo=tiling.halo)
    large = None
    if tiling.coarse > 1:
        large = _coarse_pass(model, reader, tiling, info, chunk_tokens=chunk_tokens,
                             spill=osp.join(spill, 'coarse') if spill else None,
                             resume=resume, background=background, settings=settings,
                             group=group, min_spill_bytes=min_spill_bytes)
    src, keep = compact_background(reader, background, info)
    with contextlib.ExitStack() as stack:
        if spill:
            fingerprint = dict(settings or {}, image=_file_digest(reader.path),
                               level=reader.level, chunk_tokens=chunk_tokens, tile=tiling.tile,
                               margin=tiling.margin, halo=tiling.halo,
                               max_per_tile=tiling.max_per_tile,
                               budget_scale=tiling.budget_scale,
                               proposal_thr=tiling.proposal_thr, coarse=tiling.coarse,
                               neck=tiling.neck,
                               background=background,
                               task='detection', ranks=1 if group is None else group.size)
            rank_folder = spill if group is None else osp.join(spill, f'rank{group.rank}')
            run: Optional[RunFolder] = RunFolder(rank_folder, fingerprint, resume)
            folder = spill  # objects are staged where every rank's are (rows are disjoint)
            info['resumed'] = run.resumed
        else:
            run = None
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix='mmlinattn-det-'))
        staging = _Staging(folder)
        if (run is None or not run.resumed) and (group is None or group.first):
            staging.clear()
        store = stack.enter_context(run.spilling(min_spill_bytes)) if run else None
        feats = run.load_features() if run is not None else None
        with torch.no_grad():
            if feats is None:
                with _counting_blocks(model, blocks_progress):
                    feats, stride = _backbone(model, src, chunk_tokens, group, info)
                if run is not None:
                    run.save_features(feats)
            else:
                stride = _band_stride(src, feats, group)
                info['backbone_s'] = 0.0
            band = None
            if group is not None:
                feats, band = _with_neighbour_rows(
                    feats, stride, src.height, tiling, group,
                    pyramid_reach(model, feats, stride))

        def emit_row(y: int, objects: list[DetectedObject], cut: list[DetectedObject]) -> None:
            staging.write('row', y, objects)
            staging.write('cut', y, cut)
            if run is not None:
                run.row_done(y)

        info.update(run_detection_tiles(
            model, feats, stride, (src.height, src.width), tiling, emit_row,
            run.rows_done() if run is not None else None, progress, band))
        del feats
        if store is not None:
            info['spill'] = store.summary()
        if group is not None:
            _gather_staged(staging, spill is not None, group)
            if not group.first:
                info['decoded_pixels'] = reader.decoded_pixels
                return info
        counts = dict(objects=0, truncated=0)
        start = time.perf_counter()
        merged = merge_truncated(list(staging.read('cut')), tiling.merge_iou)
        counts['truncated'] = sum(o.extra.get('parts', 1) for o in merged)
        counts['merged'] = len(merged)
        sinks = open_sinks(outputs, classes, palette, h, w, reader.geo, reader.downsample,
                           dict(image=osp.basename(reader.path), level=reader.level,
                                **{k: v for k, v in (settings or {}).items()
                                   if isinstance(v, str)}), viewer, reader)
        kept: list[DetectedObject] = []

        def counted() -> Iterator[DetectedObject]:
            for obj in _all_objects(staging, merged, keep, large):
                counts['objects'] += 1
                if keep_objects:
                    kept.append(obj)
                yield obj
        write_objects(sinks, counted())
        info['write_s'] = time.perf_counter() - start
        if large is not None:
            info['coarse'].update(replaced=large.replaced, fragments=large.fragments)
    info.update(counts)
    info['decoded_pixels'] = reader.decoded_pixels
    if keep_objects:
        info['objects_list'] = kept
    return info


def _backbone(model: Any, src: RegionReader, chunk_tokens: int,
              group: Optional[SpatialGroup], info: dict) -> tuple[tuple[Tensor, ...], int]:
    """The backbone's maps of the whole image (or of this rank's band) and the finest
    stride."""
    if group is None:
        x, _, _, feats, stride = _features(model, src, 'mmdet', chunk_tokens, info)
        return feats, stride
    start = time.perf_counter()
    bands = sp.image_bands(_padded(src.height), group.size, SIZE_DIVISOR)
    a, b = bands[group.rank]
    x, _ = row_source(model, src, chunk_tokens, bands)
    feats = backbone_maps(model, x, chunk_tokens, group)
    info['backbone_s'] = time.perf_counter() - start
    return feats, (b - a) // feats[0].shape[2]


def _band_stride(src: RegionReader, feats: Sequence[Tensor],
                 group: Optional[SpatialGroup]) -> int:
    hp = _padded(src.height)
    if group is None:
        return hp // feats[0].shape[2]
    a, b = sp.image_bands(hp, group.size, SIZE_DIVISOR)[group.rank]
    return (b - a) // feats[0].shape[2]


def _with_neighbour_rows(feats: Sequence[Tensor], stride: int, height: int,
                         tiling: DetectionTiling, group: SpatialGroup, extra: int = 0
                         ) -> tuple[list[Tensor], tuple[int, int, int, int]]:
    """Each rank's maps extended to the rows its tiles' neck crops read, and ``extra``
    more (the dense head's reach), fetched from the neighbours, and its ``band`` for
    :func:`run_detection_tiles`."""
    hp = _padded(height)
    bands = sp.image_bands(hp, group.size, SIZE_DIVISOR)
    reach = tiling.margin + 2 * tiling.halo + extra
    needs = []  # image rows each rank's crops read
    for a, b in bands:
        starts = [y for y in range(0, hp, tiling.tile) if a <= y < b]
        if starts:
            needs.append((max(0, starts[0] - reach),
                          min(hp, starts[-1] + tiling.tile + reach)))
        else:
            needs.append((a, a))
    finest_rows = feats[0].shape[2]
    out = []
    for f in feats:
        per = stride * finest_rows // f.shape[2]  # image rows per row of this level
        spans = sp.row_spans(f.shape[2], group)
        level_needs = [(lo // per, -(-hi // per)) for lo, hi in needs]
        out.append(sp.fetch_rows(f, 2, spans, level_needs, group).contiguous())
    a, b = bands[group.rank]
    return out, (a, b, needs[group.rank][0], hp)


def _gather_staged(staging: _Staging, shared: bool, group: SpatialGroup) -> None:
    """Every rank's staged rows in the first rank's staging folder: already there when
    the folder is shared (``--spill``), else sent as text."""
    import torch.distributed as dist
    if shared:
        dist.barrier(group=group.group)
        return
    mine = {}
    for name in sorted(os.listdir(staging.folder)):
        if name.endswith('.jsonl'):
            with open(osp.join(staging.folder, name)) as f:
                mine[name] = f.read()
    gathered: list = [None] * group.size if group.first else None
    dist.gather_object(mine, gathered, dst=group.global_rank(0), group=group.group)
    if group.first:
        for files in gathered[1:]:
            for name, text in files.items():
                with open(osp.join(staging.folder, name), 'w') as f:
                    f.write(text)


def _all_objects(staging: _Staging, merged: list[DetectedObject],
                 keep: Optional[tuple[np.ndarray, np.ndarray]],
                 large: Optional[LargeObjects] = None) -> Iterator[DetectedObject]:
    """The tiles' objects, then the merged parts of large ones, at their place in the
    image; with a coarse pass, those the fine pass keeps and then the large ones."""
    def fine() -> Iterator[DetectedObject]:
        for obj in staging.read('row'):
            yield obj if keep is None else _uncompact(obj, *keep)
        for obj in merged:
            obj.extra = {k: v for k, v in obj.extra.items() if k in ('parts', )}
            yield obj if keep is None else _uncompact(obj, *keep)
    for obj in fine():
        if large is None or large.keeps(obj):
            yield obj
    if large is not None:
        yield from large.objects


def _coarse_pass(model: Any, reader: RegionReader, tiling: DetectionTiling, info: dict,
                 **kwargs: Any) -> LargeObjects:
    """The objects larger than the margin, from the same detector on the image read
    ``tiling.coarse`` times coarser (by regions too, with the same tiles), in pixels
    of the level read."""
    factor = tiling.coarse
    start = time.perf_counter()
    sub = detect_file(model, DownsampledReader(reader, factor), [], keep_objects=True,
                      tiling=dataclasses.replace(tiling, coarse=0), **kwargs)
    large = LargeObjects([upscaled(o, factor) for o in sub.get('objects_list', [])],
                         2 * tiling.margin)
    info['coarse'] = dict(factor=factor, image=sub['image'], tiles=sub['tiles'],
                          seconds=time.perf_counter() - start, objects=len(large.objects))
    return large

