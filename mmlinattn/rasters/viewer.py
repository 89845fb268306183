"""A self-contained deep-zoom page: the image and the prediction as layers.

:func:`write_viewer` writes, into a folder, Deep Zoom (DZI) tile pyramids of the
image (JPEG) and of the coloured prediction (PNG with transparency where nothing
was predicted), a copy of OpenSeadragon (installed by ``tools/setup.sh`` from its
npm package) and ``index.html``: no server and no network are needed, open the
file in a browser. ``index.html#zoom=Z`` opens at zoom ``Z`` (1 = whole image).
Tiles are built level by level, each from the 2 x 2 tiles of the level above, so
the image is read once, band by band.

:func:`write_object_viewer` writes the same page for detected objects: their
outlines and boxes drawn over the image in a canvas, coloured by class, with a score
slider and a class list (``index.html#zoom=Z&score=S``).
"""
from __future__ import annotations

import html
import json
import math
import os
import os.path as osp
import shutil
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .readers import RegionReader

__all__ = ['write_viewer', 'write_object_viewer', 'openseadragon_dir', 'OPENSEADRAGON_VERSION',
           'DZI_TILE']

#: The OpenSeadragon release tools/setup.sh installs (npm package ``openseadragon``).
OPENSEADRAGON_VERSION = '6.1.1'
DZI_TILE = 256


def openseadragon_dir() -> str:
    """Where tools/setup.sh put OpenSeadragon's build (``MMLINATTN_OPENSEADRAGON``
    overrides); raises with the remedy when it is not there."""
    import sys
    folder = os.environ.get('MMLINATTN_OPENSEADRAGON') or osp.join(
        sys.prefix, 'share', 'openseadragon')
    if not osp.isfile(osp.join(folder, 'openseadragon.js')):
        raise FileNotFoundError(
            f'OpenSeadragon is not installed in {folder}: run tools/setup.sh (it fetches the '
            f'npm package openseadragon@{OPENSEADRAGON_VERSION}), or set '
            'MMLINATTN_OPENSEADRAGON to a folder holding openseadragon.js and images/')
    return folder


def _dzi(folder: str, name: str, height: int, width: int, fmt: str,
         read: Callable[[int, int], np.ndarray], shrink: int) -> dict:
    """Tiles ``folder/name_files/L/col_row.fmt`` of a ``height x width`` image whose rows
    ``read(y0, y1)`` gives; returns OpenSeadragon's inline DZI description."""
    import cv2
    top = max(0, math.ceil(math.log2(max(height, width, 1))))
    base = osp.join(folder, f'{name}_files')
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == 'jpg' else []

    def put(level: int, col: int, row: int, tile: np.ndarray) -> None:
        d = osp.join(base, str(level))
        os.makedirs(d, exist_ok=True)
        if not cv2.imwrite(osp.join(d, f'{col}_{row}.{fmt}'), tile, params):
            raise OSError(f'could not write a viewer tile in {d}')

    h, w = height, width
    for y in range(0, h, DZI_TILE):
        band = read(y, min(h, y + DZI_TILE))
        for x in range(0, w, DZI_TILE):
            put(top, x // DZI_TILE, y // DZI_TILE, band[:, x:x + DZI_TILE])
    for level in range(top - 1, -1, -1):
        ph, pw = h, w
        h, w = -(-h // 2), -(-w // 2)
        for row in range(-(-h // DZI_TILE)):
            for col in range(-(-w // DZI_TILE)):
                parts = []
                for dy in (0, 1):
                    line = []
                    for dx in (0, 1):
                        c, r = 2 * col + dx, 2 * row + dy
                        if c * DZI_TILE < pw and r * DZI_TILE < ph:
                            line.append(cv2.imread(osp.join(base, str(level + 1),
                                                            f'{c}_{r}.{fmt}'),
                                                   cv2.IMREAD_UNCHANGED))
                    if line:
                        parts.append(np.concatenate(line, axis=1))
                big = np.concatenate(parts, axis=0)
                size = (max(1, -(-big.shape[1] // 2)), max(1, -(-big.shape[0] // 2)))
                put(level, col, row, cv2.resize(big, size, interpolation=shrink))
    return dict(Image=dict(xmlns='http://schemas.microsoft.com/deepzoom/2008',
                           Url=f'{name}_files/', Format=fmt, Overlap='0',
                           TileSize=str(DZI_TILE), Size=dict(Width=str(width),
                                                             Height=str(height))))


def _copy_openseadragon(folder: str) -> None:
    osd = openseadragon_dir()
    os.makedirs(folder, exist_ok=True)
    target = osp.join(folder, 'openseadragon')
    if osp.isdir(target):
        shutil.rmtree(target)
    shutil.copytree(osd, target)


def write_viewer(folder: str, reader: RegionReader, labels: Any, classes: Sequence[str],
                 palette: Sequence[Sequence[int]], nodata: Optional[int] = None,
                 title: str = 'mmlinattn prediction') -> str:
    """The page (see the module docstring) for ``reader``'s image and ``labels (H, W)``
    (a numpy array or memory map); returns the path of ``index.html``."""
    import cv2
    _copy_openseadragon(folder)
    h, w = labels.shape
    lut = np.zeros((65536, 4), np.uint8)  # BGRA: the palette opaque, nodata transparent
    lut[:len(palette), :3] = np.asarray(palette, np.uint8)[:, ::-1]
    lut[:len(palette), 3] = 255
    if nodata is not None:
        lut[nodata] = 0

    def label_rows(y0: int, y1: int) -> np.ndarray:
        return lut[np.asarray(labels[y0:y1]).astype(np.int64)]

    image = _dzi(folder, 'image', h, w, 'jpg', reader.read, cv2.INTER_AREA)
    overlay = _dzi(folder, 'labels', h, w, 'png', label_rows, cv2.INTER_NEAREST)
    legend = ''.join(
        f'<li><span style="background:rgb({c[0]},{c[1]},{c[2]})"></span>{html.escape(n)}</li>'
        for n, c in zip(classes, palette))
    page = _PAGE.replace('__TITLE__', html.escape(title)).replace(
        '__IMAGE__', json.dumps(image)).replace('__LABELS__', json.dumps(overlay)).replace(
        '__LEGEND__', legend)
    path = osp.join(folder, 'index.html')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(page)
    return path


_PAGE = '''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 html, body { margin: 0; height: 100%; font: 13px sans-serif; }
 #view { position: absolute; inset: 0 220px 0 0; background: #222; }
 #side { position: absolute; top: 0; right: 0; width: 204px; padding: 8px; }
 #side ul { list-style: none; padding: 0; margin: 4px 0; max-height: 70vh; overflow: auto; }
 #side li span { display: inline-block; width: 12px; height: 12px; margin-right: 6px;
                 vertical-align: middle; border: 1px solid #0004; }
</style>
<script src="openseadragon/openseadragon.js"></script></head>
<body><div id="view"></div>
<div id="side"><b>__TITLE__</b><br>
 <label><input id="show" type="checkbox" checked> prediction</label><br>
 opacity <input id="alpha" type="range" min="0" max="1" step="0.05" value="0.5">
 <ul id="legend">__LEGEND__</ul></div>
<script>
 const viewer = OpenSeadragon({
   id: 'view', prefixUrl: 'openseadragon/images/', drawer: 'canvas',
   tileSources: [__IMAGE__], showNavigator: true, crossOriginPolicy: false });
 let overlay = null;
 viewer.addOnceHandler('open', () => {
   viewer.addTiledImage({ tileSource: __LABELS__, opacity: 0.5,
                          success: (e) => { overlay = e.item; } });
   const m = /zoom=([0-9.]+)/.exec(location.hash);
   if (m) viewer.viewport.zoomTo(parseFloat(m[1]), null, true);
 });
 document.getElementById('show').onchange = (e) => overlay &&
   overlay.setOpacity(e.target.checked ? +document.getElementById('alpha').value : 0);
 document.getElementById('alpha').oninput = (e) => overlay && overlay.setOpacity(+e.target.value);
</script></body></html>
'''


def write_object_viewer(folder: str, reader: RegionReader, classes: Sequence[str],
                        palette: Sequence[Sequence[int]], title: str = 'mmlinattn objects'
                        ) -> str:
    """The object page for ``reader``'s image: its Deep Zoom pyramid, OpenSeadragon and
    ``index.html``, which loads ``objects.js`` (written beside it by
    :class:`~mmlinattn.rasters.objects.ViewerSink`); returns the page's path."""
    import cv2
    _copy_openseadragon(folder)
    image = _dzi(folder, 'image', reader.height, reader.width, 'jpg', reader.read,
                 cv2.INTER_AREA)
    legend = ''.join(
        f'<li><label><input type="checkbox" data-label="{i}" checked>'
        f'<span style="background:rgb({c[0]},{c[1]},{c[2]})"></span>{html.escape(n)}'
        '</label></li>' for i, (n, c) in enumerate(zip(classes, palette)))
    colours = json.dumps([f'rgb({c[0]},{c[1]},{c[2]})' for c in palette])
    page = _OBJECT_PAGE.replace('__TITLE__', html.escape(title)).replace(
        '__IMAGE__', json.dumps(image)).replace('__LEGEND__', legend).replace(
        '__COLOURS__', colours)
    path = osp.join(folder, 'index.html')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(page)
    return path


# The objects: OBJECTS[i] = [label, score, x0, y0, x1, y1, [x, y, x, y, ...] outline]
# in image pixels. A grid of 512-pixel cells finds those in view; at most 50000 drawn.
_OBJECT_PAGE = '''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 html, body { margin: 0; height: 100%; font: 13px sans-serif; }
 #view { position: absolute; inset: 0 220px 0 0; background: #222; }
 #draw { position: absolute; left: 0; top: 0; pointer-events: none; }
 #side { position: absolute; top: 0; right: 0; width: 204px; padding: 8px; }
 #side ul { list-style: none; padding: 0; margin: 4px 0; max-height: 60vh; overflow: auto; }
 #side li span { display: inline-block; width: 12px; height: 12px; margin: 0 6px;
                 vertical-align: middle; border: 1px solid #0004; }
</style>
<script src="openseadragon/openseadragon.js"></script>
<script src="objects.js"></script></head>
<body><div id="view"></div>
<div id="side"><b>__TITLE__</b><br>
 <span id="count"></span><br>
 score &ge; <span id="scoreval"></span><br>
 <input id="score" type="range" min="0" max="1" step="0.01" value="0"><br>
 <label><input id="boxes" type="checkbox" checked> boxes</label>
 <ul id="legend">__LEGEND__</ul></div>
<script>
 const COLOURS = __COLOURS__;
 const objects = window.OBJECTS || [];
 const CELL = 512;
 const grid = new Map();
 objects.forEach((o, i) => {
   for (let cy = Math.floor(o[3] / CELL); cy <= Math.floor(o[5] / CELL); cy++)
     for (let cx = Math.floor(o[2] / CELL); cx <= Math.floor(o[4] / CELL); cx++) {
       const k = cy * 1000003 + cx;
       if (!grid.has(k)) grid.set(k, []);
       grid.get(k).push(i);
     }
 });
 const hash = new URLSearchParams(location.hash.slice(1));
 const score = document.getElementById('score');
 if (hash.has('score')) score.value = hash.get('score');
 const shown = new Set(COLOURS.map((c, i) => i));
 const viewer = OpenSeadragon({
   id: 'view', prefixUrl: 'openseadragon/images/', drawer: 'canvas',
   tileSources: [__IMAGE__], showNavigator: true, crossOriginPolicy: false });
 const canvas = document.createElement('canvas');
 canvas.id = 'draw';
 viewer.canvas.appendChild(canvas);
 function draw() {
   const el = viewer.container, ctx = canvas.getContext('2d');
   canvas.width = el.clientWidth; canvas.height = el.clientHeight;
   document.getElementById('scoreval').textContent = (+score.value).toFixed(2);
   if (!viewer.world.getItemCount()) return;
   const vp = viewer.viewport, P = OpenSeadragon.Point;
   const a = vp.viewerElementToImageCoordinates(new P(0, 0));
   const b = vp.viewerElementToImageCoordinates(new P(canvas.width, canvas.height));
   const s = vp.imageToViewerElementCoordinates(new P(1, 0)).x -
             vp.imageToViewerElementCoordinates(new P(0, 0)).x;
   const o0 = vp.imageToViewerElementCoordinates(new P(0, 0));
   const min = +score.value, boxes = document.getElementById('boxes').checked;
   const seen = new Set();
   let n = 0;
   ctx.lineWidth = 2;
   for (let cy = Math.floor(Math.max(0, a.y) / CELL); cy <= Math.floor(b.y / CELL); cy++)
     for (let cx = Math.floor(Math.max(0, a.x) / CELL); cx <= Math.floor(b.x / CELL); cx++)
       for (const i of grid.get(cy * 1000003 + cx) || []) {
         if (seen.has(i) || n >= 50000) continue;
         seen.add(i);
         const o = objects[i];
         if (o[1] < min || !shown.has(o[0])) continue;
         n++;
         ctx.strokeStyle = COLOURS[o[0] % COLOURS.length];
         const ring = o[6], outlined = ring && ring.length >= 6;
         if (outlined) {
           ctx.beginPath();
           ctx.moveTo(o0.x + ring[0] * s, o0.y + ring[1] * s);
           for (let k = 2; k < ring.length; k += 2)
             ctx.lineTo(o0.x + ring[k] * s, o0.y + ring[k + 1] * s);
           ctx.closePath(); ctx.stroke();
         }
         if (boxes || !outlined) {  // a box dashed around an outline, solid alone
           ctx.setLineDash(outlined ? [4, 3] : []);
           ctx.strokeRect(o0.x + o[2] * s, o0.y + o[3] * s, (o[4] - o[2]) * s, (o[5] - o[3]) * s);
           ctx.setLineDash([]);
         }
       }
   document.getElementById('count').textContent =
     objects.length + ' objects, ' + n + ' drawn here';
 }
 viewer.addHandler('update-viewport', draw);
 viewer.addOnceHandler('open', () => {
   if (hash.has('zoom')) viewer.viewport.zoomTo(parseFloat(hash.get('zoom')), null, true);
   draw();
 });
 score.oninput = draw;
 document.getElementById('boxes').onchange = draw;
 document.querySelectorAll('#legend input').forEach((box) => box.onchange = () => {
   const k = +box.dataset.label;
   if (box.checked) shown.add(k); else shown.delete(k);
   draw();
 });
</script></body></html>
'''
