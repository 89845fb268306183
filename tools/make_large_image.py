#!/usr/bin/env python
"""Write a large synthetic test image as a tiled (pyramidal, Geo) TIFF, band by band.

    python tools/make_large_image.py big.tif --size 16384 16384
    python tools/make_large_image.py slide.tif --size 8192 12288 --levels 3 --mpp 0.25
    python tools/make_large_image.py scene.tif --size 4096 4096 --geo 32633 500000 4600000 0.5

The content is smooth blobs of colour on a light background (so it compresses like a
real slide, not like noise), plus fine noise; ``--png`` also writes the same pixels as
a PNG (cv2 reads it whole: the in-memory reference). Memory stays one band of rows.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def band(y0: int, y1: int, width: int, seed: int) -> np.ndarray:
    """Rows ``[y0, y1)``, RGB uint8: the same pixels whatever the band sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (24, 2))
    colours = rng.integers(60, 200, (24, 3))
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    out = np.full((y1 - y0, width, 3), 235, np.float32)
    scale = float(width)
    for (cy, cx), colour in zip(centres, colours):
        d = ((yy / scale - cy) ** 2 + (xx / scale - cx) ** 2) < 0.004
        out[d] = colour
    # Noise from a hash of (row, column, channel): the same whatever the band.
    yi = np.arange(y0, y1, dtype=np.int64)[:, None, None]
    xi = np.arange(width, dtype=np.int64)[None, :, None]
    ci = np.arange(3, dtype=np.int64)[None, None, :]
    noise = (((yi * 73856093) ^ (xi * 19349663) ^ (ci * 83492791 + seed)) >> 7) & 15
    return (out + noise).clip(0, 255).astype(np.uint8)


def geo_tags(epsg: int, x: float, y: float, size: float) -> list[tuple]:
    """GeoTIFF tags of a north-up map: pixel (0, 0)'s corner at (x, y), ``size`` units a
    pixel, in the projected CRS ``EPSG:epsg``."""
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]
    return [(33550, 'd', 3, (size, size, 0.0), True),
            (33922, 'd', 6, (0.0, 0.0, 0.0, x, y, 0.0), True),
            (34735, 'H', len(keys), tuple(keys), True)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('out')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), default=(4096, 4096))
    p.add_argument('--levels', type=int, default=1, help='pyramid levels (halving)')
    p.add_argument('--tile', type=int, default=256)
    p.add_argument('--mpp', type=float, help='microns per pixel (resolution tags)')
    p.add_argument('--geo', type=float, nargs=4, metavar=('EPSG', 'X', 'Y', 'PIXEL'),
                   help='georeference as a GeoTIFF')
    p.add_argument('--compression', default='zlib')
    p.add_argument('--png', help='also write the same pixels as this PNG')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    import tifffile

    h, w = args.size
    t = args.tile

    def tiles(hh: int, ww: int, step: int):
        for y in range(0, hh, t):
            rows = band(y * step, min(h, (y + t) * step), w, args.seed)[::step, ::step]
            for x in range(0, ww, t):
                tile = np.zeros((t, t, 3), np.uint8)
                part = rows[:, x:x + t]
                tile[:part.shape[0], :part.shape[1]] = part
                yield tile

    extratags = geo_tags(int(args.geo[0]), *args.geo[1:]) if args.geo else []
    res = dict(resolution=(1e4 / args.mpp, 1e4 / args.mpp), resolutionunit='CENTIMETER') \
        if args.mpp else {}
    with tifffile.TiffWriter(args.out, bigtiff=h * w * 3 > 2**31) as tw:
        for level in range(args.levels):
            step = 2**level
            hh, ww = -(-h // step), -(-w // step)
            if level and args.mpp:
                res = dict(resolution=(1e4 / (args.mpp * step), 1e4 / (args.mpp * step)),
                           resolutionunit='CENTIMETER')
            tw.write(tiles(hh, ww, step), shape=(hh, ww, 3), dtype=np.uint8, tile=(t, t),
                     photometric='rgb', compression=args.compression,
                     subfiletype=1 if level else 0, extratags=extratags if not level else [],
                     description=f'MPP = {args.mpp * step}' if args.mpp else None,
                     maxworkers=1, **res)
    print(f'wrote {args.out}: {h} x {w}, {args.levels} level(s), tiles {t}')
    if args.png:
        import cv2
        img = np.concatenate([band(y, min(h, y + 1024), w, args.seed) for y in range(0, h, 1024)])
        if not cv2.imwrite(args.png, img[..., ::-1]):
            raise OSError(f'could not write {args.png}')
        print(f'wrote {args.png}')


if __name__ == '__main__':
    main()
