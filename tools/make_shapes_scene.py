#!/usr/bin/env python
"""A large scene of the tiny dataset's shapes, with its ground truth: the test bed of
whole-image detection by tiles.

    python tools/make_shapes_scene.py data/scene/scene.tif --size 4096 4096
    python tools/make_shapes_scene.py data/scene/big.tif --size 16384 16384 --tile 2048

Writes a tiled RGB (Big)TIFF and ``<name>.json``, its COCO ground truth (one image;
the categories of ``make_tiny_dataset.py coco``: discs are ``person``, rectangles
``bicycle``, triangles ``car``; RLE masks), never holding the image whole (bands of
256 rows). The shapes are those a detector trained on ``make_tiny_dataset.py coco``
knows (radius 26-45 px on the same textured background), laid on a jittered grid so
that none overlap:

* most of those in the cells along a seam of ``--tile`` (the tiles of
  ``tools/infer_large.py --tile``) are centred within half a radius of it, so they
  cross it;
* ``--large`` shapes of radius 300-400 px, larger than the default margin (256 px),
  which no tile sees whole.

Each annotation says where it lies: ``seam`` (its box crosses a seam of ``--tile``)
and ``large``. The same seed gives the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from make_tiny_dataset import (  # noqa: E402
    COCO_CATEGORIES,
    SHAPE_COLORS,
    SHAPES,
    _polygon,
    coco_category_names,
)

BAND = 256


def _layout(h: int, w: int, tile: int, large: int, rng: np.random.Generator
            ) -> list[dict]:
    """Shapes on a jittered grid of 128 px cells (none overlap), a third of them moved
    onto a seam; ``large`` big shapes in cells of their own."""
    shapes = []
    big_cells = []
    for _ in range(large):  # big shapes first, on a coarse grid of 1024 px cells
        for _try in range(100):
            cy = rng.uniform(420, h - 420)
            cx = rng.uniform(420, w - 420)
            if all(abs(cy - y) > 900 or abs(cx - x) > 900 for y, x in big_cells):
                big_cells.append((cy, cx))
                r = rng.uniform(300, 400)
                shapes.append(dict(shape=SHAPES[rng.integers(3)], cx=cx, cy=cy, r=r, large=True))
                break
    cell = 128
    for gy in range(h // cell):
        for gx in range(w // cell):
            if rng.random() < 0.3:
                continue
            cy, cx = (gy + 0.5) * cell, (gx + 0.5) * cell
            r = rng.uniform(26, 45)
            if rng.random() < 0.7:  # near a seam: onto it, across it
                sy, sx = round(cy / tile) * tile, round(cx / tile) * tile
                if 0 < sy < h and abs(sy - cy) < cell:
                    cy = sy + rng.uniform(-0.5, 0.5) * r
                elif 0 < sx < w and abs(sx - cx) < cell:
                    cx = sx + rng.uniform(-0.5, 0.5) * r
            cy += rng.uniform(-0.1, 0.1) * cell
            cx += rng.uniform(-0.1, 0.1) * cell
            if not (r < cy < h - r and r < cx < w - r):
                continue
            if any(abs(cy - y) < 400 + r + 4 and abs(cx - x) < 400 + r + 4 for y, x in big_cells):
                continue
            shapes.append(dict(shape=SHAPES[rng.integers(3)], cx=cx, cy=cy, r=r, large=False))
    # Keep only shapes whose discs do not touch (moving onto seams can bring two close).
    kept: list[dict] = []
    grid: dict = {}
    for s in shapes:
        key = (int(s['cy'] // 256), int(s['cx'] // 256))
        near = [t for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2)
                for t in grid.get((key[0] + dy, key[1] + dx), [])]
        if s['large']:
            near = kept
        if all(np.hypot(s['cx'] - t['cx'], s['cy'] - t['cy']) > s['r'] + t['r'] + 4
               for t in near):
            kept.append(s)
            grid.setdefault(key, []).append(s)
    for s in kept:
        s['polygon'] = _polygon(s['shape'], s['cx'], s['cy'], s['r'], rng)
        s['color'] = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255))
                           for c in SHAPE_COLORS[s['shape']])
    return kept


def _band(seed: int, y0: int, y1: int, h: int, w: int, base: np.ndarray, grad: np.ndarray,
          angle: float, period: float) -> np.ndarray:
    """Rows ``[y0, y1)`` of the textured background (the tiny dataset's, scene-wide)."""
    rng = np.random.default_rng([seed, y0])
    yy, xx = np.mgrid[y0:y1, 0:w].astype(np.float32)
    img = base + (yy[..., None] / h) * grad[0] + (xx[..., None] / w) * grad[1]
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img += 12 * stripes[..., None]
    img += rng.normal(0, 8, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_scene(path: str, h: int, w: int, tile: int = 2048, large: int = 4, seed: int = 0
               ) -> dict:
    """Write the scene and its ground truth; returns counts."""
    import tifffile

    from mmlinattn.rasters.objects import LocalMask, image_rle
    rng = np.random.default_rng(seed)
    base = rng.uniform(90, 170, size=3)
    grad = rng.uniform(-40, 40, size=(2, 3))
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
    shapes = _layout(h, w, tile, large, rng)
    by_band: dict[int, list[dict]] = {}
    for s in shapes:
        ys = [p[1] for p in s['polygon']]
        for b in range(max(0, int(min(ys)) // BAND), min(h - 1, int(max(ys))) // BAND + 1):
            by_band.setdefault(b, []).append(s)

    def tiles():
        for b0 in range(0, h, BAND):
            b1 = min(h, b0 + BAND)
            img = Image.fromarray(_band(seed, b0, b1, h, w, base, grad, angle, period))
            draw = ImageDraw.Draw(img)
            for s in by_band.get(b0 // BAND, []):
                draw.polygon([(x, y - b0) for x, y in s['polygon']], fill=s['color'])
            arr = np.asarray(img)
            if b1 - b0 < BAND:
                arr = np.pad(arr, ((0, BAND - (b1 - b0)), (0, 0), (0, 0)))
            for x0 in range(0, w, BAND):
                t = arr[:, x0:x0 + BAND]
                if t.shape[1] < BAND:
                    t = np.pad(t, ((0, 0), (0, BAND - t.shape[1]), (0, 0)))
                yield t

    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + '.partial'
    tifffile.imwrite(tmp, tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(BAND, BAND),
                     photometric='rgb', compression='zlib', bigtiff=h * w * 3 > 2**31)
    os.replace(tmp, path)

    cat_of = {shape: cid for cid, _, shape in COCO_CATEGORIES}
    annotations = []
    for s in shapes:
        xs = [p[0] for p in s['polygon']]
        ys = [p[1] for p in s['polygon']]
        x0, y0 = max(0, int(np.floor(min(xs)))), max(0, int(np.floor(min(ys))))
        x1, y1 = min(w, int(np.ceil(max(xs))) + 1), min(h, int(np.ceil(max(ys))) + 1)
        local = Image.new('L', (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(local).polygon([(x - x0, y - y0) for x, y in s['polygon']], fill=1)
        bits = np.asarray(local).astype(bool)
        py, px = np.nonzero(bits)
        if not len(px):
            continue
        bx0, by0 = x0 + int(px.min()), y0 + int(py.min())
        bbox = [float(bx0), float(by0), float(px.max() - px.min() + 1),
                float(py.max() - py.min() + 1)]
        seam = (bx0 // tile != (bx0 + bbox[2] - 1) // tile
                or by0 // tile != (by0 + bbox[3] - 1) // tile)
        annotations.append(dict(
            id=len(annotations) + 1, image_id=1, category_id=cat_of[s['shape']], bbox=bbox,
            area=float(bits.sum()), iscrowd=0,
            segmentation=image_rle(LocalMask(y0, x0, bits), h, w),
            seam=bool(seam), large=bool(s['large'])))
    gt = dict(info=dict(description='mmlinattn shapes scene', tile=tile, seed=seed),
              licenses=[], images=[dict(id=1, file_name=osp.basename(path), height=h, width=w)],
              annotations=annotations,
              categories=[dict(id=cid, name=name, supercategory='shape')
                          for cid, name in enumerate(coco_category_names(), start=1)])
    gt_path = osp.splitext(path)[0] + '.json'
    with open(gt_path + '.partial', 'w') as f:
        json.dump(gt, f)
    os.replace(gt_path + '.partial', gt_path)
    return dict(objects=len(annotations), seam=sum(a['seam'] for a in annotations),
                large=sum(a['large'] for a in annotations), gt=gt_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out', help='the scene, a tiled .tif (its ground truth: the same name, .json)')
    p.add_argument('--size', type=int, nargs=2, default=(4096, 4096), metavar=('H', 'W'))
    p.add_argument('--tile', type=int, default=2048,
                   help='the seams to cross: multiples of this (infer_large.py --tile)')
    p.add_argument('--large', type=int, default=4, help='shapes larger than a tile margin')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    counts = make_scene(args.out, *args.size, tile=args.tile, large=args.large, seed=args.seed)
    print(f'{args.out}: {args.size[0]} x {args.size[1]}, {counts["objects"]} shapes '
          f'({counts["seam"]} across seams of {args.tile} px, {counts["large"]} large); '
          f'ground truth {counts["gt"]}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
