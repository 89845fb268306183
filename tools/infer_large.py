#!/usr/bin/env python
"""Predict one very large image whole: exact global InLine attention, bounded memory.

    python tools/infer_large.py CONFIG CHECKPOINT IMAGE --out mask.png      # segmenter
    python tools/infer_large.py CONFIG CHECKPOINT IMAGE --out dets.json     # detector
    python tools/infer_large.py CONFIG none --synthetic 8192 8192 --compare slide

The backbone runs token-chunked (``--chunk-tokens``), the neck and a local decode
head tile by tile with a halo (``--tile``, ``--halo``), so the prediction equals the
whole-image computation of the same model (mmlinattn.engine.large_image). A
segmenter writes a PNG of class indices (uint8, or uint16 past 256 classes); a
detector a COCO-style JSON list (``bbox`` as x, y, w, h in image pixels,
``score``, ``category_id``, ``category``, RLE ``segmentation`` with a mask head).
Prints the time and the peak memory of every phase. ``--compare whole`` also runs
mmseg's ordinary whole-image inference, ``--compare slide`` its sliding-window
inference (the tiling a softmax backbone needs), each with its time, memory and
how much its labels differ from ours. CHECKPOINT ``none`` keeps random weights
(timings and memory only).
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Whole-image inference on a very large image')
    p.add_argument('config', help='an mmseg or mmdet config with an InLine backbone')
    p.add_argument('checkpoint', help="trained weights (a runner checkpoint or a state dict, "
                   "read safely), or 'none' for random weights (measurements only)")
    p.add_argument('image', nargs='?', help='the image file (any size cv2 reads)')
    p.add_argument('--synthetic', type=int, nargs=2, metavar=('H', 'W'),
                   help='a random H x W image instead of IMAGE (measurements)')
    p.add_argument('--out', help='output: a .png mask (segmenter) or a .json file (detector)')
    p.add_argument('--chunk-tokens', type=int, default=65536,
                   help='tokens per band of the chunked backbone; 0 runs it unchunked')
    p.add_argument('--tile', type=int, default=2048,
                   help='image pixels per side of a neck/head tile (multiple of 64)')
    p.add_argument('--halo', type=int, default=256,
                   help='image pixels of context around each tile (multiple of 64; Semantic FPN '
                   'needs 128, UperNet 64)')
    p.add_argument('--compare', nargs='+', choices=['whole', 'slide'], default=[],
                   help="also run mmseg's whole-image or sliding-window inference and report "
                   'how their labels differ from ours')
    p.add_argument('--slide-crop', type=int, default=512)
    p.add_argument('--slide-stride', type=int, default=341)
    p.add_argument('--no-masks', action='store_true',
                   help='detectors: skip the mask head (mmdet pastes each mask at image size)')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    args = p.parse_args(argv)
    if (args.image is None) == (args.synthetic is None):
        p.error('give either IMAGE or --synthetic H W')
    return args


def load_image(args: argparse.Namespace) -> torch.Tensor:
    """``(3, H, W) uint8``, BGR as mmseg/mmdet's LoadImageFromFile gives it."""
    if args.synthetic:
        h, w = args.synthetic
        return torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(0))
    import mmcv
    if not osp.isfile(args.image):
        raise FileNotFoundError(f'image not found: {args.image}')
    img = mmcv.imread(args.image, flag='color')
    if img is None:
        raise ValueError(f'cannot read {args.image} as an image')
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


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
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f'{label}: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB ({measure}); '
          f'process peak RSS so far {rss:.2f} GiB')
    return out, dict(seconds=seconds, peak_gib=peak / 2**30, peak_rss_gib=rss)


def progress_bar(label: str) -> Callable[[int, int], None]:
    from mmengine.utils import ProgressBar
    bar: list = []

    def update(done: int, total: int) -> None:
        if not bar:
            print(f'{label}: {total} tiles')
            bar.append(ProgressBar(total))
        bar[0].update()
        if done == total:
            print()
    return update


def write_mask(labels: torch.Tensor, path: str) -> None:
    import mmcv
    dtype = 'uint8' if int(labels.max()) < 256 else 'uint16'
    if not mmcv.imwrite(labels.numpy().astype(dtype), path):
        raise OSError(f'could not write {path}')
    print(f'wrote {path} ({labels.shape[0]} x {labels.shape[1]} class indices, {dtype})')


def write_detections(result: Any, classes: list, path: str) -> None:
    inst = result.pred_instances
    boxes, scores, labels = inst.bboxes.cpu(), inst.scores.cpu(), inst.labels.cpu()
    masks = inst.masks.cpu().numpy() if 'masks' in inst else None
    records = []
    for i in range(len(scores)):
        x0, y0, x1, y1 = boxes[i].tolist()
        rec = dict(bbox=[x0, y0, x1 - x0, y1 - y0], score=float(scores[i]),
                   category_id=int(labels[i]))
        if classes:
            rec['category'] = classes[int(labels[i])]
        if masks is not None:
            import numpy as np
            from pycocotools import mask as mask_util
            rle = mask_util.encode(np.asfortranarray(masks[i].astype('uint8')))
            rec['segmentation'] = dict(size=rle['size'], counts=rle['counts'].decode())
        records.append(rec)
    with open(path, 'w') as f:
        json.dump(records, f)
    print(f'wrote {path} ({len(records)} detections)')


def spatial_group(device: str) -> Any:
    """Under torchrun (``WORLD_SIZE`` > 1): every process takes a band of the image's
    rows (spatial parallelism); None for one process."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return None
    import torch.distributed as dist

    from mmlinattn.parallel import SpatialGroup
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    if device == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    return SpatialGroup.world()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from mmlinattn.engine import large_image as li

    group = spatial_group(args.device)
    try:
        return _main(args, li, group)
    finally:
        if group is not None:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()


def _main(args: argparse.Namespace, li: Any, group: Any) -> dict:
    image = load_image(args)
    model, scope = load_model(args.config, args.checkpoint, args.device)
    if group is not None:
        if scope != 'mmseg':
            raise ValueError('spatially parallel whole-image inference is for segmenters; run '
                             'detectors in one process (their heads are not sharded)')
        if args.compare:
            raise ValueError('--compare runs in one process; launch without torchrun')
        import torch.distributed as dist
        for t in list(model.parameters()) + list(model.buffers()):  # rank 0's weights
            dist.broadcast(t.data, group.global_rank(0), group=group.group)
    chunk = args.chunk_tokens or None
    h, w = image.shape[1:]
    ranks = '' if group is None else f'; rank {group.rank} of {group.size} (rows split)'
    print(f'{osp.basename(args.config)}: {h} x {w} image; backbone '
          f'{"chunked, " + str(chunk) + " tokens a band" if chunk else "unchunked"}; '
          f'tiles {args.tile} px, halo {args.halo} px{ranks}')
    report: dict = dict(image=[h, w], chunk_tokens=chunk, tile=args.tile, halo=args.halo)
    if scope == 'mmseg':
        (labels, info), report['ours'] = measured('whole-image (chunked)', args.device, lambda: (
            li.segment_large(model, image, chunk, args.tile, args.halo,
                             progress_bar('neck and head'), group=group)))
        report['ours'].update(backbone_s=info['backbone_s'], head_s=info['head_s'])
        print(f'  backbone {info["backbone_s"]:.1f} s, neck and head by tiles '
              f'{info["head_s"]:.1f} s')
        if group is not None:
            report['ours']['rank'] = group.rank
            report['ours']['comm'] = group.stats.as_dict()
        if args.out and (group is None or group.first):
            write_mask(labels, args.out)
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
    else:
        if args.compare:
            raise ValueError('--compare is for segmenters (mmseg configs)')
        (result, info), report['ours'] = measured('whole-image detection', args.device, lambda: (
            li.detect_large(model, image, chunk, args.tile, args.halo, not args.no_masks,
                            progress_bar('neck'))))
        report['ours'].update(info)
        print(f'  backbone {info["backbone_s"]:.1f} s, neck by tiles {info["neck_s"]:.1f} s, '
              f'heads {info["heads_s"]:.1f} s; {len(result.pred_instances)} detections')
        if args.out:
            write_detections(result, list(model.dataset_meta.get('classes', ()))
                             if getattr(model, 'dataset_meta', None) else [], args.out)
    return report


if __name__ == '__main__':
    main()
