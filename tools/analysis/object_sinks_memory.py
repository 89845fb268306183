#!/usr/bin/env python
"""Memory of the object outputs as the number of objects grows: flat, or not.

    python tools/analysis/object_sinks_memory.py --counts 10000 100000 1000000

Writes N synthetic nuclei (discs of 6-12 px radius with their masks, spread over a
32768 x 32768 image) the way ``tools/infer_large.py`` does for a detector: staged as
JSON lines by rows of tiles, then streamed to an SQLite object store, GeoJSON and, for
images below 2^32 pixels, COCO JSON. Prints, for each N, the time and the peak heap in
use over the run (the staging and every sink), and the size of the files.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def run(count: int, folder: str, side: int) -> dict:
    from mmlinattn.benchmark.memory import MemoryWatch
    from mmlinattn.engine.detection_files import _Staging
    from mmlinattn.rasters.objects import DetectedObject, LocalMask, open_sinks
    rng = np.random.default_rng(0)
    discs = {}
    for r in range(6, 13):
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        discs[r] = (yy ** 2 + xx ** 2) <= r * r
    outs = [osp.join(folder, f'objects{s}') for s in ('.sqlite', '.geojson')]
    if side * side < 2**32:
        outs.append(osp.join(folder, 'objects.json'))
    rows = 64
    with MemoryWatch() as watch:
        start = time.perf_counter()
        staging = _Staging(folder)
        for row in range(rows):  # as the tiles of one row would give them
            y0 = row * side // rows
            objs = []
            for _ in range(count // rows):
                r = int(rng.integers(6, 13))
                cy = int(rng.integers(y0 + r, y0 + side // rows - r))
                cx = int(rng.integers(r, side - r))
                objs.append(DetectedObject(int(rng.integers(0, 3)), float(rng.random()),
                                           (cx - r, cy - r, cx + r + 1, cy + r + 1),
                                           LocalMask(cy - r, cx - r, discs[r])))
            staging.write('row', y0, objs)
        staged = time.perf_counter() - start
        sinks = open_sinks(outs, ['a', 'b', 'c'], [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                           side, side)
        n = 0
        for obj in staging.read('row'):
            for s in sinks:
                s.add(obj)
            n += 1
        for s in sinks:
            s.close()
        seconds = time.perf_counter() - start
    return dict(objects=n, seconds=seconds, staged_s=staged,
                peak_gib=(watch.peak - watch.start) / 2**30,
                files_mib={osp.basename(p): os.path.getsize(p) / 2**20 for p in outs})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--counts', type=int, nargs='+', default=[10000, 100000, 1000000])
    p.add_argument('--side', type=int, default=32768,
                   help='image side (pixels; COCO RLE needs side^2 < 2^32)')
    args = p.parse_args()
    for count in args.counts:
        with tempfile.TemporaryDirectory() as folder:
            r = run(count, folder, args.side)
        print(f'{r["objects"]:>8} objects: {r["seconds"]:.0f} s (staging {r["staged_s"]:.0f} s), '
              f'peak {r["peak_gib"] * 1024:.0f} MiB in use; files ' + ', '.join(
                  f'{k} {v:.0f} MiB' for k, v in r['files_mib'].items()), flush=True)


if __name__ == '__main__':
    main()
