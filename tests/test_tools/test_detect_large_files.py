"""Detection of large images by regions: global backbone, tiled heads, streamed objects.

The reference for the tiles is mmdet's own prediction on the whole pyramid of the
same padded image. With non-maximum suppression off and budgets larger than the
number of candidates, every detection of the whole image whose box lies within the
margin of the tile holding its centre must be found exactly once by the tiles (same
class, same box, same score, same mask), and nothing else but cut parts: a wrong
responsibility rule (both copies kept) or a tile shifted by a pixel fails here.
Object files are read back with independent readers (pycocotools, shapely, sqlite3,
pyogrio).
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pycocotools_mask = pytest.importorskip('pycocotools.mask')
shapely = pytest.importorskip('shapely')

from mmlinattn.rasters.objects import (  # noqa: E402
    DetectedObject,
    GeoJsonSink,
    LocalMask,
    ObjectStore,
    image_rle,
    mask_polygon,
    query_objects,
)

REPO = Path(__file__).resolve().parents[2]
DET_CFG = REPO / 'configs/tiny/mask-rcnn_inline-pvt-t_fpn_300i_tiny-coco.py'


def _random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    bits = rng.random((h, w)) < 0.5
    bits[:, rng.integers(0, w)] = True  # a full column: runs that join across columns
    return bits


def test_image_rle_equals_pycocotools_on_the_whole_bitmap() -> None:
    rng = np.random.default_rng(0)
    H, W = 37, 53
    for y0, x0, h, w in [(3, 5, 9, 11), (0, 0, 37, 4), (30, 50, 12, 9), (-2, -3, 6, 7),
                         (0, 10, 37, 20), (36, 52, 1, 1)]:
        bits = _random_mask(rng, h, w)
        whole = np.zeros((H, W), np.uint8)
        ys, xs = slice(max(0, y0), min(H, y0 + h)), slice(max(0, x0), min(W, x0 + w))
        whole[ys, xs] = bits[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        expected = pycocotools_mask.encode(np.asfortranarray(whole))
        got = image_rle(LocalMask(y0, x0, bits), H, W)
        assert got['counts'] == expected['counts'].decode(), (y0, x0, h, w)
        assert np.array_equal(pycocotools_mask.decode(dict(size=[H, W], counts=got['counts'])
                                                       ), whole)
    empty = image_rle(LocalMask(4, 4, np.zeros((3, 3), bool)), H, W)
    assert pycocotools_mask.area(dict(size=[H, W], counts=empty['counts'])) == 0


def test_mask_polygon_is_valid_keeps_holes_and_covers_the_mask() -> None:
    bits = np.zeros((40, 50), bool)
    bits[5:35, 5:45] = True
    bits[15:25, 15:30] = False  # a hole
    bits[2, 48] = True  # a lone pixel: a second part
    geom = mask_polygon(LocalMask(100, 200, bits))
    assert geom.is_valid and geom.geom_type == 'MultiPolygon'
    outer = max(geom.geoms, key=lambda g: g.area)
    assert len(outer.interiors) == 1
    # Vertices at pixel centres: the outline of a block of n pixels spans n - 1.
    assert outer.bounds == (205.5, 105.5, 244.5, 134.5)
    # The hole's outline runs through the foreground pixels around it (11 x 16 between
    # centres), its four corners cut diagonally (half a pixel each).
    assert abs(outer.area - (29 * 39 - (11 * 16 - 4 * 0.5))) < 1e-6


def _objects(n: int, seed: int = 0) -> list[DetectedObject]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, 900, 2)
        w, h = rng.uniform(3, 60, 2)
        bits = np.ones((int(np.ceil(y0 + h)) - int(y0), int(np.ceil(x0 + w)) - int(x0)), bool)
        out.append(DetectedObject(int(rng.integers(0, 3)), float(rng.random()),
                                  (x0, y0, x0 + w, y0 + h), LocalMask(int(y0), int(x0), bits)))
    return out


def test_object_store_answers_region_class_and_score_queries_through_the_rtree(tmp_path
                                                                               ) -> None:
    path = str(tmp_path / 'objects.sqlite')
    objects = _objects(2000)
    store = ObjectStore(path, ['a', 'b', 'c'], 1000, 1000)
    for o in objects:
        store.add(o)
    store.close()
    region = (100, 200, 300, 260)
    got = sorted(r['id'] for r in query_objects(path, region, classes=['b'], min_score=0.3))
    expected = sorted(i + 1 for i, o in enumerate(objects)
                      if o.label == 1 and o.score >= 0.3 and o.bbox[0] <= region[2]
                      and o.bbox[2] >= region[0] and o.bbox[1] <= region[3]
                      and o.bbox[3] >= region[1])
    assert got == expected and len(got) > 3
    db = sqlite3.connect(path)
    plan = ' '.join(str(r) for r in db.execute(
        'EXPLAIN QUERY PLAN SELECT o.id FROM objects o JOIN objects_rtree r ON r.id = o.id '
        'WHERE r.minx <= 1 AND r.maxx >= 0 AND r.miny <= 1 AND r.maxy >= 0'))
    assert 'VIRTUAL TABLE INDEX' in plan  # the R-tree answers, not a scan of every object
    for _, wkt in db.execute('SELECT id, polygon FROM objects LIMIT 50'):
        assert shapely.from_wkt(wkt).is_valid


def test_geojson_for_qupath_and_geopackage_in_the_source_crs(tmp_path) -> None:
    from mmlinattn.rasters import GeoReference
    from mmlinattn.rasters.objects import GeoPackageSink
    objects = _objects(20, seed=1)
    gj = tmp_path / 'objects.geojson'
    sink = GeoJsonSink(str(gj), ['a', 'b', 'c'], [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                       scale=2.0)
    for o in objects:
        sink.add(o)
    sink.close()
    data = json.loads(gj.read_text())
    assert len(data['features']) == 20
    f0 = data['features'][0]
    props = f0['properties']
    assert props['objectType'] == 'detection'
    assert props['classification']['name'] == ['a', 'b', 'c'][objects[0].label]
    assert props['measurements']['score'] == pytest.approx(objects[0].score)
    geom = shapely.geometry.shape(f0['geometry'])
    assert geom.is_valid
    # Level-0 pixels: twice the coordinates read; within half a pixel of the box.
    x0, y0, x1, y1 = (2 * v for v in objects[0].bbox)
    bx = geom.bounds
    assert x0 - 1 <= bx[0] and bx[2] <= x1 + 1 and y0 - 1 <= bx[1] and bx[3] <= y1 + 1

    pyogrio = pytest.importorskip('pyogrio')
    geo = GeoReference([], (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0), 'EPSG:32633')
    gp = tmp_path / 'objects.gpkg'
    sink = GeoPackageSink(str(gp), ['a', 'b', 'c'], geo)
    for o in objects:
        sink.add(o)
    sink.close()
    info = pyogrio.read_info(str(gp))
    assert info['features'] == 20 and '32633' in info['crs']
    _, _, wkb, fields = pyogrio.raw.read(str(gp))
    first = shapely.from_wkb(wkb[0])
    ox0, oy0, ox1, oy1 = objects[0].bbox
    mx0, my1 = geo.to_map(ox0, oy0)
    mx1, my0 = geo.to_map(ox1, oy1)
    b = first.bounds
    assert mx0 - 10 <= b[0] and b[2] <= mx1 + 10 and my0 - 10 <= b[1] and b[3] <= my1 + 10
    assert list(fields[0][:3]) == [['a', 'b', 'c'][o.label] for o in objects[:3]]


# -- the detector ---------------------------------------------------------------------------

mmdet = pytest.importorskip('mmdet.models', reason='mmdet with a compiled mmcv is needed')

SMALL = dict(model=dict(
    neck=dict(out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32, anchor_generator=dict(ratios=[1.0])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=2),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=16, num_classes=2)),
    # No suppression and budgets above the number of candidates: the whole image's
    # detections and the tiles' are then comparable one by one.
    test_cfg=dict(rpn=dict(nms_pre=-1, max_per_img=10**6, nms=dict(iou_threshold=1.0),
                           min_bbox_size=0),
                  rcnn=dict(score_thr=0.8, nms=dict(iou_threshold=1.0), max_per_img=10**6,
                            mask_thr_binary=0.5))))


@pytest.fixture(scope='module')
def detector():
    from seeded import seeded_model
    model = seeded_model(DET_CFG, SMALL)
    with torch.no_grad():
        # No box regression: every detection is an anchor, so a detection lies within
        # the margin exactly when everything it was computed from does (random
        # regressions would move boxes anywhere). The scores and masks still come from
        # the RoI features of the tile.
        for conv in (model.rpn_head.rpn_reg, model.roi_head.bbox_head.fc_reg):
            conv.weight.zero_()
            conv.bias.zero_()
        # Scores and mask probabilities spread out, away from thresholds (0.8, 0.5).
        model.roi_head.bbox_head.fc_cls.weight.mul_(30)
        model.roi_head.mask_head.conv_logits.weight.mul_(30)
    return model.eval()


def _image(h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


def _whole(model, image):
    """mmdet's heads on the whole image's pyramid, with the tiles' budgets by score."""
    from mmlinattn.engine.large_image import detect_large
    from mmlinattn.engine.tiled_detection import (
        DetectionTiling,
        detection_budgets,
        result_objects,
    )
    with detection_budgets(model, DetectionTiling()):
        result, _ = detect_large(model, image, chunk_tokens=None, tile=64, halo=64, masks=True)
    return result_objects(result.pred_instances)


def _tiled(model, image, tiling):
    from mmlinattn.engine.detection_files import detect_file
    from mmlinattn.rasters import ArrayReader
    reader = ArrayReader(image.permute(1, 2, 0).numpy().copy(), '<test>')
    return detect_file(model, reader, [], chunk_tokens=48, tiling=tiling, keep_objects=True)


def _inside_margin(o: DetectedObject, tile: int, margin: int, h: int, w: int) -> bool:
    """The box lies within ``margin`` of the core holding its centre (or the image)."""
    cx, cy = (o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2
    y0, x0 = int(cy // tile) * tile, int(cx // tile) * tile
    return (o.bbox[0] >= max(0, x0 - margin) and o.bbox[2] <= min(w, x0 + tile + margin)
            and o.bbox[1] >= max(0, y0 - margin) and o.bbox[3] <= min(h, y0 + tile + margin))


def _key(o: DetectedObject) -> tuple:
    """Anchors' boxes are exact multiples of a quarter pixel: a key for one object."""
    return (o.label, ) + tuple(round(v * 4) for v in o.bbox)


def _by_key(objects: list[DetectedObject]) -> dict:
    out: dict = {}
    for o in objects:
        out.setdefault(_key(o), []).append(o)
    return out


def test_tiles_find_every_whole_image_detection_once_with_its_mask(detector) -> None:
    from mmlinattn.engine.tiled_detection import DetectionTiling
    h, w = 190, 260
    image = _image(h, w)
    whole = _whole(detector, image)
    info = _tiled(detector, image, DetectionTiling(tile=128, margin=64, halo=128,
                                                   nested_ios=None))
    ours = info['objects_list']
    safe = _by_key([o for o in whole if _inside_margin(o, 128, 64, h, w)])
    assert len(safe) > 500 and len(whole) > sum(map(len, safe.values()))
    found, every = _by_key(ours), _by_key(whole)
    for key in safe:
        got = [o for o in found.get(key, []) if 'parts' not in o.extra]
        # As often as the whole image has it (anchors clipped at the image's corners can
        # coincide): a seam neither loses nor doubles it.
        assert len(got) == len(every[key]), (key, len(got), len(every[key]))
        # One to one, each with the same score and the same mask (matched, not paired by
        # sorted score: random weights saturate scores, so equal boxes can tie at 1.0).
        # The tiles' backbone runs by bands of tokens, whose sums differ from the whole
        # forward's in the last bits (~1e-6): a mask pixel whose probability is that close
        # to 0.5 may flip, so up to 2 pixels may differ (a seam's cut or a one-pixel shift
        # moves a whole edge of the mask, and the box with it).
        left = list(every[key])
        for g in got:
            twin = next((r for r in left if g.score == pytest.approx(r.score, abs=1e-4)
                         and (_full(g.mask, h, w) != _full(r.mask, h, w)).sum() <= 2), None)
            assert twin is not None, (key, g.score, g.mask.y0, g.mask.x0)
            left.remove(twin)
    # The rest of ours: objects of the whole image too (reaching past the margin), or
    # merged from the parts the tiles saw of an object larger than a tile's view.
    rest = [o for key, objs in found.items() if key not in safe for o in objs]
    assert all(_key(o) in every or o.extra.get('parts', 0) >= 1 for o in rest)
    assert info['objects'] == len(ours)


def _full(m: LocalMask, h: int, w: int) -> np.ndarray:
    out = np.zeros((h + 64, w + 64), bool)
    out[m.y0:m.y0 + m.bits.shape[0], m.x0:m.x0 + m.bits.shape[1]] = m.bits
    return out[:h, :w]


def test_the_pyramid_by_rectangles_equals_the_whole_image_neck_and_rpn(detector) -> None:
    """TilePyramid: the neck and the RPN computed by rectangles of 64 px (with a halo
    of backbone rows and columns) equal mmdet's neck and RPN run once on the whole
    maps; from a rank's rows too (the backbone's maps from image row 64 only, the head
    regions' rows from 192: a halo and the RPN's reach below them)."""
    from mmlinattn.engine.tile_pyramid import TilePyramid, local_dense_head, neck_reach
    from mmlinattn.engine.tiled_detection import (
        DetectionTiling,
        _probe_neck,
        neck_strides,
        pyramid_halo,
    )
    image = _image(320, 320).float()[None]
    with torch.no_grad():
        feats = detector.backbone(image)
        whole = detector.neck(feats)
        rpn = detector.rpn_head(list(whole))
    strides = neck_strides(detector, feats, 4)
    assert strides == [4, 8, 16, 32, 64]
    head = local_dense_head(detector, _probe_neck(detector, feats))
    assert head is detector.rpn_head
    # The FPN's own reach: a 3x3 convolution on each of strides 4-32 (4 + 8 + 16 + 32),
    # rounded up to the coarsest stride, not the 256 px of the tiling's halo.
    assert neck_reach(detector.neck, feats, 4) == 60
    assert neck_reach(torch.nn.Conv2d(3, 3, 3), feats, 4) is None  # not an FPN: unknown
    halo = pyramid_halo(detector, feats, 4, strides, DetectionTiling())
    assert halo == 64
    for row0, rows in ((0, (0, 320)), (64, (192, 320))):
        part = [f[:, :, row0 // s:] for f, s in zip(feats, (4, 8, 16, 32))]
        timings: dict = {}
        pyramid = TilePyramid(detector, part, 4, row0, strides, rows, 320, halo=halo, rect=64,
                              head=head, timings=timings)
        with torch.no_grad():
            pyramid.reach(rows[1])
        assert len(pyramid.cols) == 5 and set(timings) == {'neck_s', 'dense_s'}
        region = (rows[0], rows[1], 0, 320)
        for got, ref, s in zip(pyramid.neck_crop(region), whole, strides):
            ref = ref[:, :, rows[0] // s:-(-rows[1] // s)]
            err = (got - ref).abs().max()
            assert got.shape == ref.shape and err < 1e-4, (s, err)
        for got_kind, ref_kind in zip(pyramid.head_crop(region), rpn):
            for got, ref, s in zip(got_kind, ref_kind, strides):
                ref = ref[:, :, rows[0] // s:-(-rows[1] // s)]
                err = (got - ref).abs().max()
                assert got.shape == ref.shape and err < 1e-4, (s, err)


@pytest.mark.parametrize('placement', ['memory', 'spill', 'finest in memory'])
def test_a_ring_of_rows_gives_every_row_of_tiles_the_whole_image_neck_and_rpn(
        detector, placement, tmp_path, monkeypatch) -> None:
    """The pyramid holding a window of rows (a ring: 128 px of head regions, rows reused
    from the top), walked down as a run's rows of tiles walk it, in memory, in a spill
    or split between them by level: each row's crops equal the whole-image neck and
    RPN; a row it no longer holds is refused."""
    from mmlinattn.engine import tile_pyramid
    from mmlinattn.engine.tile_pyramid import TilePyramid, local_dense_head
    from mmlinattn.engine.tiled_detection import _probe_neck
    from mmlinattn.utils.spill import _FILE_BACKED, spill_maps
    image = _image(448, 192).float()[None]
    with torch.no_grad():
        feats = detector.backbone(image)
        whole = detector.neck(feats)
        rpn = detector.rpn_head(list(whole))
    strides = [4, 8, 16, 32, 64]
    head = local_dense_head(detector, _probe_neck(detector, feats))
    # The finest ring: (128 + 2 * 64 + 2 * 64) / 4 + 1 rows of 48 pixels.
    finest = whole[0].shape[1] * ((128 + 4 * 64) // 4 + 1) * (192 // 4) * 4
    budget = {'memory': 2**40, 'spill': 0, 'finest in memory': finest}[placement]
    monkeypatch.setattr(tile_pyramid, 'RING_MEMORY_BYTES', budget)
    in_memory = {'memory': [True] * 5, 'spill': [False] * 5,
                 'finest in memory': [True] + [False] * 4}[placement]
    with spill_maps(str(tmp_path / 'spill'), min_bytes=1):
        pyramid = TilePyramid(detector, feats, 4, 0, strides, (0, 448), 192, halo=64, rect=64,
                              head=head, timings={}, ring=128)
        for top in range(0, 448 - 64, 64):  # rows of head regions 128 px high, 64 apart
            region = (top, top + 128, 0, 192)
            with torch.no_grad():
                pyramid.release(top)
                pyramid.reach(top + 128)
            assert pyramid.neck_maps[0].shape[2] < 448 // 4  # a window, not the image
            on_disk = [m.untyped_storage().data_ptr() in _FILE_BACKED
                       for m in pyramid.neck_maps]
            assert on_disk == [not held for held in in_memory]
            crops = pyramid.neck_crop(region), pyramid.head_crop(region)
            for got, ref, s in zip(crops[0], whole, strides):
                ref = ref[:, :, top // s:-(-(top + 128) // s)]
                assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4, (top, s)
            for got_kind, ref_kind in zip(crops[1], rpn):
                for got, ref, s in zip(got_kind, ref_kind, strides):
                    ref = ref[:, :, top // s:-(-(top + 128) // s)]
                    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4, (top, s)
        with pytest.raises(RuntimeError, match='not held'):
            pyramid.neck_crop((0, 128, 0, 192))


def test_a_head_with_group_norm_or_more_channels_than_the_neck_runs_per_tile(detector
                                                                            ) -> None:
    """Only a head without statistics over the map, whose maps cost no more than the
    neck's, is computed over the image."""
    from mmlinattn.engine.tile_pyramid import dense_head_reach, local_dense_head
    with torch.no_grad():
        outs = detector.neck(detector.backbone(torch.zeros(1, 3, 64, 128)))
    rpn = detector.rpn_head
    assert dense_head_reach(rpn) == 1  # one 3x3 convolution, then 1x1 ones
    assert local_dense_head(detector, outs) is rpn  # 1 + 4 channels for the neck's 32
    cls = rpn.rpn_cls
    rpn.rpn_cls = torch.nn.Conv2d(32, 40, 1)
    try:
        assert local_dense_head(detector, outs) is None
    finally:
        rpn.rpn_cls = cls
    rpn.add_module('norm', torch.nn.GroupNorm(1, 32))
    try:
        assert local_dense_head(detector, outs) is None
    finally:
        del rpn.norm


def test_the_neck_once_over_the_image_gives_the_objects_of_the_neck_per_tile(detector
                                                                            ) -> None:
    from mmlinattn.engine.tiled_detection import DetectionTiling
    h, w = 190, 260
    image = _image(h, w)
    runs = {mode: _tiled(detector, image, DetectionTiling(tile=128, margin=64, halo=128,
                                                          nested_ios=None, neck=mode))
            for mode in ('global', 'tiles')}
    assert runs['global']['neck'] == runs['global']['dense_head'] == 'global'
    assert runs['tiles']['neck'] == runs['tiles']['dense_head'] == 'tiles'
    glob, tiles = (_by_key([o for o in runs[m]['objects_list']
                            if _inside_margin(o, 128, 64, h, w)]) for m in ('global', 'tiles'))
    assert len(glob) > 500 and glob.keys() == tiles.keys()
    for key, objs in glob.items():
        assert sorted(o.score for o in objs) == pytest.approx(
            sorted(o.score for o in tiles[key]), abs=1e-4), key


def test_maps_on_disk_released_behind_the_tiles_resume_to_the_same_objects(
        detector, tmp_path, monkeypatch) -> None:
    """The backbone's maps spilled to disk (kept for resume; the neck's rows are a ring
    in memory), their rows behind the tiles given back (holes punched: they read as
    zeros), the run stopped after its second row of tiles and resumed: the objects of
    a run in memory."""
    from mmlinattn.engine import detection_files, tile_pyramid
    from mmlinattn.engine.detection_files import detect_file
    from mmlinattn.engine.tiled_detection import DetectionTiling
    from mmlinattn.rasters import open_image
    _tiff(tmp_path / 'scene.tif', _image(448, 200))
    tiling = DetectionTiling(tile=64, margin=64, halo=64, nested_ios=None)
    reader = open_image(str(tmp_path / 'scene.tif'))
    reference = sorted(map(_key, detect_file(detector, reader, [], chunk_tokens=48,
                                             tiling=tiling, keep_objects=True)['objects_list']))
    released: list[int] = []
    release = tile_pyramid.release_rows
    monkeypatch.setattr(tile_pyramid, 'release_rows',
                        lambda t, stop: released.append(release(t, stop)) or released[-1])
    done = detection_files.RunFolder.row_done

    def stop_after_second_row(self, row: int) -> None:
        done(self, row)
        if len(self.rows_done()) == 2:
            raise KeyboardInterrupt('killed')
    spill = str(tmp_path / 'run')
    with monkeypatch.context() as m:
        m.setattr(detection_files.RunFolder, 'row_done', stop_after_second_row)
        with pytest.raises(KeyboardInterrupt):
            detect_file(detector, reader, [], chunk_tokens=48, tiling=tiling, spill=spill,
                        min_spill_bytes=1)
    info = detect_file(detector, reader, [], chunk_tokens=48, tiling=tiling, spill=spill,
                       min_spill_bytes=1, resume=True, keep_objects=True)
    assert info['resumed'] and info['neck'] == 'global' and sum(released) > 0
    assert sorted(map(_key, info['objects_list'])) == reference


def test_two_tile_sizes_give_the_same_objects(detector) -> None:
    from mmlinattn.engine.tiled_detection import DetectionTiling
    h, w = 190, 260
    image = _image(h, w)
    a = _tiled(detector, image, DetectionTiling(tile=128, margin=64, halo=128,
                                                nested_ios=None))['objects_list']
    b = _tiled(detector, image, DetectionTiling(tile=192, margin=64, halo=128,
                                                nested_ios=None))['objects_list']
    small = _by_key([o for o in a if _inside_margin(o, 128, 64, h, w)
                     and _inside_margin(o, 192, 64, h, w)])
    in_b = _by_key(b)
    assert len(small) > 500
    for key, objs in small.items():
        assert sorted(o.score for o in objs) == pytest.approx(
            sorted(o.score for o in in_b.get(key, [])), abs=1e-4), key


def test_budgets_by_score_keep_the_suppressed_proposals_above_the_threshold(detector) -> None:
    """By score, the RPN's proposals are greedy suppression (per level, IoU 0.7) over
    the anchors whose objectness reaches the threshold, computed here from the RPN's
    raw outputs: the rule depends on nothing the region does not see. A cap that binds
    is reported, and the config is as it was afterwards."""
    from mmcv.ops import nms

    from mmlinattn.engine.tiled_detection import DetectionTiling, detection_budgets
    rpn = detector.rpn_head
    torch.manual_seed(3)
    feats = [torch.randn(1, 32, 64 // 2**i, 96 // 2**i) for i in range(5)]
    meta = dict(img_shape=(256, 384), ori_shape=(256, 384), pad_shape=(256, 384),
                scale_factor=(1., 1.))
    before = dict(rpn.test_cfg)
    rpn.test_cfg.nms = dict(type='nms', iou_threshold=0.7)
    try:
        with torch.no_grad():
            scores, deltas = rpn(feats)
            thr = 0.6
            with detection_budgets(detector, DetectionTiling(proposal_thr=thr)) as budgets:
                got = rpn.predict_by_feat(scores, deltas, batch_img_metas=[meta],
                                          rescale=False)[0]
            assert budgets['rule'] == 'by score' and not budgets['reached']
            priors = rpn.prior_generator.grid_priors([s.shape[-2:] for s in scores], device='cpu')
            want = []
            for s, d, p in zip(scores, deltas, priors):
                s = s[0].permute(1, 2, 0).reshape(-1).sigmoid()
                boxes = rpn.bbox_coder.decode(p, d[0].permute(1, 2, 0).reshape(-1, 4),
                                              max_shape=(256, 384))
                keep = s >= thr
                dets, _ = nms(boxes[keep], s[keep], 0.7)
                want.append(dets)
            want = torch.cat(want)
            want = want[want[:, 4].argsort(descending=True)]
            assert 50 < len(got) < (torch.cat([s.reshape(-1) for s in scores]).sigmoid()
                                    >= thr).sum()
            assert torch.allclose(got.scores, want[:, 4])
            assert torch.allclose(got.bboxes, want[:, :4])
            # A cap below what the rule keeps binds, and says so.
            with detection_budgets(detector, DetectionTiling(proposal_thr=thr,
                                                             budget_scale=1.0)) as budgets:
                rpn.test_cfg.max_per_img = 10
                capped = rpn.predict_by_feat(scores, deltas, batch_img_metas=[meta],
                                             rescale=False)[0]
            assert len(capped) == 10 and budgets['reached'] == ['proposals']
    finally:
        rpn.test_cfg.nms = before['nms']
    assert dict(rpn.test_cfg) == before and '_bbox_post_process' not in vars(rpn)


def test_nested_detections_of_a_class_are_dropped_greedily_by_score() -> None:
    from mmengine.structures import InstanceData

    from mmlinattn.engine.tiled_detection import suppress_nested
    boxes = [[0, 0, 100, 100],  # A, the best
             [10, 10, 40, 40],  # inside A: dropped
             [10, 10, 40, 40],  # inside A, another class: kept
             [60, 0, 160, 100],  # B: 40% of it inside A: kept
             [80, 20, 95, 35],  # inside A and B: dropped (A is kept)
             [120, 10, 150, 40],  # inside B only: dropped
             [150, 150, 200, 200],  # alone
             [300, 300, 400, 400],  # holds a better one: dropped
             [320, 320, 340, 340]]
    inst = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32),
                        scores=torch.tensor([0.9, 0.5, 0.5, 0.8, 0.7, 0.3, 0.1, 0.2, 0.6]),
                        labels=torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0]))
    kept = suppress_nested(inst, 0.5)
    assert kept.bboxes.tolist() == [boxes[i] for i in (0, 2, 3, 6, 8)]
    # Greedy: a box nested only in a dropped one stays.
    chain = InstanceData(bboxes=torch.tensor([[0, 0, 100, 100], [50, 0, 110, 100],
                                              [102, 0, 110, 10]], dtype=torch.float32),
                         scores=torch.tensor([0.9, 0.8, 0.7]), labels=torch.tensor([0, 0, 0]))
    assert suppress_nested(chain, 0.5).scores.tolist() == pytest.approx([0.9, 0.7])
    assert len(suppress_nested(inst, None)) == len(inst) == len(suppress_nested(inst, 1.0))


def test_heads_that_cannot_be_tiled_are_refused_by_name(detector) -> None:
    from mmlinattn.engine.tiled_detection import DetectionTiling, check_tileable
    check_tileable(detector)
    saved = detector.roi_head.mask_head
    try:
        class PointHead(torch.nn.Module):
            pass
        detector.roi_head.mask_head = PointHead()
        with pytest.raises(ValueError, match='mask head PointHead'):
            check_tileable(detector)
    finally:
        detector.roi_head.mask_head = saved
    with pytest.raises(ValueError, match='multiple of 64'):
        _tiled(detector, _image(64, 64), DetectionTiling(tile=100))


def _tiff(path: Path, image: torch.Tensor) -> None:
    tifffile = pytest.importorskip('tifffile')
    rgb = image.permute(1, 2, 0).numpy()[..., ::-1].copy()
    tifffile.imwrite(str(path), rgb, tile=(64, 64), photometric='rgb')


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'tools/infer_large.py'), str(DET_CFG),
                           'none', *args], capture_output=True, text=True, timeout=600)


def test_tool_writes_every_object_file_resumes_and_leaves_nothing_on_failure(tmp_path
                                                                            ) -> None:
    image = tmp_path / 'scene.tif'
    _tiff(image, _image(190, 260))
    outs = [str(tmp_path / n) for n in ('dets.json', 'dets.geojson', 'dets.sqlite')]
    spill = tmp_path / 'run'
    common = [str(image), '--tile', '128', '--margin', '64', '--halo', '128',
              '--chunk-tokens', '48', '--spill', str(spill), '--coarse', '2']
    proc = _tool(*common, '--out', *outs, '--viewer', str(tmp_path / 'viewer'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'coarse pass: 2x coarser (95 x 130 px' in proc.stdout
    records = json.loads(Path(outs[0]).read_text())
    js = (tmp_path / 'viewer/objects.js').read_text()
    assert (tmp_path / 'viewer/index.html').exists()
    assert len(json.loads(js[js.index('['):js.rindex(']') + 1])) == len(records)
    features = json.loads(Path(outs[1]).read_text())['features']
    rows = list(query_objects(outs[2]))
    assert len(records) == len(features) == len(rows)
    for r in records:
        assert r['bbox'][0] + r['bbox'][2] <= 260 + 1e-3
        if 'segmentation' in r:
            assert r['segmentation']['size'] == [190, 260]
    # Resuming a finished run redoes nothing and writes the same objects.
    proc = _tool(*common, '--resume', '--out', outs[0])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(Path(outs[0]).read_text()) == records
    assert 'backbone 0.0 s' in proc.stdout
    # A refused output: nothing written, not even the outputs named before it.
    bad = [str(tmp_path / 'other.json'), str(tmp_path / 'other.txt')]
    proc = _tool(str(image), '--tile', '128', '--chunk-tokens', '48', '--out', *bad)
    assert proc.returncode != 0 and 'other.txt' in proc.stderr
    assert not any(p.name.startswith('other') for p in tmp_path.iterdir())


def test_an_image_without_objects_gives_valid_empty_files(detector, tmp_path) -> None:
    from mmlinattn.engine.detection_files import detect_file
    from mmlinattn.engine.tiled_detection import DetectionTiling
    from mmlinattn.rasters import ArrayReader
    saved = detector.roi_head.test_cfg.score_thr
    detector.roi_head.test_cfg.score_thr = 1.01
    try:
        reader = ArrayReader(np.zeros((130, 150, 3), np.uint8), '<empty>')
        outs = [str(tmp_path / n) for n in ('e.json', 'e.geojson', 'e.sqlite')]
        info = detect_file(detector, reader, outs, chunk_tokens=48,
                           tiling=DetectionTiling(tile=64, margin=64, halo=64))
    finally:
        detector.roi_head.test_cfg.score_thr = saved
    assert info['objects'] == 0
    assert json.loads(Path(outs[0]).read_text()) == []
    assert json.loads(Path(outs[1]).read_text())['features'] == []
    assert list(query_objects(outs[2])) == []


def test_two_spatial_ranks_give_the_same_objects_as_one_process(detector, tmp_path) -> None:
    """tools/dist_infer_large.sh with a detector: two gloo processes, each the backbone
    on its band of rows and the tiles whose cores start there; the objects rank 0
    writes equal the one-process tool's."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    config = tmp_path / 'small_detector.py'
    config.write_text(f'_base_ = {str(DET_CFG)!r}\nmodel = {SMALL["model"]!r}\n')
    weights = tmp_path / 'random.pth'
    torch.save(detector.state_dict(), weights)
    image = tmp_path / 'scene.tif'
    _tiff(image, _image(250, 200))
    common = [str(image), '--tile', '128', '--margin', '64', '--halo', '128',
              '--chunk-tokens', '48']
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(port), PYTHON=sys.executable,
               MMLINATTN_COLLECTIVE_TIMEOUT_S='120')
    two = subprocess.run(['bash', str(REPO / 'tools/dist_infer_large.sh'), str(config),
                          str(weights), '', '2', *common, '--out', str(tmp_path / 'two.json')],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'rank 1 of 2 (rows split)' in two.stdout
    one = subprocess.run([sys.executable, str(REPO / 'tools/infer_large.py'), str(config),
                          str(weights), *common, '--out', str(tmp_path / 'one.json')],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / 'one.json').read_text())
    b = json.loads((tmp_path / 'two.json').read_text())
    assert len(a) == len(b) > 30

    def key(r: dict) -> tuple:
        return (r['category_id'], ) + tuple(round(v * 4) for v in r['bbox'])
    assert sorted(map(key, a)) == sorted(map(key, b))
    scores_a = {key(r): r['score'] for r in a}
    assert all(abs(scores_a[key(r)] - r['score']) < 1e-4 for r in b)


def test_object_viewer_draws_outlines_by_class_and_the_score_slider_hides(tmp_path) -> None:
    """The viewer page in headless Chromium: a class-0 object's outline in its colour
    where the object's edge is, a low-scoring class-1 box shown at score 0 and hidden at
    ``#score=0.5``."""
    import os
    import shutil

    from mmlinattn.rasters import ArrayReader
    from mmlinattn.rasters.objects import ViewerSink
    reader = ArrayReader(np.full((256, 320, 3), 128, np.uint8), '<grey>')
    bits = np.ones((128, 128), bool)
    sink = ViewerSink(str(tmp_path / 'viewer'), reader, ['a', 'b'], [[255, 0, 0], [0, 0, 255]])
    sink.add(DetectedObject(0, 0.9, (96.0, 64.0, 224.0, 192.0), LocalMask(64, 96, bits)))
    sink.add(DetectedObject(1, 0.2, (20.0, 20.0, 60.0, 60.0)))
    sink.close()
    page = tmp_path / 'viewer/index.html'
    assert page.exists() and (tmp_path / 'viewer/objects.js').exists()
    assert not (tmp_path / 'viewer.partial').exists()
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None:
        if os.environ.get('MMLINATTN_REQUIRE_CHROMIUM'):
            pytest.fail('MMLINATTN_REQUIRE_CHROMIUM is set but no Chromium is on PATH')
        pytest.skip('no Chromium here: the page is written but not looked at')
    import cv2

    def shot(fragment: str, name: str) -> np.ndarray:
        out = tmp_path / f'{name}.png'
        subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu',
                        '--no-first-run', '--disable-background-networking',
                        '--disable-component-update', '--disable-sync',
                        f'--user-data-dir={tmp_path / ("chrome-" + name)}',
                        '--window-size=800,600', '--virtual-time-budget=8000',
                        f'--screenshot={out}', f'{page.as_uri()}#{fragment}'],
                       check=True, capture_output=True, timeout=120)
        return cv2.imread(str(out)).astype(int)

    def where(img: np.ndarray, bgr: tuple) -> tuple:
        view = img[:, :580].copy()
        view[:150, 430:] = 128  # OpenSeadragon's navigator (its view rectangle is red)
        ys, xs = np.nonzero(np.abs(view - np.array(bgr)).max(axis=2) < 70)
        return (xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) else None

    for attempt in range(3):  # a loaded CPU can shoot before the canvas is drawn
        all_ = shot('zoom=1&score=0', f'all{attempt}')
        if where(all_, (0, 0, 255)) is not None:
            break
    red, blue = where(all_, (0, 0, 255)), where(all_, (255, 0, 0))
    assert red is not None and blue is not None, (red, blue)
    # The outline runs through the pixel centres 96.5 ... 223.5: 127 image pixels
    # (screen pixels per image pixel from it; about 2 at zoom 1).
    s = (red[2] - red[0]) / 127
    assert 1.5 < s < 2.5 and abs((red[3] - red[1]) - 127 * s) < 6
    assert abs((blue[2] - blue[0]) - 40 * s) < 6 and abs((blue[3] - blue[1]) - 40 * s) < 6
    # Where the objects are relative to each other, in image pixels times the scale.
    assert abs((blue[0] - red[0]) - (20 - 96.5) * s) < 6
    assert abs((blue[1] - red[1]) - (20 - 64.5) * s) < 6
    middle = all_[(red[1] + red[3]) // 2, (red[0] + red[2]) // 2]
    assert np.abs(middle - 128).max() < 30  # an outline, not a fill: the image shows
    high = shot('zoom=1&score=0.5', 'high')
    assert where(high, (0, 0, 255)) is not None and where(high, (255, 0, 0)) is None


def test_background_skipped_objects_land_where_they_are_in_the_slide(detector, tmp_path
                                                                     ) -> None:
    """With a tissue mask covering the right half, the compacted image is that half:
    the objects equal those of the half alone, moved to their place in the image."""
    import cv2

    from mmlinattn.engine.detection_files import detect_file
    from mmlinattn.engine.tiled_detection import DetectionTiling
    from mmlinattn.rasters import ArrayReader
    image = _image(190, 384).permute(1, 2, 0).numpy().copy()
    mask = np.zeros((190, 384), np.uint8)
    mask[:, 192:] = 255
    cv2.imwrite(str(tmp_path / 'tissue.png'), mask)
    tiling = DetectionTiling(tile=128, margin=64, halo=128, nested_ios=None)
    skipped = detect_file(detector, ArrayReader(image, '<slide>'), [], chunk_tokens=48,
                          tiling=tiling, background=str(tmp_path / 'tissue.png'),
                          keep_objects=True)
    assert skipped['tissue']['cols'] == 192
    half = detect_file(detector, ArrayReader(image[:, 192:].copy(), '<half>'), [],
                       chunk_tokens=48, tiling=tiling, keep_objects=True)
    got = sorted((o.label, ) + tuple(round(v * 4) for v in o.bbox) for o in
                 skipped['objects_list'])
    expected = sorted((o.label, round((o.bbox[0] + 192) * 4), round(o.bbox[1] * 4),
                       round((o.bbox[2] + 192) * 4), round(o.bbox[3] * 4))
                      for o in half['objects_list'])
    assert got == expected and len(got) > 100
    moved = {(o.label, ) + tuple(round(v * 4) for v in o.bbox): o for o in
             skipped['objects_list']}
    for o in half['objects_list'][:50]:
        m = moved[(o.label, round((o.bbox[0] + 192) * 4), round(o.bbox[1] * 4),
                   round((o.bbox[2] + 192) * 4), round(o.bbox[3] * 4))].mask
        assert (m.y0, m.x0 - 192) == (o.mask.y0, o.mask.x0)
        assert np.array_equal(m.bits, o.mask.bits)


FAMILY = {
    'retinanet': ('configs/detection/inline_pvt/retinanet_inline-pvt-t_fpn_1x_coco.py',
                  dict(model=dict(backbone=dict(init_cfg=None), test_cfg=dict(
                      score_thr=0.0, nms_pre=200, max_per_img=30)))),
    'faster-rcnn': ('configs/detection/inline_pvt/faster-rcnn_inline-pvt-s_fpn_1x_coco.py',
                    dict(model=dict(backbone=dict(init_cfg=None, arch='tiny'), test_cfg=dict(
                        rpn=dict(nms_pre=200, max_per_img=100),
                        rcnn=dict(score_thr=0.0, max_per_img=30))))),
    'cascade-mask-rcnn': (
        'configs/detection/inline_swin/cascade-mask-rcnn_inline-swin-t_fpn_ms-crop-3x_coco.py',
        dict(model=dict(backbone=dict(init_cfg=None, depths=(1, 1, 1, 1)), test_cfg=dict(
            rpn=dict(nms_pre=200, max_per_img=100),
            rcnn=dict(score_thr=0.0, max_per_img=30))))),
}


@pytest.mark.parametrize('family', sorted(FAMILY))
def test_every_kind_of_detector_runs_by_tiles(family: str) -> None:
    """RetinaNet (a dense head to P7: tiles in 128 px), Faster R-CNN and Cascade Mask
    R-CNN (masks of the last stage, pasted over their boxes) from the shipped configs."""
    from mmlinattn.engine.build import build_from_config
    from mmlinattn.engine.detection_files import detect_file
    from mmlinattn.engine.tiled_detection import DetectionTiling
    from mmlinattn.rasters import ArrayReader
    config, options = FAMILY[family]
    torch.manual_seed(0)
    model, _ = build_from_config(str(REPO / config), options)
    model.eval()
    reader = ArrayReader(_image(200, 260).permute(1, 2, 0).numpy().copy(), '<image>')
    if family == 'retinanet':
        with pytest.raises(ValueError, match='multiple of 128'):
            detect_file(model, reader, [], chunk_tokens=48,
                        tiling=DetectionTiling(tile=64, margin=64, halo=64))
    info = detect_file(model, reader, [], chunk_tokens=48, keep_objects=True,
                       tiling=DetectionTiling(tile=128, margin=128, halo=128))
    objs = info['objects_list']
    assert info['tiles'] == 6 and len(objs) > 10
    for o in objs:
        x0, y0, x1, y1 = o.bbox
        assert 0 <= x0 <= x1 <= 260 and 0 <= y0 <= y1 <= 200
        assert (o.mask is not None) == (family == 'cascade-mask-rcnn')
        if o.mask is not None:  # over its box's pixels (and mmdet's one-pixel border)
            assert o.mask.bits.shape[0] <= y1 - y0 + 4 and o.mask.bits.shape[1] <= x1 - x0 + 4


def test_a_query_based_detector_is_refused_by_name(tmp_path) -> None:
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from mmlinattn.engine.tiled_detection import check_tileable
    (tmp_path / 'detr.py').write_text("_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'\n")
    cfg = Config.fromfile(str(tmp_path / 'detr.py'))
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.depth = 18
    cfg.model.neck.in_channels = [512]
    model = MODELS.build(cfg.model)
    with pytest.raises(ValueError, match='DETR: its heads are not local'):
        check_tileable(model)


def test_parts_of_a_large_object_seen_by_neighbouring_tiles_are_merged_once() -> None:
    """Two tiles each see part of one large disc (cut at their head regions' borders):
    one object with the union of their boxes and masks; a part of another class, and
    a part that disagrees inside the shared window, stay apart."""
    from mmlinattn.engine.tiled_detection import merge_truncated
    yy, xx = np.mgrid[0:400, 0:700]
    disc = (yy - 200) ** 2 / 200 ** 2 + (xx - 350) ** 2 / 350 ** 2 <= 1  # at (100, 300)

    def part(x0: int, x1: int, tile: tuple, head: list, label: int = 0) -> DetectedObject:
        bits = disc[:, x0 - 300:x1 - 300]
        return DetectedObject(label, 0.9 if tile == (0, 0) else 0.8,
                              (float(x0), 100.0, float(x1), 500.0), LocalMask(100, x0, bits),
                              dict(tile=list(tile), head=head))
    a = part(300, 768, (0, 0), [0, 1024, 0, 768])  # tile 0 sees up to x = 768
    b = part(512, 1000, (0, 1), [0, 1024, 512, 1536])  # tile 1 from x = 512
    other = part(512, 1000, (0, 1), [0, 1024, 512, 1536], label=1)
    elsewhere = DetectedObject(0, 0.7, (600.0, 700.0, 760.0, 900.0), None,
                               dict(tile=[0, 1], head=[0, 1024, 512, 1536]))
    merged = merge_truncated([a, b, other, elsewhere])
    assert len(merged) == 3
    whole = next(o for o in merged if o.extra['parts'] == 2)
    assert whole.bbox == (300.0, 100.0, 1000.0, 500.0) and whole.score == 0.9
    assert whole.mask.bits.shape == (400, 700) and np.array_equal(whole.mask.bits, disc)
    assert sorted(o.extra['parts'] for o in merged) == [1, 1, 2]


# -- the coarse pass ------------------------------------------------------------------------

def test_downsampled_reader_gives_block_means_and_repeats_the_edge() -> None:
    from mmlinattn.rasters import ArrayReader, DownsampledReader
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    d = DownsampledReader(ArrayReader(a), 4)
    assert (d.height, d.width) == (6, 9)
    got = d.read(1, 6, 2, 9)
    padded = np.pad(a, ((0, 3), (0, 2), (0, 0)), mode='edge').astype(np.float64)
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(padded).permute(2, 0, 1), 4)
    want = np.rint(want.permute(1, 2, 0).numpy()[1:6, 2:9]).astype(np.uint8)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match='positive integer'):
        DownsampledReader(ArrayReader(a), 0)


def test_large_objects_replace_their_fragments_and_the_fine_pass_keeps_the_rest() -> None:
    from mmlinattn.engine.tiled_detection import LargeObjects, upscaled
    ring = np.zeros((40, 40), bool)  # a coarse ring: its hole holds other objects
    ring[:, :6] = ring[:, -6:] = ring[:6] = ring[-6:] = True
    big = upscaled(DetectedObject(0, 0.9, (10.0, 10.0, 50.0, 50.0), LocalMask(10, 10, ring)),
                   8)
    assert big.bbox == (80.0, 80.0, 400.0, 400.0) and big.mask.y0 == 80
    assert big.mask.bits.shape == (320, 320) and big.mask.bits[:48, :48].all()
    small = DetectedObject(0, 0.5, (0.0, 0.0, 20.0, 20.0))  # coarse, under the split
    large = LargeObjects([big, small], split=256)
    assert large.objects == [big]

    def fine(label: int, y0: int, x0: int, side: int = 30) -> DetectedObject:
        return DetectedObject(label, 0.8, (float(x0), float(y0), float(x0 + side),
                                           float(y0 + side)),
                              LocalMask(y0, x0, np.ones((side, side), bool)))
    on_ring = fine(0, 85, 200)  # on the ring, its class: a fragment
    in_hole = fine(0, 200, 200)  # inside the box but in the hole: an object of its own
    other_class = fine(1, 85, 200)
    outside = fine(0, 500, 500)
    too_big = fine(0, 1000, 1000, side=300)  # the coarse pass is responsible for it
    kept = [o for o in (on_ring, in_hole, other_class, outside, too_big) if large.keeps(o)]
    assert kept == [in_hole, other_class, outside]
    assert (large.fragments, large.replaced) == (1, 1)


def test_a_coarse_pass_gives_the_objects_larger_than_the_margin(detector) -> None:
    """Objects larger than twice the margin are those of the same detector on the image
    read twice coarser, at their place; the rest are the full-resolution pass's minus
    the fragments of those."""
    from mmlinattn.engine.detection_files import detect_file
    from mmlinattn.engine.tiled_detection import DetectionTiling, LargeObjects, upscaled
    from mmlinattn.rasters import ArrayReader, DownsampledReader
    array = _image(192, 256).permute(1, 2, 0).numpy().copy()
    tiling = DetectionTiling(tile=128, margin=64, halo=128, nested_ios=None)
    info = _tiled(detector, torch.from_numpy(array).permute(2, 0, 1),
                  DetectionTiling(tile=128, margin=64, halo=128, coarse=2, nested_ios=None))
    fine = _tiled(detector, torch.from_numpy(array).permute(2, 0, 1), tiling)['objects_list']
    coarse = detect_file(detector, DownsampledReader(ArrayReader(array), 2), [],
                         chunk_tokens=48, tiling=tiling, keep_objects=True)['objects_list']
    large = LargeObjects([upscaled(o, 2) for o in coarse], 2 * 64)
    want = [o for o in fine if large.keeps(o)] + large.objects
    got = info['objects_list']
    assert len(large.objects) > 10 and info['coarse']['objects'] == len(large.objects)
    assert info['coarse']['image'] == [96, 128] and large.fragments > 0
    assert [(o.label, o.bbox) for o in got] == [(o.label, o.bbox) for o in want]
    assert all(max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) <= 128 or
               o.extra.get('coarse') == 2 for o in got)


def test_roi_branches_in_chunks_give_the_objects_of_one_pass(detector, monkeypatch) -> None:
    from mmlinattn.engine import tiled_detection
    from mmlinattn.engine.large_image import features_given, prepare_image
    from mmlinattn.engine.tiled_detection import chunked_roi_forwards
    image = _image(96, 128)
    x, samples, _ = prepare_image(detector, image, 'mmdet')
    roi = detector.roi_head
    with torch.no_grad():
        feats = detector.extract_feat(x)
        with features_given(detector, feats):
            want = detector.predict(x, samples, rescale=False)[0].pred_instances
            monkeypatch.setattr(tiled_detection, 'ROI_CHUNKS',
                                {'_bbox_forward': 37, '_mask_forward': 5})
            calls = []
            bbox_forward = roi._bbox_forward
            monkeypatch.setattr(roi, '_bbox_forward',
                                lambda *a: calls.append(len(a[-1])) or bbox_forward(*a))
            with chunked_roi_forwards(detector) as taken:
                got = detector.predict(x, samples, rescale=False)[0].pred_instances
    assert taken == 2 and '_mask_forward' not in vars(roi)
    assert max(calls) == 37 and sum(calls) > 37 * 3  # really in chunks, every region once
    assert len(want) == len(got) > 5
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.bboxes, want.bboxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-5)
    assert torch.equal(got.masks, want.masks)
