#!/usr/bin/env python
"""Write small, deterministic synthetic datasets in the real COCO, ADE20K and Cityscapes layouts.

    python tools/make_tiny_dataset.py coco data/tiny_coco
    python tools/make_tiny_dataset.py ade20k data/tiny_ade
    python tools/make_tiny_dataset.py cityscapes data/tiny_cityscapes
    python tools/make_tiny_dataset.py all data/tiny          # the three, in sub-folders

Images are coloured shapes (discs, rectangles, triangles; one class each) on
textured backgrounds. The same seed gives byte-identical files. Every shipped
config runs on them unchanged by pointing its ``data_root`` at the folder:

* COCO: ``train2017/``, ``val2017/`` JPEGs and ``annotations/instances_{train,val}2017.json``
  (polygon masks, or RLE with ``--mask-format rle``); the classes are COCO's
  ``person`` (discs), ``bicycle`` (rectangles) and ``car`` (triangles).
* ADE20K: ``images/{training,validation}/ADE_*.jpg`` and
  ``annotations/{training,validation}/ADE_*.png`` (0 = ignore; background 1,
  shapes 2/3/4, i.e. classes 0-3 after mmseg's ``reduce_zero_label``).
* Cityscapes: ``leftImg8bit/{train,val}/tinycity/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/tinycity/*_gtFine_labelTrainIds.png`` (road 0 background;
  shapes person 11, car 13, traffic sign 7).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('disc', 'rectangle', 'triangle')
# Distinct base colours per shape, jittered per instance.
SHAPE_COLORS = {'disc': (220, 60, 50), 'rectangle': (40, 170, 60), 'triangle': (50, 80, 220)}


@dataclass
class Instance:
    shape: str
    polygon: list[tuple[float, float]]  # (x, y) vertices, image coordinates


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background: a smooth colour gradient, stripes and pixel noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(90, 170, size=3)
    grad = rng.uniform(-40, 40, size=(2, 3))
    img = base + (yy[..., None] / h) * grad[0] + (xx[..., None] / w) * grad[1]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img += 12 * stripes[..., None]
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator
             ) -> list[tuple[float, float]]:
    if shape == 'disc':
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t]
    if shape == 'rectangle':
        ax, ay = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
        return [(cx - ax, cy - ay), (cx + ax, cy - ay), (cx + ax, cy + ay), (cx - ax, cy + ay)]
    rot = rng.uniform(0, 2 * np.pi)
    return [(cx + r * np.cos(rot + k * 2 * np.pi / 3), cy + r * np.sin(rot + k * 2 * np.pi / 3))
            for k in range(3)]


def make_image(seed: int, h: int, w: int, grid: tuple[int, int] = (2, 3)
               ) -> tuple[np.ndarray, list[Instance]]:
    """One image and its instances. Shapes sit in separate grid cells, so none overlap."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    instances = []
    ch, cw = h / grid[0], w / grid[1]
    for gy in range(grid[0]):
        for gx in range(grid[1]):
            if rng.random() < 0.35:
                continue
            shape = SHAPES[rng.integers(len(SHAPES))]
            r = rng.uniform(0.25, 0.42) * min(ch, cw)
            cx = gx * cw + cw / 2 + rng.uniform(-0.08, 0.08) * cw
            cy = gy * ch + ch / 2 + rng.uniform(-0.08, 0.08) * ch
            poly = _polygon(shape, cx, cy, r, rng)
            color = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255))
                          for c in SHAPE_COLORS[shape])
            draw.polygon(poly, fill=color)
            instances.append(Instance(shape, poly))
    return np.asarray(img), instances


def rasterize(instances: list[Instance], h: int, w: int, values: dict[str, int],
              background: int) -> np.ndarray:
    """Label map: ``values[shape]`` inside each polygon, ``background`` elsewhere."""
    label = Image.new('L', (w, h), background)
    draw = ImageDraw.Draw(label)
    for inst in instances:
        draw.polygon(inst.polygon, fill=values[inst.shape])
    return np.asarray(label)


def _save(array: np.ndarray, path: str) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    options = dict(quality=95) if path.endswith('.jpg') else {}
    Image.fromarray(array).save(path, **options)


# -- COCO -----------------------------------------------------------------------------------
COCO_CATEGORIES = [(1, 'person', 'disc'), (2, 'bicycle', 'rectangle'), (3, 'car', 'triangle')]


def coco_category_names() -> list[str]:
    """All 80 COCO class names, so that mmdet's CocoMetric maps every label of an
    unchanged 80-class model; only the first three are used by the shapes."""
    try:
        from mmdet.datasets import CocoDataset
    except ImportError:  # mmdet absent: a 3-class file (configs then need num_classes=3)
        return [name for _, name, _ in COCO_CATEGORIES]
    names = list(CocoDataset.METAINFO['classes'])
    assert names[:3] == [name for _, name, _ in COCO_CATEGORIES]
    return names


def make_coco(root: str, num_train: int, num_val: int, size: tuple[int, int], seed: int,
              mask_format: str = 'polygon') -> None:
    h, w = size
    cat_of = {shape: cid for cid, _, shape in COCO_CATEGORIES}
    for split, count, offset in (('train2017', num_train, 0), ('val2017', num_val, 10**6)):
        images, annotations = [], []
        for i in range(count):
            img_id = i + 1
            img, instances = make_image(seed + offset + i, h, w)
            name = f'{img_id:012d}.jpg'
            _save(img, osp.join(root, split, name))
            images.append(dict(id=img_id, file_name=name, height=h, width=w))
            for inst in instances:
                mask = rasterize([inst], h, w, {inst.shape: 1}, 0)
                ys, xs = np.nonzero(mask)
                if len(xs) == 0:
                    continue
                x0, y0 = float(xs.min()), float(ys.min())
                bbox = [x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1]
                if mask_format == 'rle':
                    from pycocotools import mask as mask_utils

                    rle = mask_utils.encode(np.asfortranarray(mask))
                    segmentation = dict(size=rle['size'], counts=rle['counts'].decode('ascii'))
                else:
                    segmentation = [[round(c, 2) for xy in inst.polygon for c in xy]]
                annotations.append(dict(id=len(annotations) + 1, image_id=img_id,
                                        category_id=cat_of[inst.shape], bbox=bbox,
                                        area=float(mask.sum()), iscrowd=0,
                                        segmentation=segmentation))
        ann = dict(info=dict(description='mmlinattn tiny synthetic COCO', version='1.0'),
                   licenses=[], images=images, annotations=annotations,
                   categories=[dict(id=cid, name=name, supercategory='shape')
                               for cid, name in enumerate(coco_category_names(), start=1)])
        path = osp.join(root, 'annotations', f'instances_{split}.json')
        os.makedirs(osp.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(ann, f)


# -- ADE20K ---------------------------------------------------------------------------------
def make_ade20k(root: str, num_train: int, num_val: int, size: tuple[int, int], seed: int
                ) -> None:
    h, w = size
    values = {'disc': 2, 'rectangle': 3, 'triangle': 4}
    for split, prefix, count, offset in (('training', 'train', num_train, 0),
                                         ('validation', 'val', num_val, 10**6)):
        for i in range(count):
            img, instances = make_image(seed + offset + i, h, w)
            name = f'ADE_{prefix}_{i + 1:08d}'
            _save(img, osp.join(root, 'images', split, name + '.jpg'))
            _save(rasterize(instances, h, w, values, 1),
                  osp.join(root, 'annotations', split, name + '.png'))


# -- Cityscapes -----------------------------------------------------------------------------
def make_cityscapes(root: str, num_train: int, num_val: int, size: tuple[int, int], seed: int
                    ) -> None:
    h, w = size
    values = {'disc': 11, 'rectangle': 13, 'triangle': 7}
    for split, count, offset in (('train', num_train, 0), ('val', num_val, 10**6)):
        for i in range(count):
            img, instances = make_image(seed + offset + i, h, w, grid=(2, 4))
            stem = f'tinycity_{i:06d}_000019'
            _save(img, osp.join(root, 'leftImg8bit', split, 'tinycity',
                                stem + '_leftImg8bit.png'))
            _save(rasterize(instances, h, w, values, 0),
                  osp.join(root, 'gtFine', split, 'tinycity', stem + '_gtFine_labelTrainIds.png'))


MAKERS = {'coco': make_coco, 'ade20k': make_ade20k, 'cityscapes': make_cityscapes}
DEFAULT_SIZES = {'coco': (240, 320), 'ade20k': (256, 256), 'cityscapes': (256, 512)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('kind', choices=sorted(MAKERS) + ['all'])
    parser.add_argument('out', help='output folder (the data_root)')
    parser.add_argument('--num-train', type=int, default=32)
    parser.add_argument('--num-val', type=int, default=8)
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help='image size (default: 240 320 coco, 256 256 ade20k, '
                        '256 512 cityscapes)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--mask-format', choices=['polygon', 'rle'], default='polygon',
                        help='COCO instance mask encoding')
    args = parser.parse_args(argv)
    kinds = sorted(MAKERS) if args.kind == 'all' else [args.kind]
    for kind in kinds:
        root = osp.join(args.out, kind) if args.kind == 'all' else args.out
        size = tuple(args.size) if args.size else DEFAULT_SIZES[kind]
        extra = dict(mask_format=args.mask_format) if kind == 'coco' else {}
        MAKERS[kind](root, args.num_train, args.num_val, size, args.seed, **extra)
        print(f'{kind}: {args.num_train} train + {args.num_val} val images of {size[0]}x{size[1]}'
              f' in {root}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
