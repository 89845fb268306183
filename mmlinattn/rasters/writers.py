"""Predictions written where whole-slide and map viewers read them.

* :func:`write_label_pyramid`: class indices as a tiled, compressed, pyramidal
  OME-TIFF (BigTIFF; SubIFD levels, each half the previous by nearest sampling, as
  a label map must be), written tile row by tile row from an array that may be a
  memory-mapped file; the class names, palette and source in a JSON tag
  (:data:`METADATA_TAG`), the input's GeoTIFF tags (CRS, transform) kept.
* :func:`write_overlay_pyramid`: the image with the prediction blended on it, as
  an RGB pyramid of the same layout, read band by band from the image's reader.

Everything is written to ``NAME.partial`` and renamed when complete, so a file at
the output path is always whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..utils.atomic import sync_and_replace
from .readers import GeoReference, RegionReader

__all__ = ['METADATA_TAG', 'TILE', 'write_label_pyramid', 'write_overlay_pyramid',
           'read_label_metadata', 'default_palette', 'atomic_output',
           'pyramid_shapes']

#: A private TIFF tag holding mmlinattn's JSON metadata (classes, palette, source).
METADATA_TAG = 65000
#: Tile side of the written pyramids.
TILE = 256


def default_palette(num_classes: int) -> list[list[int]]:
    """A fixed palette of distinct RGB colours (the dataset's own where it has one)."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(40, 256, (max(num_classes, 1), 3))
    return colours.tolist()


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """A temporary path next to ``path``, renamed to it when the block completes and
    removed when it fails: nothing incomplete is ever left under the final name."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + '.partial'
    try:
        yield tmp
        sync_and_replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def pyramid_shapes(height: int, width: int, min_side: int = TILE) -> list[tuple[int, int]]:
    """``(h, w)`` of each level, halving (rounding up) until both sides fit one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _tiles(read_rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...]
           ) -> Iterator[np.ndarray]:
    """Tiles of ``TILE x TILE`` in row-major order, each tile row read once by
    ``read_rows(y0, y1)``; edge tiles zero-padded (the TIFF tile shape is fixed)."""
    h, w = shape[:2]
    for y in range(0, h, TILE):
        band = read_rows(y, min(h, y + TILE))
        for x in range(0, w, TILE):
            tile = band[:, x:x + TILE]
            if tile.shape[0] < TILE or tile.shape[1] < TILE:
                padded = np.zeros((TILE, TILE) + tile.shape[2:], tile.dtype)
                padded[:tile.shape[0], :tile.shape[1]] = tile
                tile = padded
            yield tile


def _write_pyramid(path: str, level_rows: Sequence[Callable[[int, int], np.ndarray]],
                   shapes: Sequence[tuple[int, ...]], dtype: Any, photometric: str,
                   metadata: dict, extratags: Sequence[tuple], mpp: Optional[float],
                   compression: str) -> None:
    import tifffile
    resolution = None
    if mpp:  # OME's physical size, and the TIFF resolution in pixels per centimetre
        metadata = dict(metadata, PhysicalSizeX=mpp, PhysicalSizeXUnit='µm',
                        PhysicalSizeY=mpp, PhysicalSizeYUnit='µm')
        resolution = (1e4 / mpp, 1e4 / mpp)
    options = dict(tile=(TILE, TILE), compression=compression, photometric=photometric,
                   dtype=dtype, maxworkers=1)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        for i, (rows, shape) in enumerate(zip(level_rows, shapes)):
            extra = dict(subifds=len(shapes) - 1, metadata=metadata, extratags=extratags,
                         resolution=resolution, resolutionunit='CENTIMETER' if mpp else None
                         ) if i == 0 else dict(subfiletype=1, metadata=None)
            if i and mpp:
                scale = shape[1] and shapes[0][1] / shape[1]
                extra.update(resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                             resolutionunit='CENTIMETER')
            tw.write(_tiles(rows, shape), shape=shape, **options, **extra)


def _subsampled(base: Any, step: int, shape: tuple[int, ...]) -> Callable[[int, int],
                                                                         np.ndarray]:
    """Rows of ``base[::step, ::step]`` (nearest sampling of a label map), read by bands."""
    def rows(y0: int, y1: int) -> np.ndarray:
        return np.asarray(base[y0 * step:(y1 - 1) * step + 1:step, ::step])[:, :shape[1]]
    return rows


def write_label_pyramid(path: str, labels: Any, classes: Sequence[str],
                        palette: Optional[Sequence[Sequence[int]]] = None,
                        geo: Optional[GeoReference] = None, mpp: Optional[float] = None,
                        nodata: Optional[int] = None, source: Optional[dict] = None,
                        compression: str = 'zlib') -> None:
    """``labels (H, W)`` (a numpy array or memory map of class indices) -> a pyramidal
    OME-TIFF at ``path`` (see the module docstring). ``nodata``: the value of pixels
    that were not predicted (skipped background)."""
    h, w = labels.shape
    dtype = np.uint8 if len(classes) <= 255 and (nodata is None or nodata < 256) else np.uint16
    shapes = pyramid_shapes(h, w)
    palette = [list(map(int, c)) for c in (palette or default_palette(len(classes)))]
    meta = dict(classes=list(classes), palette=palette, nodata=nodata, source=source or {})
    extratags = [(METADATA_TAG, 's', 0, json.dumps(meta), True)]
    if geo is not None:
        extratags += [(code, dtype_code, count, value, True)
                      for code, dtype_code, count, value in geo.tags]
    def as_labels(f: Callable[[int, int], np.ndarray]) -> Callable[[int, int], np.ndarray]:
        return lambda y0, y1: f(y0, y1).astype(dtype, copy=False)

    # Level i: every 2^i-th row and column (level 0: all of them), as the label type.
    rows = [as_labels(_subsampled(labels, 2**i, s)) for i, s in enumerate(shapes)]
    with atomic_output(path) as tmp:
        _write_pyramid(tmp, rows, shapes, dtype, 'minisblack', dict(axes='YX', Name='labels'),
                       extratags, mpp, compression)


def write_overlay_pyramid(path: str, reader: RegionReader, labels: Any,
                          palette: Sequence[Sequence[int]], alpha: float = 0.5,
                          nodata: Optional[int] = None, compression: str = 'zlib') -> None:
    """The image of ``reader`` with the labels' colours blended at ``alpha`` (pixels
    equal to ``nodata`` left as they are), an RGB pyramid built by 2x2 means."""
    import cv2
    h, w = labels.shape
    colours = np.zeros((65536, 3), np.float32)
    colours[:len(palette)] = np.asarray(palette, np.float32)

    def base_rows(y0: int, y1: int) -> np.ndarray:
        rgb = reader.read(y0, y1)[..., ::-1].astype(np.float32)
        lab = np.asarray(labels[y0:y1]).astype(np.int64)
        blend = rgb * (1 - alpha) + colours[lab] * alpha
        if nodata is not None:
            blend = np.where((lab == nodata)[..., None], rgb, blend)
        return np.clip(blend + 0.5, 0, 255).astype(np.uint8)

    shapes = pyramid_shapes(h, w)

    def level_rows(i: int) -> Callable[[int, int], np.ndarray]:
        step = 2**i

        def rows(y0: int, y1: int) -> np.ndarray:
            band = base_rows(y0 * step, min(h, y1 * step))
            return cv2.resize(band, (shapes[i][1], y1 - y0), interpolation=cv2.INTER_AREA)
        return rows

    with atomic_output(path) as tmp:
        _write_pyramid(tmp, [base_rows] + [level_rows(i) for i in range(1, len(shapes))],
                       [s + (3, ) for s in shapes], np.uint8, 'rgb',
                       dict(axes='YXS', Name='overlay'), [], reader.mpp, compression)


def read_label_metadata(path: str) -> dict:
    """The JSON metadata of a label pyramid written by :func:`write_label_pyramid`."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags.get(METADATA_TAG)
        if tag is None:
            raise ValueError(f'{path}: no mmlinattn metadata tag ({METADATA_TAG})')
        return json.loads(tag.value)
