"""A self-contained deep-zoom page: the image and the prediction as layers.

:func:`write_viewer` writes, into a folder, Deep Zoom (DZI) tile pyramids of the
image (JPEG) and of the coloured prediction (PNG with transparency where nothing
was predicted), a copy of OpenSeadragon (installed by ``tools/setup.sh`` from its
npm package) and ``index.html``: no server and no network are needed, open the
file in a browser. ``index.html#zoom=Z`` opens at zoom ``Z`` (1 = whole image).
Tiles are built level by level, each from the 2 x 2 tiles of the level above, so
the image is read once, band by band.
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

__all__ = ['write_viewer', 'openseadragon_dir', 'OPENSEADRAGON_VERSION', 'DZI_TILE']

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


def write_viewer(folder: str, reader: RegionReader, labels: Any, classes: Sequence[str],
                 palette: Sequence[Sequence[int]], nodata: Optional[int] = None,
                 title: str = 'mmlinattn prediction') -> str:
    """The page (see the module docstring) for ``reader``'s image and ``labels (H, W)``
    (a numpy array or memory map); returns the path of ``index.html``."""
    import cv2
    osd = openseadragon_dir()
    os.makedirs(folder, exist_ok=True)
    target = osp.join(folder, 'openseadragon')
    if osp.isdir(target):
        shutil.rmtree(target)
    shutil.copytree(osd, target)
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
