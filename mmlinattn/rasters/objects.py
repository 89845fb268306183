"""Detected objects of a very large image, streamed to files without image-sized arrays.

An object is a :class:`DetectedObject`: its class, score, box and, for instance
segmentation, a :class:`LocalMask`, the mask's bitmap over the box's own pixels with its
offset in the image (never an image-sized bitmap). Objects arrive tile by tile and go
to one or more sinks, each written to ``NAME.partial`` and renamed when complete:

* :class:`CocoJsonSink`: COCO results JSON (``bbox`` x, y, w, h; masks as compressed
  RLE at the image's size, computed from the local mask's runs; pycocotools reads it).
* :class:`GeoJsonSink`: GeoJSON features as QuPath imports them (``objectType``, a
  ``classification`` with name and colour, the score in ``measurements``), in image
  pixels of level 0, or in map coordinates for a GeoTIFF (its CRS named).
* :class:`GeoPackageSink`: a GeoPackage layer in the source CRS, through pyogrio (GDAL).
* :class:`ViewerSink`: a deep-zoom page (OpenSeadragon, no server) with the outlines
  and boxes over the image, coloured by class, and a score slider.
* :class:`ObjectStore`: SQLite with an R-tree, queried by :func:`query_objects` (objects
  in a region, of some classes, above a score) without reading every object.

Polygons are the outlines of the local masks (pixel centres, holes kept), made valid
with shapely; an object without a mask is its box. Memory is flat in the number of
objects: every sink writes each object as it comes.
"""
from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..utils.atomic import sync_and_replace
from .readers import GeoReference

__all__ = ['LocalMask', 'DetectedObject', 'image_rle', 'mask_polygon', 'ObjectSink',
           'CocoJsonSink', 'GeoJsonSink', 'GeoPackageSink', 'ObjectStore', 'ViewerSink',
           'query_objects', 'open_sinks', 'check_outputs', 'write_objects', 'SINK_SUFFIXES']


@dataclass
class LocalMask:
    """A bitmap ``(h, w) bool`` whose pixel ``[0, 0]`` is image pixel ``(y0, x0)``."""

    y0: int
    x0: int
    bits: np.ndarray

    def to_json(self) -> dict:
        from pycocotools import mask as mask_util
        rle = mask_util.encode(np.asfortranarray(self.bits.astype(np.uint8)))
        return dict(y0=self.y0, x0=self.x0, size=list(rle['size']),
                    counts=rle['counts'].decode())

    @classmethod
    def from_json(cls, d: dict) -> LocalMask:
        from pycocotools import mask as mask_util
        bits = mask_util.decode(dict(size=d['size'], counts=d['counts'].encode())).astype(bool)
        return cls(int(d['y0']), int(d['x0']), bits)

    def shifted(self, dy: int, dx: int) -> LocalMask:
        return LocalMask(self.y0 + dy, self.x0 + dx, self.bits)

    @property
    def area(self) -> int:
        return int(self.bits.sum())


@dataclass
class DetectedObject:
    """One object: ``bbox`` ``(x0, y0, x1, y1)`` in image pixels of the level read
    (pixel ``i`` spans ``[i, i + 1)``), the class index ``label``, ``score``, an
    optional :class:`LocalMask`, and ``extra`` properties (e.g. ``parts`` of a merge)."""

    label: int
    score: float
    bbox: tuple[float, float, float, float]
    mask: Optional[LocalMask] = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dict(label=self.label, score=self.score, bbox=list(self.bbox))
        if self.mask is not None:
            d['mask'] = self.mask.to_json()
        if self.extra:
            d['extra'] = self.extra
        return d

    @classmethod
    def from_json(cls, d: dict) -> DetectedObject:
        mask = LocalMask.from_json(d['mask']) if 'mask' in d else None
        return cls(int(d['label']), float(d['score']), tuple(d['bbox']), mask,
                   d.get('extra', {}))


def image_rle(mask: LocalMask, height: int, width: int) -> dict:
    """COCO's compressed RLE of ``mask`` placed in a ``height x width`` image, computed
    from the runs of its own columns (no image-sized array). Needs ``height * width``
    below 2^32 (COCO's counts are 32-bit)."""
    from pycocotools import mask as mask_util
    if height * width >= 2**32:
        raise ValueError(f'COCO RLE counts are 32-bit: a {height} x {width} image is too large '
                         'for RLE masks; write .geojson, .gpkg or .sqlite instead')
    bits = mask.bits
    h, w = bits.shape
    # Clip the local mask to the image (a box may reach past the last pixel).
    y0, x0 = mask.y0, mask.x0
    top, left = max(0, -y0), max(0, -x0)
    bits = bits[top:max(top, min(h, height - y0)), left:max(left, min(w, width - x0))]
    y0, x0 = y0 + top, x0 + left
    h, w = bits.shape
    counts: list[int] = []
    if bits.size and bits.any():
        padded = np.zeros((w, h + 2), dtype=np.int8)  # one column of the image per row
        padded[:, 1:-1] = bits.T
        cols, pos = np.nonzero(np.diff(padded, axis=1))
        # Alternating starts and ends of the runs of ones in each column, in order.
        starts = (cols[0::2] + x0) * height + y0 + pos[0::2]
        ends = (cols[1::2] + x0) * height + y0 + pos[1::2]
        # A run ending where the next begins (a full-height column) is one run.
        join = np.nonzero(starts[1:] == ends[:-1])[0]
        if len(join):
            keep_start = np.ones(len(starts), bool)
            keep_start[join + 1] = False
            keep_end = np.ones(len(ends), bool)
            keep_end[join] = False
            starts, ends = starts[keep_start], ends[keep_end]
        edges = np.empty(2 * len(starts) + 2, dtype=np.int64)
        edges[0] = 0
        edges[1:-1:2], edges[2:-1:2] = starts, ends
        edges[-1] = height * width
        counts = np.diff(edges).tolist()
        if counts[-1] == 0:  # ones up to the last pixel: no closing run of zeros
            counts.pop()
    else:
        counts = [height * width]
    rle = mask_util.frPyObjects(dict(counts=counts, size=[height, width]), height, width)
    return dict(size=[height, width], counts=rle['counts'].decode())


def mask_polygon(mask: LocalMask) -> Any:
    """The mask's outline as a valid shapely (Multi)Polygon in image pixels, vertices at
    pixel centres (``x + 0.5``), holes kept; None for an empty mask."""
    import cv2
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon
    bits = mask.bits.astype(np.uint8)
    if not bits.any():
        return None
    contours, hierarchy = cv2.findContours(bits, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([mask.x0 + 0.5, mask.y0 + 0.5])
    polys = []
    for i, c in enumerate(contours):
        if hierarchy[0][i][3] != -1:  # a hole: taken with its outer ring
            continue
        shell = _ring(c, offset)
        holes = []
        child = hierarchy[0][i][2]
        while child != -1:
            hole = _ring(contours[child], offset)
            if len(hole) >= 3:
                holes.append(hole)
            child = hierarchy[0][child][0]
        polys.append(Polygon(shell, holes))
    geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if not geom.is_valid:
        geom = make_valid(geom)
    return _polygonal(geom)


def _ring(contour: np.ndarray, offset: np.ndarray) -> np.ndarray:
    pts = contour[:, 0, :].astype(float) + offset
    if len(pts) < 3:  # a line or a point: its pixels' square
        x0, y0 = pts.min(0) - 0.5
        x1, y1 = pts.max(0) + 0.5
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return pts


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry (make_valid may add lines or points)."""
    from shapely.geometry import GeometryCollection, MultiPolygon, Polygon
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    if isinstance(geom, GeometryCollection):
        parts = [g for g in geom.geoms if isinstance(g, (Polygon, MultiPolygon))]
        flat = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
        if flat:
            return flat[0] if len(flat) == 1 else MultiPolygon(flat)
    return None


def object_geometry(obj: DetectedObject) -> Any:
    """The object's polygon (its mask's outline, or its box), valid, in image pixels."""
    from shapely.geometry import box
    geom = mask_polygon(obj.mask) if obj.mask is not None else None
    return geom if geom is not None else box(*obj.bbox)


def _transformed(geom: Any, geo: Optional[GeoReference], scale: float) -> Any:
    """Image pixels of the level read -> level-0 pixels (``scale``) or map coordinates."""
    from shapely import affinity
    if geo is not None and geo.transform is not None:
        a, b, c, d, e, f = geo.transform
        return affinity.affine_transform(geom, [a, b, d, e, c, f])
    if scale != 1:
        return affinity.scale(geom, scale, scale, origin=(0, 0))
    return geom


class ObjectSink:
    """Receives objects one at a time; ``close()`` completes the file (renamed from
    ``.partial``), ``abort()`` removes it."""

    #: Appended to the path while the file is incomplete.
    partial = '.partial'

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = path + self.partial
        os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)
        self.count = 0

    def add(self, obj: DetectedObject) -> None:
        self.count += 1

    def _finish(self) -> None:
        pass

    def close(self) -> None:
        self._finish()
        sync_and_replace(self.tmp, self.path)

    # A JSON file written item by item: ``head``, the items comma-separated, ``tail``.
    def _open(self, head: str) -> None:
        self.f = open(self.tmp, 'w')  # noqa: SIM115 (closed by close/abort)
        self.f.write(head)

    def _item(self, item: Any) -> None:
        self.f.write((',\n' if self.count else '\n') + json.dumps(item))

    def _close(self, tail: str) -> None:
        if not self.f.closed:
            self.f.write(tail)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._finish()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


class CocoJsonSink(ObjectSink):
    """COCO results: a JSON list of ``{image_id, category_id, category, bbox, score,
    segmentation}`` (``segmentation`` compressed RLE at the image's size)."""

    def __init__(self, path: str, classes: Sequence[str], height: int, width: int,
                 image_id: int = 0) -> None:
        super().__init__(path)
        self.classes, self.height, self.width, self.image_id = classes, height, width, image_id
        self._open('[')

    def add(self, obj: DetectedObject) -> None:
        x0, y0, x1, y1 = obj.bbox
        rec: dict = dict(image_id=self.image_id, category_id=obj.label,
                         bbox=[x0, y0, x1 - x0, y1 - y0], score=obj.score)
        if self.classes:
            rec['category'] = self.classes[obj.label]
        if obj.mask is not None:
            rec['segmentation'] = image_rle(obj.mask, self.height, self.width)
        rec.update(obj.extra)
        self._item(rec)
        super().add(obj)

    def _finish(self) -> None:
        self._close('\n]\n')


class GeoJsonSink(ObjectSink):
    """A GeoJSON FeatureCollection that QuPath imports as detections: each feature with
    ``objectType``, ``classification`` ``{name, color}`` and ``measurements``
    ``{score}``; polygons in level-0 image pixels (``scale`` per pixel read), or in map
    coordinates through ``geo`` (the collection names its CRS)."""

    def __init__(self, path: str, classes: Sequence[str], palette: Sequence[Sequence[int]],
                 geo: Optional[GeoReference] = None, scale: float = 1.0,
                 object_type: str = 'detection') -> None:
        super().__init__(path)
        self.classes, self.palette, self.geo, self.scale = classes, palette, geo, scale
        self.object_type = object_type
        head: dict = dict(type='FeatureCollection')
        if geo is not None and geo.crs:
            head['crs'] = dict(type='name', properties=dict(name=geo.crs))
        self._open(json.dumps(head)[:-1] + ', "features": [')

    def add(self, obj: DetectedObject) -> None:
        from shapely.geometry import mapping
        geom = _transformed(object_geometry(obj), self.geo, self.scale)
        name = self.classes[obj.label] if self.classes else str(obj.label)
        colour = list(map(int, self.palette[obj.label % len(self.palette)]))
        props = dict(objectType=self.object_type,
                     classification=dict(name=name, color=colour),
                     measurements=dict(score=obj.score), **obj.extra)
        self._item(dict(type='Feature', geometry=mapping(geom), properties=props))
        super().add(obj)

    def _finish(self) -> None:
        self._close('\n]}\n')


class GeoPackageSink(ObjectSink):
    """A GeoPackage layer ``objects`` (class, label, score; polygons in the source CRS, or
    in level-0 image pixels without one), written in batches through pyogrio (GDAL)."""

    BATCH = 4096
    partial = '.partial.gpkg'  # GDAL wants the suffix of the format

    def __init__(self, path: str, classes: Sequence[str], geo: Optional[GeoReference] = None,
                 scale: float = 1.0) -> None:
        super().__init__(path)
        try:
            import pyogrio  # noqa: F401
        except ImportError as e:
            raise ImportError('a GeoPackage needs pyogrio (the large-images extra: '
                              "pip install 'mmlinattn[large-images]')") from e
        self.classes, self.geo, self.scale = classes, geo, scale
        self.batch: list[tuple[Any, int, float]] = []
        self.written = False

    def add(self, obj: DetectedObject) -> None:
        self.batch.append((_transformed(object_geometry(obj), self.geo, self.scale),
                           obj.label, obj.score))
        super().add(obj)
        if len(self.batch) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.batch and self.written:
            return
        import shapely
        from pyogrio.raw import write
        from shapely.geometry import MultiPolygon, Polygon
        geoms = [g if isinstance(g, MultiPolygon) else MultiPolygon([g]) if isinstance(
            g, Polygon) else g for g, _, _ in self.batch]
        labels = np.array([lab for _, lab, _ in self.batch], dtype=np.int32)
        names = np.array([self.classes[lab] if self.classes else str(lab) for lab in labels],
                         dtype=object)
        scores = np.array([s for _, _, s in self.batch], dtype=np.float64)
        crs = self.geo.crs if self.geo is not None and self.geo.crs else None
        write(self.tmp, np.array(shapely.to_wkb(geoms), dtype=object) if geoms else
              np.array([], dtype=object), [names, labels, scores], ['class', 'label', 'score'],
              layer='objects', driver='GPKG', geometry_type='MultiPolygon', crs=crs,
              append=self.written)
        self.written = True
        self.batch = []

    def _finish(self) -> None:
        self._flush()


class ObjectStore(ObjectSink):
    """SQLite with an R-tree: table ``objects`` (id, label, class, score, box, polygon
    as WKT in image pixels of the level read, COCO RLE when masked) and the R-tree
    ``objects_rtree`` on the boxes; indexes on class and score."""

    def __init__(self, path: str, classes: Sequence[str], height: int, width: int,
                 meta: Optional[dict] = None) -> None:
        super().__init__(path)
        self.classes = classes
        self.db = sqlite3.connect(self.tmp)
        self.db.executescript('''
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE objects (id INTEGER PRIMARY KEY, label INTEGER, class TEXT,
                score REAL, x0 REAL, y0 REAL, x1 REAL, y1 REAL, polygon TEXT, extra TEXT);
            CREATE VIRTUAL TABLE objects_rtree USING rtree(id, minx, maxx, miny, maxy);
        ''')
        info = dict(meta or {}, height=height, width=width, classes=list(classes))
        self.db.executemany('INSERT INTO meta VALUES (?, ?)',
                            [(k, json.dumps(v)) for k, v in info.items()])

    def add(self, obj: DetectedObject) -> None:
        super().add(obj)
        x0, y0, x1, y1 = obj.bbox
        geom = object_geometry(obj)
        name = self.classes[obj.label] if self.classes else str(obj.label)
        self.db.execute('INSERT INTO objects VALUES (?,?,?,?,?,?,?,?,?,?)',
                        (self.count, obj.label, name, obj.score, x0, y0, x1, y1, geom.wkt,
                         json.dumps(obj.extra) if obj.extra else None))
        self.db.execute('INSERT INTO objects_rtree VALUES (?,?,?,?,?)',
                        (self.count, x0, x1, y0, y1))
        if self.count % 10000 == 0:
            self.db.commit()

    def _finish(self) -> None:
        if self.db is not None:
            self.db.execute('CREATE INDEX objects_class ON objects(class)')
            self.db.execute('CREATE INDEX objects_score ON objects(score)')
            self.db.commit()
            self.db.close()
            self.db = None


class ViewerSink(ObjectSink):
    """A viewer folder: ``objects.js`` streamed (each object's class, score, box and
    outline, simplified to half a pixel), and at the end the image's Deep Zoom pyramid
    and ``index.html`` (:func:`~mmlinattn.rasters.viewer.write_object_viewer`). The
    folder is built as ``NAME.partial`` and renamed when complete."""

    def __init__(self, folder: str, reader: Any, classes: Sequence[str],
                 palette: Sequence[Sequence[int]], title: str = 'mmlinattn objects') -> None:
        import shutil
        super().__init__(folder)
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.reader, self.classes, self.palette, self.title = reader, classes, palette, title
        self.f = open(osp.join(self.tmp, 'objects.js'), 'w')  # noqa: SIM115 (closed by close)
        self.f.write('window.OBJECTS = [')

    def add(self, obj: DetectedObject) -> None:
        from shapely.geometry import MultiPolygon
        ring: list = []
        if obj.mask is not None:
            geom = mask_polygon(obj.mask)
            if geom is not None:
                if isinstance(geom, MultiPolygon):
                    geom = max(geom.geoms, key=lambda g: g.area)
                coords = np.asarray(geom.exterior.simplify(0.5).coords)[:-1]
                ring = np.round(coords, 1).reshape(-1).tolist()
        x0, y0, x1, y1 = (round(v, 1) for v in obj.bbox)
        item = [obj.label, round(obj.score, 4), x0, y0, x1, y1, ring]
        self.f.write((',\n' if self.count else '\n') + json.dumps(item))
        super().add(obj)

    def _finish(self) -> None:
        if not self.f.closed:
            self.f.write('\n];\n')
            self.f.close()
            from .viewer import write_object_viewer
            write_object_viewer(self.tmp, self.reader, self.classes, self.palette, self.title)

    def close(self) -> None:
        import shutil
        self._finish()
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        import shutil
        if not self.f.closed:
            self.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def query_objects(path: str, region: Optional[tuple[float, float, float, float]] = None,
                  classes: Optional[Iterable[str]] = None, min_score: Optional[float] = None
                  ) -> Iterator[dict]:
    """Objects of an :class:`ObjectStore` whose boxes meet ``region`` ``(x0, y0, x1, y1)``
    (through the R-tree), of ``classes``, scoring at least ``min_score``: dicts with
    ``id``, ``class``, ``label``, ``score``, ``bbox`` and ``polygon`` (WKT)."""
    db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        sql = ('SELECT o.id, o.class, o.label, o.score, o.x0, o.y0, o.x1, o.y1, o.polygon '
               'FROM objects o')
        where, args = [], []
        if region is not None:
            sql += ' JOIN objects_rtree r ON r.id = o.id'
            x0, y0, x1, y1 = region
            where += ['r.minx <= ?', 'r.maxx >= ?', 'r.miny <= ?', 'r.maxy >= ?']
            args += [x1, x0, y1, y0]
        if classes is not None:
            names = list(classes)
            where.append(f'o.class IN ({",".join("?" * len(names))})')
            args += names
        if min_score is not None:
            where.append('o.score >= ?')
            args.append(min_score)
        if where:
            sql += ' WHERE ' + ' AND '.join(where)
        for row in db.execute(sql + ' ORDER BY o.id', args):
            yield dict(id=row[0], cls=row[1], label=row[2], score=row[3],
                       bbox=tuple(row[4:8]), polygon=row[8])
    finally:
        db.close()


#: Output suffixes a detector's ``--out`` may name, and what writes them.
SINK_SUFFIXES = ('.json', '.geojson', '.gpkg', '.sqlite', '.db')


def write_objects(sinks: Sequence[ObjectSink], objects: Iterable[DetectedObject]) -> None:
    """Every object to every sink, then each file completed; on any failure every sink
    is aborted (nothing half-written is left under a final name)."""
    try:
        for obj in objects:
            for sink in sinks:
                sink.add(obj)
        for sink in sinks:
            sink.close()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def check_outputs(paths: Sequence[str]) -> None:
    """Refuse, before any work, an output whose suffix no sink writes."""
    for path in paths:
        if not path.lower().endswith(SINK_SUFFIXES):
            raise ValueError(f'{path}: a detector writes {", ".join(SINK_SUFFIXES)}')


def open_sinks(paths: Sequence[str], classes: Sequence[str], palette: Sequence[Sequence[int]],
               height: int, width: int, geo: Optional[GeoReference] = None,
               downsample: float = 1.0, meta: Optional[dict] = None,
               viewer: Optional[str] = None, reader: Any = None) -> list[ObjectSink]:
    """One sink per output path, chosen by its suffix (see :data:`SINK_SUFFIXES`), and
    a :class:`ViewerSink` for ``viewer`` (a folder; needs the image's ``reader``)."""
    sinks: list[ObjectSink] = []
    try:
        if viewer:
            sinks.append(ViewerSink(viewer, reader, classes, palette,
                                    (meta or {}).get('image', 'mmlinattn objects')))
        for path in paths:
            low = path.lower()
            scale = downsample if geo is None else 1.0
            if low.endswith('.geojson'):
                sinks.append(GeoJsonSink(path, classes, palette, geo, scale))
            elif low.endswith('.gpkg'):
                sinks.append(GeoPackageSink(path, classes, geo, scale))
            elif low.endswith(('.sqlite', '.db')):
                sinks.append(ObjectStore(path, classes, height, width, meta))
            elif low.endswith('.json'):
                sinks.append(CocoJsonSink(path, classes, height, width))
            else:
                raise ValueError(f'{path}: a detector writes {", ".join(SINK_SUFFIXES)}')
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    return sinks
