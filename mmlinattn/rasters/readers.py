"""Image files read by regions: tiled and striped TIFF, BigTIFF, OME-TIFF, GeoTIFF,
whole-slide formats (through OpenSlide) and small images (through cv2).

A reader is opened on one pyramid level and delivers any rectangle of it as a
``(rows, cols, 3) uint8`` BGR array (the channel order mmseg/mmdet's
``LoadImageFromFile`` gives), decoding only the tiles or strips that the rectangle
touches. ``decoded_pixels`` counts every pixel it decoded, so a caller (and the
tests) can check that the whole image never was.

Files are untrusted: a header claiming more pixels than ``max_pixels``, or more
than ``max_ratio`` decoded bytes per byte of file (a decompression bomb), is
refused before anything is allocated; a tile or strip that points past the end of
the file (a truncated file) is refused when the file is opened; a tile that does
not decode raises :class:`ImageFileError` naming the file and the region.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

__all__ = ['ImageFileError', 'GeoReference', 'RegionReader', 'ArrayReader', 'TiffReader',
           'OpenSlideReader', 'CompactedReader', 'DownsampledReader', 'kept_rectangles',
           'open_image', 'DEFAULT_MAX_PIXELS',
           'DEFAULT_MAX_RATIO', 'CV2_SUFFIXES']

#: Pixels a file may claim (at its largest level) before it is refused: 2^36, 69 Gpx.
DEFAULT_MAX_PIXELS = 2**36
#: Decoded bytes per byte of file beyond which a file is taken for a decompression bomb.
DEFAULT_MAX_RATIO = 2000
#: Suffixes read whole by cv2 (small images, as mmseg/mmdet read them).
CV2_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.jp2', '.pbm', '.pgm', '.ppm')
#: Suffixes of whole-slide formats that OpenSlide reads (and tifffile does not decode).
SLIDE_SUFFIXES = ('.svs', '.ndpi', '.mrxs', '.vms', '.vmu', '.scn', '.bif', '.svslide')
#: GeoTIFF tags: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory,
#: GeoDoubleParams, GeoAsciiParams; GDAL's metadata and nodata.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)


class ImageFileError(ValueError):
    """An image file that cannot be read as asked: names the file (and the region)."""


@dataclass
class GeoReference:
    """A GeoTIFF's georeferencing: its raw tags ``(code, dtype, count, value)`` (written
    back unchanged, with the pixel scale adapted to the level) and the affine transform
    from pixel ``(col, row)`` to map ``(x, y)``: ``x = a*col + b*row + c``,
    ``y = d*col + e*row + f``."""

    tags: list[tuple[int, int, int, Any]]
    transform: Optional[tuple[float, float, float, float, float, float]] = None
    crs: Optional[str] = None

    def at_level(self, downsample: float) -> GeoReference:
        """The reference of the same map read ``downsample`` times coarser."""
        if downsample == 1:
            return self
        tags = []
        for code, dtype, count, value in self.tags:
            if code == 33550:  # ModelPixelScale (sx, sy, sz)
                value = (value[0] * downsample, value[1] * downsample) + tuple(value[2:])
            elif code == 34264:  # ModelTransformation: the 4x4 matrix's pixel columns
                value = tuple(v * downsample if i % 4 in (0, 1) and i < 8 else v
                              for i, v in enumerate(value))
            tags.append((code, dtype, count, value))
        t = self.transform
        scaled = None if t is None else (t[0] * downsample, t[1] * downsample, t[2],
                                         t[3] * downsample, t[4] * downsample, t[5])
        return GeoReference(tags, scaled, self.crs)

    def to_map(self, col: float, row: float) -> tuple[float, float]:
        a, b, c, d, e, f = self.transform
        return a * col + b * row + c, d * col + e * row + f


@dataclass
class RegionReader:
    """One level of an image file, read by rectangles (see the module docstring).

    ``levels``: ``(height, width)`` of every pyramid level, largest first; ``level``
    the one read; ``mpp``: microns per pixel at that level where the file says;
    ``geo``: the georeferencing of a GeoTIFF.
    """

    path: str
    levels: list[tuple[int, int]]
    level: int = 0
    mpp: Optional[float] = None
    geo: Optional[GeoReference] = None
    decoded_pixels: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def height(self) -> int:
        return self.levels[self.level][0]

    @property
    def width(self) -> int:
        return self.levels[self.level][1]

    @property
    def downsample(self) -> float:
        """Level-0 pixels per pixel of the level read."""
        return self.levels[0][1] / self.width

    def read(self, y0: int, y1: int, x0: int = 0, x1: Optional[int] = None) -> np.ndarray:
        """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of the level, ``(y1-y0, x1-x0, 3)``
        uint8 BGR."""
        x1 = self.width if x1 is None else x1
        if not (0 <= y0 <= y1 <= self.height and 0 <= x0 <= x1 <= self.width):
            raise ImageFileError(f'{self.path}: region rows {y0}:{y1}, cols {x0}:{x1} is outside '
                                 f'the {self.height} x {self.width} image (level {self.level})')
        return self._read(y0, y1, x0, x1)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def _select_level(self, level: int) -> None:
        """Read ``level`` from now on; a level the file does not have closes the reader
        and raises :class:`ImageFileError`."""
        if not 0 <= level < len(self.levels):
            self.close()
            raise ImageFileError(f'{self.path}: level {level} does not exist (the file has '
                                 f'{len(self.levels)} level(s): {self.levels})')
        self.level = level

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A small BGR view of the whole image and its scale (level pixels per thumbnail
        pixel), from the coarsest level that is at least ``max_side / 4`` on its long side."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def describe(self) -> str:
        mpp = f', {self.mpp:.3f} um/px' if self.mpp else ''
        geo = ', georeferenced' if self.geo else ''
        return (f'{osp.basename(self.path)}: level {self.level} of {len(self.levels)}, '
                f'{self.height} x {self.width} px{mpp}{geo} ({type(self).__name__})')


def _to_bgr(a: np.ndarray, path: str) -> np.ndarray:
    """``(h, w[, s])`` samples of any channel count -> ``(h, w, 3)`` uint8 BGR."""
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageFileError(f'{path}: {a.dtype} samples are not supported (uint8 or uint16 '
                             'images; convert other types first)')
    if a.ndim == 2:
        a = a[..., None]
    s = a.shape[2]
    if s == 1:
        return np.repeat(a, 3, axis=2)
    if s in (3, 4):
        return np.ascontiguousarray(a[..., 2::-1])  # RGB(A) -> BGR
    if s == 2:  # grey + alpha
        return np.repeat(a[..., :1], 3, axis=2)
    raise ImageFileError(f'{path}: {s} samples per pixel; expected 1, 3 or 4')


def _check_claim(path: str, height: int, width: int, nbytes: int, max_pixels: int,
                 max_ratio: float) -> None:
    pixels = height * width
    if pixels > max_pixels:
        raise ImageFileError(f'{path}: the header claims {height} x {width} = {pixels} pixels, '
                             f'more than the limit of {max_pixels} (raise --max-pixels if the '
                             'file is genuine)')
    size = max(1, osp.getsize(path))
    if nbytes / size > max_ratio:
        raise ImageFileError(f'{path}: the header claims {nbytes / 2**20:.0f} MiB of pixels in a '
                             f'{size}-byte file ({nbytes / size:.0f} bytes per byte): refused '
                             'as a possible decompression bomb')


class ArrayReader(RegionReader):
    """An image already in memory, ``(H, W, 3) uint8`` BGR (small files read by cv2;
    tests). ``decoded_pixels`` counts the pixels delivered."""

    def __init__(self, array: np.ndarray, path: str = '<array>') -> None:
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ImageFileError(f'{path}: expected an (H, W, 3) uint8 array, got '
                                 f'{array.shape} {array.dtype}')
        super().__init__(path, [array.shape[:2]])
        self.array = array

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        self.decoded_pixels += (y1 - y0) * (x1 - x0)
        return self.array[y0:y1, x0:x1]

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        step = max(1, -(-max(self.height, self.width) // max_side))
        return self.array[::step, ::step], float(step)

    @classmethod
    def from_file(cls, path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_ratio: float = DEFAULT_MAX_RATIO) -> ArrayReader:
        import cv2
        size = _png_size(path)
        if size is not None:
            _check_claim(path, size[0], size[1], size[0] * size[1] * 3, max_pixels, max_ratio)
        a = cv2.imread(path, cv2.IMREAD_COLOR)
        if a is None:
            raise ImageFileError(f'{path}: not an image that cv2 can read')
        return cls(a, path)


def _png_size(path: str) -> Optional[tuple[int, int]]:
    """``(height, width)`` from a PNG's header, before cv2 decodes anything."""
    with open(path, 'rb') as f:
        head = f.read(24)
    if head[:8] != b'\x89PNG\r\n\x1a\n' or head[12:16] != b'IHDR':
        return None
    return int.from_bytes(head[20:24], 'big'), int.from_bytes(head[16:20], 'big')


class TiffReader(RegionReader):
    """A tiled or striped TIFF/BigTIFF/OME-TIFF/GeoTIFF page read through tifffile,
    one tile or strip at a time. Pyramid levels: tifffile's series levels (OME and
    SubIFD pyramids, successive reduced pages)."""

    def __init__(self, path: str, level: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_ratio: float = DEFAULT_MAX_RATIO) -> None:
        import tifffile
        try:
            self.tif = tifffile.TiffFile(path)
            series = self.tif.series[0]
            pages = [lv.keyframe for lv in series.levels]
        except Exception as e:  # tifffile raises many types on a damaged header
            raise ImageFileError(f'{path}: not a readable TIFF ({type(e).__name__}: {e})') from e
        super().__init__(path, [self._page_dims(p, path) for p in pages])
        self._select_level(level)
        self.page = pages[level]
        p = self.page
        h, w = self.levels[level]
        (h0, w0), = self.levels[:1]
        _check_claim(path, h0, w0, h0 * w0 * p.samplesperpixel * p.dtype.itemsize, max_pixels,
                     max_ratio)
        if p.planarconfig != 1 and p.samplesperpixel > 1:
            raise ImageFileError(f'{path}: planar (separate-plane) TIFFs are not supported')
        if p.is_tiled:
            self.seg_h, self.seg_w = p.tilelength, p.tilewidth
        else:
            self.seg_h, self.seg_w = p.rowsperstrip or h, w
        if self.seg_h * self.seg_w * p.samplesperpixel * p.dtype.itemsize > 2**30:
            raise ImageFileError(f'{path}: a {self.seg_h} x {self.seg_w} tile or strip is more '
                                 'than 1 GiB decoded: refused')
        self.across = -(-w // self.seg_w)
        self._row_cache: dict[int, np.ndarray] = {}
        size = osp.getsize(path)
        ends = np.asarray(p.dataoffsets, dtype=np.int64) + np.asarray(p.databytecounts,
                                                                       dtype=np.int64)
        expected = self.across * -(-h // self.seg_h)
        if len(ends) < expected:
            raise ImageFileError(f'{path}: level {level} lists {len(ends)} tiles/strips, '
                                 f'{expected} are needed for {h} x {w}')
        bad = np.nonzero(ends > size)[0]
        if len(bad):
            i = int(bad[0])
            raise ImageFileError(f'{path}: truncated: {len(bad)} tile(s)/strip(s) of level '
                                 f'{level} end past the file ({size} bytes), the first at '
                                 f'{self._segment_region(i)}')
        self.mpp = self._mpp(pages[0], path)
        if self.mpp:
            self.mpp *= self.downsample
        self.geo = self._geo(pages[0])
        if self.geo is not None:
            self.geo = self.geo.at_level(self.downsample)

    @staticmethod
    def _page_dims(page: Any, path: str) -> tuple[int, int]:
        shape = page.shape
        if page.samplesperpixel > 1 and page.planarconfig == 1:
            return int(shape[-3]), int(shape[-2])
        if page.samplesperpixel > 1:
            raise ImageFileError(f'{path}: planar (separate-plane) TIFFs are not supported')
        return int(shape[-2]), int(shape[-1])

    def _segment_region(self, i: int) -> str:
        ty, tx = divmod(i, self.across)
        return (f'rows {ty * self.seg_h}:{(ty + 1) * self.seg_h}, '
                f'cols {tx * self.seg_w}:{(tx + 1) * self.seg_w}')

    @staticmethod
    def _mpp(page: Any, path: str) -> Optional[float]:
        desc = page.description or ''
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', desc) or re.search(
            r'MPP\s*=\s*([0-9.eE+-]+)', desc)
        if m:
            return float(m.group(1))
        tags = page.tags
        if 'XResolution' in tags and 'ResolutionUnit' in tags:
            num, den = tags['XResolution'].value
            unit = int(tags['ResolutionUnit'].value)
            if num and unit == 3:  # pixels per centimetre
                return 1e4 * den / num
        return None

    @staticmethod
    def _geo(page: Any) -> Optional[GeoReference]:
        tags = [(t.code, t.dtype, t.count, t.value) for t in page.tags.values()
                if t.code in GEO_TAGS]
        if not any(code == 34735 for code, *_ in tags):
            return None
        by_code = {code: value for code, _, _, value in tags}
        transform = None
        if 34264 in by_code:
            m = by_code[34264]
            transform = (m[0], m[1], m[3], m[4], m[5], m[7])
        elif 33550 in by_code and 33922 in by_code:
            sx, sy = by_code[33550][:2]
            i, j, _, x, y, _ = by_code[33922][:6]
            transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
        crs = None
        keys = by_code[34735]
        for k in range(4, len(keys) - 3, 4):  # ProjectedCSTypeGeoKey, GeographicTypeGeoKey
            if keys[k] in (3072, 2048) and keys[k + 1] == 0:
                crs = f'EPSG:{keys[k + 3]}'
                break
        return GeoReference([(c, _tag_dtype(d), n, v) for c, d, n, v in tags], transform, crs)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if x0 == 0 and x1 == self.width:  # full-width bands: rows of tiles, each decoded once
            return self._read_rows(y0, y1)
        return self._read_tiles(y0, y1, x0, x1)

    def _read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Full-width rows through a cache of the last two decoded rows of tiles: the
        bands a backbone's stem reads overlap rows of tiles, which are decoded once."""
        out = np.empty((y1 - y0, self.width, 3), np.uint8)
        for ty in range(y0 // self.seg_h, -(-y1 // self.seg_h)):
            strip = self._row_cache.get(ty)
            if strip is None:
                sy = ty * self.seg_h
                strip = self._read_tiles(sy, min(self.height, sy + self.seg_h), 0, self.width)
                self._row_cache[ty] = strip
                while len(self._row_cache) > 2:
                    self._row_cache.pop(min(self._row_cache))
            sy = ty * self.seg_h
            a0, a1 = max(y0, sy), min(y1, sy + strip.shape[0])
            out[a0 - y0:a1 - y0] = strip[a0 - sy:a1 - sy]
        return out

    def _read_tiles(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = None
        h, w = self.height, self.width
        for ty in range(y0 // self.seg_h, -(-y1 // self.seg_h)):
            for tx in range(x0 // self.seg_w, -(-x1 // self.seg_w)):
                i = ty * self.across + tx
                seg = self._segment(i, h, w)
                sy, sx = ty * self.seg_h, tx * self.seg_w
                a0, a1 = max(y0, sy), min(y1, sy + seg.shape[0])
                b0, b1 = max(x0, sx), min(x1, sx + seg.shape[1])
                if out is None:
                    out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
                out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = seg[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
        return out if out is not None else np.zeros((y1 - y0, x1 - x0, 3), np.uint8)

    def _segment(self, i: int, h: int, w: int) -> np.ndarray:
        p = self.page
        with self._lock:
            fh = self.tif.filehandle
            fh.seek(int(p.dataoffsets[i]))
            data = fh.read(int(p.databytecounts[i]))
        try:
            seg, _, _ = p.decode(data, i, jpegtables=p.jpegtables)
            if seg is None:
                raise ValueError('empty tile')
            seg = _to_bgr(np.asarray(seg).reshape(seg.shape[-3:]), self.path)
        except ImageFileError:
            raise
        except Exception as e:
            raise ImageFileError(f'{self.path}: cannot decode the tile/strip at '
                                 f'{self._segment_region(i)} of level {self.level} '
                                 f'({type(e).__name__}: {e})') from e
        self.decoded_pixels += seg.shape[0] * seg.shape[1]
        return seg

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        # The coarsest level with a long side of at least max_side / 4 (a whole-slide
        # pyramid has one); else this level, decoded band by band and shrunk.
        pick = self.level
        for i in range(len(self.levels) - 1, self.level, -1):
            if max(self.levels[i]) >= max_side // 4:
                pick = i
                break
        reader = self if pick == self.level else TiffReader(self.path, pick)
        step = max(1, -(-max(reader.height, reader.width) // max_side))
        rows = []
        band = max(step, 1024 // step * step)
        for y in range(0, reader.height, band):
            part = reader.read(y, min(reader.height, y + band))[::step, ::step]
            rows.append(part)
        if reader is not self:
            self.decoded_pixels += reader.decoded_pixels
            reader.close()
        thumb = np.concatenate(rows)
        return thumb, self.height / thumb.shape[0]

    def close(self) -> None:
        self.tif.close()


def _tag_dtype(dtype: Any) -> int:
    return int(getattr(dtype, 'value', dtype))


class OpenSlideReader(RegionReader):
    """A whole-slide file (SVS, NDPI, MRXS, ..., and generic tiled TIFF) through
    OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel)."""

    def __init__(self, path: str, level: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_ratio: float = DEFAULT_MAX_RATIO) -> None:
        try:
            import openslide
        except ImportError as e:
            raise ImageFileError(f'{path}: whole-slide files need openslide-python and '
                                 "openslide-bin (pip install -e '.[large-images]')") from e
        try:
            self.slide = openslide.OpenSlide(path)
        except Exception as e:
            raise ImageFileError(f'{path}: OpenSlide cannot open it ({type(e).__name__}: '
                                 f'{e})') from e
        dims = [(h, w) for w, h in self.slide.level_dimensions]
        super().__init__(path, dims)
        self._select_level(level)
        _check_claim(path, *dims[0], dims[0][0] * dims[0][1] * 3, max_pixels, max_ratio)
        mpp = self.slide.properties.get('openslide.mpp-x')
        self.mpp = float(mpp) * self.slide.level_downsamples[level] if mpp else None

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ds = self.slide.level_downsamples[self.level]
        try:
            region = self.slide.read_region((int(x0 * ds), int(y0 * ds)), self.level,
                                            (x1 - x0, y1 - y0))
        except Exception as e:
            raise ImageFileError(f'{self.path}: cannot read rows {y0}:{y1}, cols {x0}:{x1} of '
                                 f'level {self.level} ({type(e).__name__}: {e})') from e
        a = np.asarray(region)
        self.decoded_pixels += (y1 - y0) * (x1 - x0)
        # Transparent (unscanned) areas are white glass, as viewers show them.
        rgb = np.where(a[..., 3:] == 0, 255, a[..., :3]).astype(np.uint8)
        return np.ascontiguousarray(rgb[..., ::-1])

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        level = self.slide.get_best_level_for_downsample(
            max(1.0, max(self.slide.dimensions) / max_side))
        w, h = self.slide.level_dimensions[level]
        region = np.asarray(self.slide.read_region((0, 0), level, (w, h)))
        self.decoded_pixels += w * h
        rgb = np.where(region[..., 3:] == 0, 255, region[..., :3]).astype(np.uint8)
        return np.ascontiguousarray(rgb[..., ::-1]), self.height / h

    def close(self) -> None:
        self.slide.close()


class _ReaderView(RegionReader):
    """A view of another reader, ``inner``: it counts the pixels ``inner`` decodes and
    closes it."""

    inner: RegionReader

    @property
    def decoded_pixels(self) -> int:  # type: ignore[override]
        return self.inner.decoded_pixels

    @decoded_pixels.setter
    def decoded_pixels(self, value: int) -> None:
        pass

    def close(self) -> None:
        self.inner.close()


class CompactedReader(_ReaderView):
    """The rows and columns of ``reader`` that ``keep_rows``/``keep_cols`` (ascending
    pixel indices) select, read as one smaller image: whole-slide background removed."""

    def __init__(self, reader: RegionReader, keep_rows: np.ndarray, keep_cols: np.ndarray
                 ) -> None:
        super().__init__(reader.path, [(len(keep_rows), len(keep_cols))])
        self.inner, self.rows, self.cols = reader, keep_rows, keep_cols
        self.mpp = reader.mpp

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        rows, cols = self.rows[y0:y1], self.cols[x0:x1]
        if not len(rows) or not len(cols):
            return out
        for (ra, rb, ca, cb), (sy0, sy1, sx0, sx1) in kept_rectangles(rows, cols):
            out[ra:rb, ca:cb] = self.inner.read(sy0, sy1, sx0, sx1)
        return out



class DownsampledReader(_ReaderView):
    """``reader`` read ``factor`` times coarser: each pixel the mean of a ``factor x
    factor`` block of the level read (the last row and column of blocks repeat the
    image's edge). For a coarse pass over a file at any level, pyramid or not."""

    def __init__(self, reader: RegionReader, factor: int) -> None:
        if factor < 1 or int(factor) != factor:
            raise ValueError(f'a downsampling factor is a positive integer, got {factor}')
        factor = int(factor)
        super().__init__(reader.path, [(-(-reader.height // factor),
                                        -(-reader.width // factor))])
        self.inner, self.factor = reader, factor
        self.mpp = reader.mpp * factor if reader.mpp else None
        self.geo = reader.geo.at_level(factor) if reader.geo is not None else None

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        f = self.factor
        if y0 == y1 or x0 == x1:
            return np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        a = self.inner.read(y0 * f, min(self.inner.height, y1 * f),
                            x0 * f, min(self.inner.width, x1 * f))
        a = np.pad(a, ((0, (y1 - y0) * f - a.shape[0]), (0, (x1 - x0) * f - a.shape[1]),
                       (0, 0)), mode='edge')
        blocks = a.reshape(y1 - y0, f, x1 - x0, f, 3).astype(np.float32).mean((1, 3))
        return np.rint(blocks).astype(np.uint8)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        thumb, scale = self.inner.thumbnail(max_side)
        return thumb, scale / self.factor



def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` positions of the runs of consecutive values in ``idx``."""
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    edges = [0, *breaks.tolist(), len(idx)]
    return list(zip(edges[:-1], edges[1:]))


def kept_rectangles(rows: np.ndarray, cols: np.ndarray
                    ) -> Iterator[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """For kept source ``rows`` and ``cols`` (ascending pixel indices): each rectangle of
    consecutive ones, as ``(compact y0, y1, x0, x1)`` and ``(source y0, y1, x0, x1)``."""
    for ra, rb in _runs(rows):
        for ca, cb in _runs(cols):
            yield (ra, rb, ca, cb), (int(rows[ra]), int(rows[rb - 1]) + 1, int(cols[ca]),
                                     int(cols[cb - 1]) + 1)


def _is_tiff(path: str) -> bool:
    with open(path, 'rb') as f:
        head = f.read(4)
    return head in (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')


def open_image(path: str, level: Optional[int] = None, mpp: Optional[float] = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_ratio: float = DEFAULT_MAX_RATIO,
               reader: str = 'auto') -> RegionReader:
    """A reader for ``path`` at pyramid ``level`` (default 0), or at the level whose
    microns per pixel is closest to ``mpp`` (the file must say its resolution).

    ``reader``: ``'auto'`` (OpenSlide for whole-slide formats, tifffile for TIFFs,
    cv2 for small images), or ``'tiff'``, ``'openslide'``, ``'cv2'``.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    if os.path.getsize(path) == 0:
        raise ImageFileError(f'{path}: empty file')
    if level is not None and mpp is not None:
        raise ValueError('give --level or --mpp, not both')
    suffix = osp.splitext(path)[1].lower()
    if reader == 'auto':
        if suffix in SLIDE_SUFFIXES:
            reader = 'openslide'
        elif _is_tiff(path):
            reader = 'tiff'
        elif suffix in CV2_SUFFIXES:
            reader = 'cv2'
        else:
            raise ImageFileError(f'{path}: not an image this tool reads (TIFF/BigTIFF/OME-TIFF/'
                                 f'GeoTIFF, {"/".join(SLIDE_SUFFIXES)} through OpenSlide, or '
                                 f'{"/".join(CV2_SUFFIXES)})')
    if reader == 'cv2':
        if level or mpp:
            raise ImageFileError(f'{path}: a single-level image has no level {level or mpp}')
        return ArrayReader.from_file(path, max_pixels, max_ratio)
    cls = {'tiff': TiffReader, 'openslide': OpenSlideReader}.get(reader)
    if cls is None:
        raise ValueError(f"unknown reader {reader!r}: 'auto', 'tiff', 'openslide' or 'cv2'")
    r = cls(path, 0, max_pixels, max_ratio)
    if mpp is not None:
        if not r.mpp:
            r.close()
            raise ImageFileError(f'{path}: the file does not state its microns per pixel; '
                                 'choose a --level instead of --mpp')
        base = r.mpp
        level = int(np.argmin([abs(base * r.levels[0][1] / w - mpp) for _, w in r.levels]))
    if level:
        r.close()
        r = cls(path, level, max_pixels, max_ratio)
    return r
