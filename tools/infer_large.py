#!/usr/bin/env python
"""Predict one very large image whole: exact global InLine attention, bounded memory.

    python tools/infer_large.py CONFIG CKPT slide.svs --out pred.ome.tif --level 1
    python tools/infer_large.py CONFIG CKPT scene.tif --out pred.ome.tif --spill /scratch/run
    python tools/infer_large.py CONFIG CKPT image.png --out mask.png           # small files
    python tools/infer_large.py CONFIG CKPT image.png --out dets.json          # detector
    python tools/infer_large.py CONFIG none --synthetic 8192 8192 --compare slide

The image is read by regions (mmlinattn.rasters): tiled/striped TIFF, BigTIFF,
OME-TIFF and GeoTIFF through tifffile, whole-slide formats (SVS, NDPI, MRXS, ...)
through OpenSlide, small images through cv2; ``--level``/``--mpp`` pick a pyramid
level. Only the bands the backbone's stem reads are decoded. The backbone runs
token-chunked (``--chunk-tokens``), the neck and a local decode head tile by tile
with a halo (``--tile``, ``--halo``), so the prediction equals the whole-image
computation of the same model (mmlinattn.engine.large_image). ``--spill DIR`` keeps
every whole map in memory-mapped files there (then memory is a few bands at any
size) and makes the run resumable (``--resume``).

A segmenter writes ``--out`` as a tiled pyramidal OME-TIFF (``.tif``/``.tiff``; the
input's GeoTIFF georeferencing kept, classes and palette in its metadata) or a PNG
of class indices; ``--overlay`` adds an RGB pyramid of the prediction blended on
the image, ``--viewer DIR`` a deep-zoom page (OpenSeadragon, no server needed).
``--skip-background`` predicts only the tissue of a whole slide. A detector writes
COCO-style JSON (``.json``) or GeoJSON polygons (``.geojson``, map coordinates for
a GeoTIFF). Prints the time and the peak memory of every phase. ``--compare whole``
also runs mmseg's ordinary whole-image inference, ``--compare slide`` its
sliding-window inference, each with how much its labels differ from ours.
CHECKPOINT ``none`` keeps random weights (timings and memory only).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import resource
import sys
import time
from typing import Any, Callable

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

from mmlinattn.utils.precision import add_dtype_arguments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Whole-image inference on a very large image')
    p.add_argument('config', help='an mmseg or mmdet config with an InLine backbone')
    p.add_argument('checkpoint', help="trained weights (a runner checkpoint or a state dict, "
                   "read safely), or 'none' for random weights (measurements only)")
    p.add_argument('image', nargs='?', help='the image file (TIFF/OME-TIFF/GeoTIFF/BigTIFF, a '
                   'whole slide, or any image cv2 reads)')
    p.add_argument('--synthetic', type=int, nargs=2, metavar=('H', 'W'),
                   help='a random H x W image instead of IMAGE (measurements)')
    p.add_argument('--out', nargs='+', metavar='PATH',
                   help='output: .tif/.tiff (pyramidal OME-TIFF) or .png labels (segmenter); a '
                   'detector writes one or more of .json (COCO results, RLE masks), .geojson '
                   '(QuPath/GIS), .gpkg (GeoPackage in the source CRS), .sqlite (object store '
                   'with an R-tree)')
    p.add_argument('--level', type=int, help='pyramid level to read (0 = full resolution)')
    p.add_argument('--mpp', type=float, help='read the level closest to this many microns '
                   'per pixel (the file must state its resolution)')
    p.add_argument('--reader', choices=['auto', 'tiff', 'openslide', 'cv2'], default='auto',
                   help='how to read IMAGE (auto: by its format)')
    p.add_argument('--max-pixels', type=int, default=None,
                   help='refuse files claiming more pixels than this (default 2^36)')
    p.add_argument('--spill', metavar='DIR', help='keep whole maps in memory-mapped files in '
                   'DIR (memory stays a few bands at any size); makes the run resumable')
    p.add_argument('--resume', action='store_true',
                   help='continue the interrupted run kept in --spill DIR')
    p.add_argument('--skip-background', nargs='?', const='otsu', metavar='MASK',
                   help="predict only block rows/columns with tissue: 'otsu' (default, on a "
                   'low-resolution level) or a mask image (non-zero = tissue)')
    p.add_argument('--nodata', type=int, default=255,
                   help='label of pixels not predicted (skipped background)')
    p.add_argument('--overlay', metavar='PATH', help='also write the prediction blended on '
                   'the image as an RGB pyramidal OME-TIFF')
    p.add_argument('--alpha', type=float, default=0.5, help='overlay opacity')
    p.add_argument('--viewer', metavar='DIR', help='also write a deep-zoom viewer page (image '
                   'and prediction layers, legend) into DIR')
    p.add_argument('--in-memory', action='store_true',
                   help='decode the whole image into memory first (the reference path)')
    p.add_argument('--chunk-tokens', type=int, default=65536,
                   help='tokens per band of the chunked backbone; 0 runs it unchunked')
    p.add_argument('--tile', type=int, default=2048,
                   help='image pixels per side of a neck/head tile (multiple of 64; of the '
                   "neck's coarsest stride for a detector)")
    p.add_argument('--halo', type=int, default=256,
                   help='image pixels of context around each tile (multiple of 64; Semantic FPN '
                   "needs 128, UperNet 64; a detector's neck and heads 256)")
    p.add_argument('--margin', type=int, default=256,
                   help='detectors: image pixels beyond its core in which a tile sees objects '
                   'whole (objects reaching at most this far past the core are exact; larger '
                   'ones are merged from the parts the tiles see)')
    p.add_argument('--proposal-thr', type=float, default=0.05,
                   help='detectors: budgets by score, every proposal whose objectness reaches '
                   "this and every detection above the config's score_thr are kept, so tiles "
                   'give the whole image\'s detections (default 0.05)')
    p.add_argument('--count-budgets', action='store_true',
                   help="detectors: the config's budgets by count instead (RPN nms_pre and "
                   'max_per_img, max_per_img), each tile\'s scaled by --budget-scale')
    p.add_argument('--max-per-tile', type=int, default=None,
                   help="detectors: the most detections kept per tile (default: the config's "
                   'max_per_img times the budget scale)')
    p.add_argument('--budget-scale', type=float, default=None,
                   help="detectors: each tile's caps (by score) or budgets (by count) are the "
                   "config's times this (default: the head region's area over a 1333 x 800 "
                   'image, between 1 and 8)')
    p.add_argument('--coarse', type=int, default=0, metavar='F',
                   help='detectors: also detect on the image read F times coarser; objects '
                   'larger than 2 x --margin come from that pass (seen whole up to 2F x margin, '
                   "and within the detector's sizes), smaller ones from the full resolution, "
                   'and full-resolution detections mostly inside a large object of their '
                   'class are dropped as its fragments (default 0: no coarse pass)')
    p.add_argument('--neck', choices=('auto', 'global', 'tiles'), default='auto',
                   help="detectors: run the neck (and a local dense head such as the RPN) "
                   'once over the image, by rectangles, and crop each tile\'s maps from it '
                   "('global'), or on each tile's crop ('tiles'); 'auto' (default): global "
                   'with --spill or when its maps fit in 2 GiB')
    p.add_argument('--nested-ios', type=float, default=0.5,
                   help='detectors: drop a detection nested with a better-scoring one of its '
                   'class, more than this share of the smaller box inside the other (two '
                   "detections of one object that mmdet's IoU suppression keeps); 1 keeps "
                   'them (default 0.5)')
    p.add_argument('--merge-iou', type=float, default=0.5,
                   help='detectors: IoU of two parts of a large object inside the window both '
                   'tiles see for them to be merged')
    p.add_argument('--compare', nargs='+', choices=['whole', 'slide'], default=[],
                   help="also run mmseg's whole-image or sliding-window inference and report "
                   "how their labels differ from ours (detectors: 'whole', mmdet's heads on the "
                   'whole pyramid, with the share of its detections ours match)')
    p.add_argument('--slide-crop', type=int, default=512)
    p.add_argument('--slide-stride', type=int, default=341)
    p.add_argument('--no-masks', action='store_true',
                   help='detectors: skip the mask head (mmdet pastes each mask at image size)')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    add_dtype_arguments(p)
    p.add_argument('--report', metavar='JSON', help='also write the measurements to this file')
    p.add_argument('--keep-freed-memory', action='store_true',
                   help='keep freed buffers in the heap for the whole process, unbounded '
                        '(by default only the chunked backbone and the tiles do, the tiles '
                        'up to 2 GiB of freed memory): the heap fragments and the resident '
                        'size grows well past the memory in use (9.3 GiB RssAnon for 2.6 GiB '
                        'in use at 16384^2)')
    args = p.parse_args(argv)
    if (args.image is None) == (args.synthetic is None):
        p.error('give either IMAGE or --synthetic H W')
    if args.resume and not args.spill:
        p.error('--resume needs --spill DIR (the interrupted run is kept there)')
    args.outs = args.out or []
    args.out = args.outs[0] if args.outs else None
    return args


def open_reader(args: argparse.Namespace) -> Any:
    """A region reader of IMAGE at the chosen level, or of the synthetic image."""
    from mmlinattn.rasters import DEFAULT_MAX_PIXELS, ArrayReader, open_image
    if args.synthetic:
        h, w = args.synthetic
        img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0)).numpy()
        return ArrayReader(img, '<synthetic>')
    return open_image(args.image, args.level, args.mpp,
                      max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, reader=args.reader)


def whole_image(reader: Any) -> torch.Tensor:
    """The whole image decoded, ``(3, H, W) uint8`` BGR (as LoadImageFromFile gives it)."""
    out = torch.empty(3, reader.height, reader.width, dtype=torch.uint8)
    for y in range(0, reader.height, 1024):
        y1 = min(reader.height, y + 1024)
        out[:, y:y1] = torch.from_numpy(reader.read(y, y1)).permute(2, 0, 1)
    return out


def load_model(config: str, checkpoint: str, device: str) -> tuple[Any, str]:
    from mmlinattn.engine.build import build_from_config, load_weights

    model, scope = build_from_config(config)
    print(load_weights(model, checkpoint))
    return model.to(device).eval(), scope


def measured(label: str, device: str, fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Run ``fn`` and print its time and peak memory in use (CUDA allocator or CPU heap)."""
    from mmlinattn.benchmark.memory import MemoryWatch, in_use_measure

    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        peak, measure = torch.cuda.max_memory_allocated(), 'CUDA allocated'
    else:
        with MemoryWatch() as watch:
            start = time.perf_counter()
            out = fn()
        peak, measure = watch.peak, in_use_measure()
        anon = watch.peak_anon
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    extra = '' if device == 'cuda' else f', peak private resident (RssAnon) {anon / 2**30:.2f} GiB'
    print(f'{label}: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB ({measure}){extra}; '
          f'process peak RSS (with mapped file pages) so far {rss:.2f} GiB')
    stats = dict(seconds=seconds, peak_gib=peak / 2**30, peak_rss_gib=rss)
    if device != 'cuda':
        stats['peak_anon_gib'] = anon / 2**30
    return out, stats


def progress_bar(label: str, unit: str, pixels: int = 0) -> Callable[[int, int], None]:
    """``update(done, total)``: one line redrawn with the count, the time left and, for a
    job over ``pixels`` image pixels (each unit a share of them), the throughput in
    Mpx/s."""
    start: list = []

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if not start:
            start.extend([now, done - 1 if done else 0])
        elapsed = now - start[0]
        rate = (done - start[1]) / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else float('nan')
        end = '\n' if done >= total else ''
        speed = ''
        if pixels and elapsed > 0 and done > start[1]:
            speed = f', {pixels / 1e6 * (done - start[1]) / total / elapsed:.3f} Mpx/s'
        print(f'\r{label}: {done}/{total} {unit}, {elapsed:.0f} s{speed}, '
              f'{f"{left:.0f} s left" if left == left else "..."}   ', end=end, flush=True)
    return update


def write_mask(labels: torch.Tensor, path: str) -> None:
    """A PNG of class indices (uint8, or uint16 past 256 classes), written whole."""
    import cv2

    from mmlinattn.rasters import atomic_output
    dtype = 'uint8' if int(labels.max()) < 256 else 'uint16'
    ok, data = cv2.imencode(osp.splitext(path)[1] or '.png', labels.numpy().astype(dtype))
    if not ok:
        raise OSError(f'could not encode {path}')
    with atomic_output(path) as tmp, open(tmp, 'wb') as f:
        f.write(data.tobytes())
    print(f'wrote {path} ({labels.shape[0]} x {labels.shape[1]} class indices, {dtype})')


def is_pyramid_path(path: str) -> bool:
    return path.lower().endswith(('.tif', '.tiff'))


def write_detections(result: Any, model: Any, paths: list[str], reader: Any) -> None:
    """mmdet's whole-image result written to the object files of ``paths`` (each mask
    cut to its own box first), in the model's classes and colours."""
    from mmlinattn.engine.detection_files import detection_classes
    from mmlinattn.engine.tiled_detection import result_objects
    from mmlinattn.rasters.objects import open_sinks, write_objects
    classes, palette = detection_classes(model)
    sinks = open_sinks(paths, classes, palette, reader.height, reader.width, reader.geo,
                       reader.downsample)
    objects = result_objects(result.pred_instances)
    write_objects(sinks, objects)
    for path in paths:
        print(f'wrote {path} ({len(objects)} detections)')


def spatial_group(device: str) -> Any:
    """Under torchrun (``WORLD_SIZE`` > 1): every process takes a band of the image's
    rows (spatial parallelism); None for one process."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return None
    import torch.distributed as dist

    from mmlinattn.parallel import SpatialGroup
    if not dist.is_initialized():
        # A rank that waits on a dead peer fails after this long instead of hanging
        # (MMLINATTN_COLLECTIVE_TIMEOUT_S; the tests set 120 s).
        import datetime
        timeout = datetime.timedelta(seconds=float(os.environ.get(
            'MMLINATTN_COLLECTIVE_TIMEOUT_S', 1800)))
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo', timeout=timeout)
    if device == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    return SpatialGroup.world()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from mmlinattn.engine import large_image as li
    from mmlinattn.utils.precision import autocast_for, resolve_dtype

    args.dtype = resolve_dtype(args.dtype, args.device, args.force_bf16)
    if args.dtype == 'bf16':
        from mmlinattn.ops.mmcv_autocast import float32_mmcv_ops
        float32_mmcv_ops()  # mmdet's heads call mmcv's float32-only CPU operators
    group = spatial_group(args.device)
    from mmlinattn.parallel.watchdog import watch_group
    try:
        # A rank that dies or stops is named by the others within MMLINATTN_STALL_S
        # (60 s by default; ranks busy computing keep beating).
        with watch_group(float(os.environ.get('MMLINATTN_STALL_S', 60))), \
                autocast_for(args.dtype, args.device):
            report = _main(args, li, group)
        if args.report and (group is None or group.first):
            with open(args.report, 'w') as f:
                json.dump(report, f, indent=1, default=str)
        return report
    finally:
        if group is not None:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()


def _main(args: argparse.Namespace, li: Any, group: Any) -> dict:
    reader = open_reader(args)
    print(reader.describe() + ('; computing in bf16 (autocast)' if args.dtype == 'bf16' else ''))
    model, scope = load_model(args.config, args.checkpoint, args.device)
    if group is not None:
        if args.compare:
            raise ValueError('--compare runs in one process; launch without torchrun')
        import torch.distributed as dist
        for t in list(model.parameters()) + list(model.buffers()):  # rank 0's weights
            dist.broadcast(t.data, group.global_rank(0), group=group.group)
    chunk = args.chunk_tokens or None
    h, w = reader.height, reader.width
    ranks = '' if group is None else f'; rank {group.rank} of {group.size} (rows split)'
    print(f'{osp.basename(args.config)}: {h} x {w} image; backbone '
          f'{"chunked, " + str(chunk) + " tokens a band" if chunk else "unchunked"}; '
          f'tiles {args.tile} px, halo {args.halo} px{ranks}'
          f'{"; maps spilled to " + args.spill if args.spill else ""}')
    report: dict = dict(image=[h, w], chunk_tokens=chunk, tile=args.tile, halo=args.halo)
    first = group is None or group.first
    if scope == 'mmseg' and len(args.outs) > 1:
        raise ValueError('a segmenter writes one --out (.tif/.tiff pyramid or .png labels)')
    if scope == 'mmdet' and 'slide' in args.compare:
        raise ValueError("--compare slide is for segmenters; a detector compares with 'whole'")
    if scope == 'mmseg':
        by_regions = not args.in_memory and chunk is not None
        if not by_regions and (args.spill or args.skip_background or args.resume):
            raise ValueError('--spill, --resume and --skip-background read the image by regions: '
                             'they need the chunked backbone and no --in-memory')
        image = None if by_regions else whole_image(reader)
        share = h * w // (group.size if group is not None else 1)
        tiles = progress_bar('neck and head', 'tiles', share)
        if by_regions:
            from mmlinattn.engine.large_files import FileOutputs, segment_file
            pyramid = args.out if args.out and is_pyramid_path(args.out) else None
            outputs = FileOutputs(pyramid, args.overlay, args.viewer, args.alpha)
            settings = dict(config=osp.abspath(args.config), checkpoint=args.checkpoint)
            (labels, info), report['ours'] = measured('whole-image (chunked, by regions)',
                                                      args.device, lambda: segment_file(
                model, reader, outputs, chunk_tokens=chunk, tile=args.tile, halo=args.halo,
                spill=args.spill, resume=args.resume, background=args.skip_background,
                nodata=args.nodata, progress=tiles,
                blocks_progress=progress_bar('backbone', 'blocks', share), group=group,
                settings=settings))
            for key in ('tissue', 'spill', 'resumed', 'write_s', 'viewer_page'):
                if key in info:
                    report['ours'][key] = info[key]
            decoded = info['decoded_pixels_model']
            report['ours']['decoded_pixels'] = decoded
            print(f'  the prediction decoded {decoded / 1e6:.3f} Mpx of a {h * w / 1e6:.3f} Mpx '
                  f'image, a band at a time; {info.get("spill", "nothing spilled")}')
            for path in (pyramid, args.overlay, info.get('viewer_page')):
                if path and first:
                    print(f'wrote {path}')
        else:
            if args.overlay or args.viewer:
                raise ValueError('--overlay and --viewer need the by-regions path (no '
                                 '--in-memory, a chunked backbone)')
            (labels, info), report['ours'] = measured(
                'whole-image (chunked, in memory)' if chunk else 'whole-image (unchunked)',
                args.device, lambda: li.segment_large(model, image, chunk, args.tile,
                                                      args.halo, tiles, group=group))
        report['ours'].update(backbone_s=info['backbone_s'], head_s=info['head_s'])
        print(f'  backbone {info["backbone_s"]:.1f} s, neck and head by tiles '
              f'{info["head_s"]:.1f} s')
        if group is not None:
            report['ours']['rank'] = group.rank
            report['ours']['comm'] = group.stats.as_dict()
        if args.out and first and not (by_regions and is_pyramid_path(args.out)):
            if is_pyramid_path(args.out):
                from mmlinattn.rasters import write_label_pyramid
                classes = list((getattr(model, 'dataset_meta', None) or {}).get(
                    'classes', ())) or [str(i) for i in range(model.decode_head.out_channels)]
                write_label_pyramid(args.out, labels.numpy(), classes, geo=reader.geo,
                                    mpp=reader.mpp)
                print(f'wrote {args.out}')
            else:
                write_mask(labels, args.out)
        if args.compare and image is None:
            image = whole_image(reader)
        for mode in args.compare:
            if mode == 'whole':
                (other, _), stats = measured("mmseg 'whole' (unchunked)", args.device,
                                             lambda: li.segment_whole(model, image))
            else:
                other, stats = measured(
                    f"mmseg 'slide' ({args.slide_crop} px crops, stride {args.slide_stride})",
                    args.device, lambda: li.segment_slide(model, image, args.slide_crop,
                                                          args.slide_stride))
            stats['label_difference'] = float((other.cpu() != labels).float().mean())
            print(f'  labels differing from the whole-image prediction: '
                  f'{100 * stats["label_difference"]:.3f}% of pixels')
            report[mode] = stats
    elif args.in_memory or not chunk:
        if group is not None:
            raise ValueError('spatially parallel detection reads the file by regions (no '
                             '--in-memory, a chunked backbone)')
        if args.spill or args.skip_background or args.overlay or args.viewer or args.resume:
            raise ValueError('--spill, --resume, --skip-background, --overlay and --viewer read '
                             'the image by regions: they need the chunked backbone and no '
                             '--in-memory')
        result, report['ours'] = _detect_in_memory(args, model, reader)
        if args.outs:
            write_detections(result, model, args.outs, reader)
    else:
        if args.overlay:
            raise ValueError('--overlay is for segmenters; a detector draws its objects with '
                             '--viewer DIR')
        report['ours'] = _detect_by_regions(args, model, reader, group)
        if 'whole' in args.compare:
            result, report['whole'] = _detect_in_memory(args, model, reader)
            from mmlinattn.engine.tiled_detection import match_detections
            report['whole'].update(match_detections(report['ours'].pop('objects_list'),
                                                    result.pred_instances))
            print('  against mmdet on the whole pyramid: {matched:.2%} of its {reference} '
                  'detections matched (same class, box IoU >= 0.95, score within 1e-3), '
                  '{extra:.2%} extra'.format(**report['whole']))
    return report


def _detect_in_memory(args: argparse.Namespace, model: Any, reader: Any) -> tuple[Any, dict]:
    """mmdet's heads on the whole pyramid of the decoded image (the reference path), with
    the budgets of the tiles: by score, or by count at their density."""
    from mmlinattn.engine import large_image as li
    from mmlinattn.engine.tiled_detection import detection_budgets, threaded_roi_pooling
    image = whole_image(reader)
    side = args.tile + 2 * (args.margin + args.halo)
    regions = max(1.0, reader.height * reader.width / side ** 2)
    with detection_budgets(model, _tiling(args), regions) as budgets, \
            threaded_roi_pooling(model):
        (result, info), stats = measured(
            'whole-image detection (heads on the whole pyramid)', args.device,
            lambda: li.detect_large(model, image, args.chunk_tokens or None, args.tile,
                                    args.halo, not args.no_masks, progress_bar('neck', 'tiles')))
    budgets.pop('reached')
    from mmlinattn.engine.tiled_detection import suppress_nested
    result.pred_instances = suppress_nested(result.pred_instances, args.nested_ios)
    stats.update(info)
    print(f'  backbone {info["backbone_s"]:.1f} s, neck by tiles {info["neck_s"]:.1f} s, '
          f'heads {info["heads_s"]:.1f} s; {len(result.pred_instances)} detections')
    stats['detections'] = len(result.pred_instances)
    return result, stats


def _tiling(args: argparse.Namespace) -> Any:
    from mmlinattn.engine.tiled_detection import DetectionTiling
    return DetectionTiling(args.tile, args.margin, args.halo, args.merge_iou,
                           args.max_per_tile, args.budget_scale,
                           None if args.count_budgets else args.proposal_thr, args.coarse,
                           args.nested_ios, args.neck)


def _detect_by_regions(args: argparse.Namespace, model: Any, reader: Any, group: Any = None
                       ) -> dict:
    """The global backbone by bands, neck and heads by tiles, objects streamed out."""
    from mmlinattn.engine.detection_files import detect_file
    if args.no_masks:
        raise ValueError('--no-masks is for the in-memory path; by regions masks stay local '
                         '(each over its own box)')
    tiling = _tiling(args)
    print(f'  detection tiles: cores {tiling.tile} px, margin {tiling.margin} px (objects '
          f'reaching up to this far past a core are seen whole), halo {tiling.halo} px')
    settings = dict(config=osp.abspath(args.config), checkpoint=args.checkpoint)
    share = reader.height * reader.width // (group.size if group is not None else 1)
    info, stats = measured('whole-image detection (global backbone, tiled heads)', args.device,
                           lambda: detect_file(
        model, reader, args.outs, chunk_tokens=args.chunk_tokens, tiling=tiling,
        spill=args.spill, resume=args.resume, background=args.skip_background,
        progress=progress_bar('neck and heads', 'tiles', share),
        blocks_progress=progress_bar('backbone', 'blocks', share), settings=settings,
        keep_objects='whole' in args.compare, group=group, viewer=args.viewer))
    stats.update(info)
    if group is not None and not group.first:
        print(f'  rank {group.rank}: backbone {info["backbone_s"]:.1f} s, its tiles '
              f'{info["heads_s"]:.1f} s; rank 0 writes the objects')
        return stats
    print(f'  backbone {info["backbone_s"]:.1f} s, neck and heads by tiles '
          f'{info["heads_s"]:.1f} s ({info["tiles"]} tiles: '
          + ', '.join(f'{k[:-2]} {v:.1f} s' for k, v in info['tile_s'].items())
          + f'), writing {info["write_s"]:.1f} s; '
          f'{info["objects"]} objects ({info["merged"]} merged from {info["truncated"]} parts '
          'cut at tile borders); budgets per tile: '
          + ', '.join(f'{k} {v}' for k, v in info['budgets'].items()))
    if 'coarse' in info:
        print('  coarse pass: {factor}x coarser ({image[0]} x {image[1]} px, {tiles} tiles) '
              'in {seconds:.1f} s: {objects} objects larger than the margin; {replaced} '
              'full-resolution detections larger than the margin and {fragments} fragments '
              'of large objects dropped'.format(**info['coarse']))
    bound = {k: v for k, v in info['budget_reached'].items() if v}
    if bound:
        print('  caps reached ({}): where a cap binds, a tile keeps its top-k and the tiles '
              'may differ from the whole image; raise --budget-scale or --proposal-thr'
              .format(', '.join(f'{k} in {v} tile(s)' for k, v in bound.items())))
    for path in args.outs + ([osp.join(args.viewer, 'index.html')] if args.viewer else []):
        print(f'wrote {path}')
    return stats


if __name__ == '__main__':
    if '--keep-freed-memory' in sys.argv:
        # Only in a process of its own (the tests call main() in theirs).
        from mmlinattn.utils.heap import keep_freed_memory
        keep_freed_memory()
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
