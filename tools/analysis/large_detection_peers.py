#!/usr/bin/env python
"""Detection on a large scene with known answers: ours against the tools people use.

    python tools/make_shapes_scene.py data/scene/s4096.tif --size 4096 4096
    python tools/analysis/large_detection_peers.py \\
        configs/tiny/mask-rcnn_inline-pvt-t_fpn_300i_tiny-coco.py \\
        work_dirs/learn_det/iter_300.pth data/scene/s4096.tif --report peers.json

The same trained detector, four ways, one after the other in this process:

* ``ours``: the global backbone by bands, neck and heads by tiles with a margin, one
  responsible tile per object (``tools/infer_large.py`` by regions); with ``--coarse F``
  also ``ours-coarse``: the same with a pass ``F`` times coarser for objects larger than
  the margin.
* ``sahi``: SAHI's ``get_sliced_prediction`` with its defaults (automatic slice size,
  0.2 overlap, a standard whole-image pass added, greedy non-maximum merging on
  intersection over smaller at 0.5, confidence 0.3), each slice predicted by the same
  model at the image's own scale (the ``sahi`` package; ``pip install --no-deps sahi``).
* ``mmdet-demo``: MMDetection's ``demo/large_image_demo.py`` recipe: 640 px patches,
  0.25 overlap, merged by NMS at IoU 0.25 (``mmdet.utils.large_image``), boxes only
  (its masks are image-sized bitmaps, one per instance).
* ``whole``: mmdet's heads on the whole image's pyramid (the reference where it fits;
  with the budgets of ours: by score, or with ``--count-budgets`` scaled to the density
  of those of ours, a tile's budget for each head region's area; masks pasted over
  their boxes).

For each: time, peak memory in use, COCO AP (bbox, and segm where masks are kept) on
the scene's ground truth, recall at a score threshold for objects crossing a seam of
``--tile`` and for objects inside a tile, duplicates (pairs of same-class detections
overlapping by more than half of the smaller, per ground-truth object), split objects
(two or more same-class detections each mostly inside one object and none covering it)
and, with masks, the mean mask IoU of matched objects at seams and inside. ``whole``
is also matched one to one against ``ours`` (same class, box IoU >= 0.95, score
within 1e-3).
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmlinattn.rasters.objects import DetectedObject, image_rle  # noqa: E402

METHODS = ('ours', 'ours-coarse', 'sahi', 'mmdet-demo', 'whole')


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its seconds and its peak memory in use (GiB)."""
    from mmlinattn.benchmark.memory import MemoryWatch
    with MemoryWatch() as watch:
        start = time.perf_counter()
        out = fn()
    return out, time.perf_counter() - start, (watch.peak - watch.start) / 2**30


def _bgr(reader: Any) -> np.ndarray:
    out = np.empty((reader.height, reader.width, 3), np.uint8)
    for y in range(0, reader.height, 1024):
        out[y:y + 1024] = reader.read(y, min(reader.height, y + 1024))
    return out


def predict_array(model: Any, bgr: np.ndarray) -> Any:
    """mmdet's prediction of one image at its own scale (padded as mmdet pads)."""
    from mmlinattn.engine.large_image import prepare_image
    x, samples, _ = prepare_image(model, torch.from_numpy(bgr).permute(2, 0, 1).contiguous(),
                                  'mmdet')
    with torch.no_grad():
        return model.predict(x, samples, rescale=True)[0].pred_instances


def _tiling(args: argparse.Namespace, coarse: int = 0) -> Any:
    from mmlinattn.engine.tiled_detection import DetectionTiling
    return DetectionTiling(args.tile, args.margin, args.halo, budget_scale=args.budget_scale,
                           proposal_thr=None if args.count_budgets else args.proposal_thr,
                           coarse=coarse, nested_ios=args.nested_ios)


def run_ours(model: Any, reader: Any, args: argparse.Namespace, coarse: int = 0
             ) -> list[DetectedObject]:
    from mmlinattn.engine.detection_files import detect_file
    info = detect_file(model, reader, [], chunk_tokens=65536, keep_objects=True,
                       tiling=_tiling(args, coarse))
    print(f'  ours: {info["tiles"]} tiles, {info["objects"]} objects ({info["merged"]} merged '
          f'from {info["truncated"]} cut parts); budgets {info["budgets"]}, reached '
          f'{info["budget_reached"]}' + (f'; coarse pass {info["coarse"]}' if 'coarse' in info
                                         else ''))
    return info['objects_list']


def run_whole(model: Any, reader: Any, args: argparse.Namespace) -> list[DetectedObject]:
    from mmlinattn.engine.large_image import detect_large
    from mmlinattn.engine.tiled_detection import (
        detection_budgets,
        local_mask_paste,
        result_objects,
        suppress_nested,
        threaded_roi_pooling,
    )
    # The same budgets as ours: by score, or by count at the same density (a tile's
    # budget for each head region's area).
    side = args.tile + 2 * (args.margin + args.halo)
    regions = max(1.0, reader.height * reader.width / side ** 2)
    image = torch.from_numpy(_bgr(reader)).permute(2, 0, 1).contiguous()
    with local_mask_paste(model), threaded_roi_pooling(model), \
            detection_budgets(model, _tiling(args), regions) as budgets:
        result, _ = detect_large(model, image, 65536, args.tile, args.halo, masks=True)
    print(f'  whole: budgets {budgets}')
    return result_objects(suppress_nested(result.pred_instances, args.nested_ios))


def _instances_objects(inst: Any, dx: int = 0, dy: int = 0) -> list[DetectedObject]:
    boxes = inst.bboxes.double()
    return [DetectedObject(int(inst.labels[i]), float(inst.scores[i]),
                           (boxes[i, 0].item() + dx, boxes[i, 1].item() + dy,
                            boxes[i, 2].item() + dx, boxes[i, 3].item() + dy))
            for i in range(len(boxes))]


def run_sahi(model: Any, reader: Any, args: argparse.Namespace) -> list[DetectedObject]:
    from sahi.models.base import DetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.prediction import ObjectPrediction

    from mmlinattn.engine.large_image import _without_masks

    class SameDetector(DetectionModel):
        """The detector under test, one slice (RGB, as SAHI reads) at a time."""

        def set_model(self, model: Any, **kwargs: Any) -> None:
            self.model = model
            names = (getattr(model, 'dataset_meta', None) or {}).get('classes') or []
            self.category_mapping = {str(i): n for i, n in enumerate(names)}

        def load_model(self) -> None:
            raise RuntimeError('the model is given')

        def perform_inference(self, image: np.ndarray) -> None:
            with _without_masks(self.model, True):
                self._original_predictions = predict_array(self.model,
                                                           np.ascontiguousarray(image[..., ::-1]))

        def _create_object_prediction_list_from_original_predictions(
                self, shift_amount_list: Any = None, full_shape_list: Any = None) -> None:
            from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list
            shift = (fix_shift_amount_list(shift_amount_list) or [[0, 0]])[0]
            full = (fix_full_shape_list(full_shape_list) or [None])[0]
            inst = self._original_predictions
            preds = []
            for i in range(len(inst)):
                score = float(inst.scores[i])
                if score < self.confidence_threshold:
                    continue
                label = int(inst.labels[i])
                preds.append(ObjectPrediction(
                    bbox=inst.bboxes[i].tolist(), category_id=label,
                    category_name=self.category_mapping.get(str(label), str(label)),
                    score=score, shift_amount=list(shift), full_shape=full))
            self._object_prediction_list_per_image = [preds]

    detector = SameDetector(model=model, confidence_threshold=0.3, device='cpu')
    result = get_sliced_prediction(_bgr(reader)[..., ::-1].copy(), detector, verbose=0)
    out = []
    for p in result.object_prediction_list:
        x0, y0, x1, y1 = p.bbox.to_xyxy()
        out.append(DetectedObject(int(p.category.id), float(p.score.value), (x0, y0, x1, y1)))
    return out


def run_mmdet_demo(model: Any, reader: Any, args: argparse.Namespace) -> list[DetectedObject]:
    from mmdet.utils.large_image import merge_results_by_nms
    from sahi.slicing import slice_image

    from mmlinattn.engine.large_image import _without_masks
    bgr = _bgr(reader)
    sliced = slice_image(bgr, slice_height=640, slice_width=640, auto_slice_resolution=False,
                         overlap_height_ratio=0.25, overlap_width_ratio=0.25)
    from mmdet.structures import DetDataSample
    results = []
    with _without_masks(model, True):
        for patch in sliced.images:
            sample = DetDataSample()
            sample.pred_instances = predict_array(model, np.ascontiguousarray(patch))
            results.append(sample)
    if not any(len(r.pred_instances) for r in results):
        return []
    merged = merge_results_by_nms(results, sliced.starting_pixels,
                                  src_image_shape=(reader.height, reader.width),
                                  nms_cfg=dict(type='nms', iou_threshold=0.25))
    inst = merged.pred_instances
    inst = inst[inst.scores >= 0.3]
    return _instances_objects(inst)


RUNNERS = dict(ours=run_ours, whole=run_whole, sahi=run_sahi)
RUNNERS['mmdet-demo'] = run_mmdet_demo
RUNNERS['ours-coarse'] = lambda model, reader, args: run_ours(model, reader, args, args.coarse)


# -- measures ---------------------------------------------------------------------------
def _boxes(objs: list) -> np.ndarray:
    return np.array([o.bbox for o in objs], np.float64).reshape(-1, 4)


def _pairwise(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections and both areas of every pair of boxes (x0, y0, x1, y1)."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0],
                                                                       b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1],
                                                                       b[None, :, 1]), 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return ix * iy, area_a[:, None], area_b[None, :]


def _gt_objects(gt: dict) -> list[DetectedObject]:
    out = []
    for a in gt['annotations']:
        x, y, w, h = a['bbox']
        out.append(DetectedObject(a['category_id'] - 1, 1.0, (x, y, x + w, y + h),
                                  extra=dict(seam=a['seam'], large=a['large'], rle=a[
                                      'segmentation'])))
    return out


def coco_ap(gt: dict, objs: list[DetectedObject], h: int, w: int, segm: bool) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    coco = COCO()
    coco.dataset = {k: v for k, v in gt.items()}
    coco.dataset['annotations'] = [{k: v for k, v in a.items() if k not in ('seam', 'large')}
                                   for a in gt['annotations']]
    coco.createIndex()
    out = {}
    kinds = ['bbox'] + (['segm'] if segm else [])
    for kind in kinds:
        dets = []
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            d = dict(image_id=1, category_id=o.label + 1, bbox=[x0, y0, x1 - x0, y1 - y0],
                     score=o.score)
            if kind == 'segm':
                d['segmentation'] = image_rle(o.mask, h, w)
            dets.append(d)
        if not dets:
            out[kind] = dict(AP=0.0, AP50=0.0, AP75=0.0)
            continue
        res = coco.loadRes(dets)
        ev = COCOeval(coco, res, kind)
        ev.params.maxDets = [1, 100, 10**6]
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        # From the precision table (summarize() reads AP at 100 detections, whatever
        # maxDets says): all areas, the last maxDets.
        prec = ev.eval['precision'][:, :, :, 0, -1]  # IoU thresholds x recall x classes

        def mean(p: np.ndarray) -> float:
            return float(p[p > -1].mean()) if (p > -1).any() else 0.0
        out[kind] = dict(AP=mean(prec), AP50=mean(prec[0]), AP75=mean(prec[5]))
    return out


def seam_measures(gt: list[DetectedObject], objs: list[DetectedObject], thr: float,
                  h: int, w: int) -> dict:
    """Recall at seams and inside, duplicates, split objects, mask IoU (see the module)."""
    from pycocotools import mask as mask_util
    dets = [o for o in objs if o.score >= thr]
    out: dict = dict(detections=len(dets))
    gb, db = _boxes(gt), _boxes(dets)
    matched = np.zeros(len(gt), bool)
    mask_iou: dict = dict(seam=[], inside=[])
    if len(dets) and len(gt):
        inter, ga, da = _pairwise(gb, db)
        iou = inter / (ga + da - inter + 1e-9)
        same = np.array([o.label for o in gt])[:, None] == np.array([o.label for o in dets])[None]
        iou = np.where(same, iou, 0)
        used = np.zeros(len(dets), bool)
        for j in np.argsort([-o.score for o in dets]):
            cand = np.where(~matched & (iou[:, j] >= 0.5))[0]
            if len(cand):
                i = cand[np.argmax(iou[cand, j])]
                matched[i], used[j] = True, True
                if dets[j].mask is not None:
                    g = gt[i].extra['rle']
                    d = image_rle(dets[j].mask, h, w)
                    v = float(mask_util.iou([d], [g], [0])[0][0])
                    mask_iou['seam' if gt[i].extra['seam'] else 'inside'].append(v)
        inside = inter / da  # the share of each detection inside each object
        parts = same & (inside >= 0.7) & (iou < 0.7)
        covered = (same & (iou >= 0.7)).any(axis=1)
        out['split'] = int(((parts.sum(axis=1) >= 2) & ~covered).sum())
        # Duplicates: pairs of same-class detections overlapping by > half the smaller.
        inter_d, a1, a2 = _pairwise(db, db)
        ios = inter_d / (np.minimum(a1, a2) + 1e-9)
        labels = np.array([o.label for o in dets])
        dup = np.triu((ios > 0.5) & (labels[:, None] == labels[None]), 1)
        out['duplicates'] = int(dup.sum())
    else:
        out['split'] = out['duplicates'] = 0
    seam = np.array([o.extra['seam'] for o in gt], bool)
    large = np.array([o.extra['large'] for o in gt], bool)
    for name, sel in (('seam', seam & ~large), ('inside', ~seam & ~large), ('large', large)):
        out[f'recall_{name}'] = float(matched[sel].mean()) if sel.any() else float('nan')
        out[f'objects_{name}'] = int(sel.sum())
    out['duplicates_per_object'] = out['duplicates'] / max(1, len(gt))
    for k, v in mask_iou.items():
        out[f'mask_iou_{k}'] = float(np.mean(v)) if v else float('nan')
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('scene', help='a tiled TIFF from tools/make_shapes_scene.py')
    p.add_argument('--gt', help='its ground truth (default: the scene with .json)')
    p.add_argument('--methods', nargs='+', choices=METHODS,
                   help='default: all (ours-coarse with --coarse)')
    p.add_argument('--tile', type=int, default=2048)
    p.add_argument('--margin', type=int, default=256)
    p.add_argument('--halo', type=int, default=256)
    p.add_argument('--proposal-thr', type=float, default=0.05,
                   help='ours and whole: budgets by score, every proposal whose objectness '
                   'reaches this (see infer_large.py)')
    p.add_argument('--count-budgets', action='store_true',
                   help="ours and whole: the config's budgets by count instead, a tile's "
                   'scaled by its area (see infer_large.py --budget-scale); the whole image '
                   'gets the same density')
    p.add_argument('--budget-scale', type=float,
                   help='with --count-budgets: the factor of a tile (infer_large.py '
                   '--budget-scale)')
    p.add_argument('--nested-ios', type=float, default=0.5,
                   help='ours and whole: nested detections dropped (infer_large.py '
                   '--nested-ios; 1 keeps them)')
    p.add_argument('--coarse', type=int, default=0, metavar='F',
                   help="also 'ours-coarse': ours with a coarse pass F times coarser for "
                   'objects larger than twice the margin (infer_large.py --coarse)')
    p.add_argument('--second-tile', type=int,
                   help="also run ours with cores of this size and match its objects with "
                   "the first run's (same class, box IoU >= 0.95, score within 1e-3)")
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='detections counted for recall, duplicates and splits')
    p.add_argument('--report', help='write the figures as JSON here')
    args = p.parse_args(argv)

    from mmlinattn.engine.build import build_from_config, load_weights
    from mmlinattn.rasters import open_image
    model, _ = build_from_config(args.config)
    print(load_weights(model, args.checkpoint))
    model.eval()
    reader = open_image(args.scene)
    with open(args.gt or osp.splitext(args.scene)[0] + '.json') as f:
        gt = json.load(f)
    h, w = reader.height, reader.width
    gt_objs = _gt_objects(gt)
    print(f'{args.scene}: {h} x {w}, {len(gt_objs)} objects '
          f'({sum(o.extra["seam"] for o in gt_objs)} across seams of {args.tile} px, '
          f'{sum(o.extra["large"] for o in gt_objs)} large)')
    report: dict = dict(scene=args.scene, size=[h, w], objects=len(gt_objs), tile=args.tile,
                        margin=args.margin, halo=args.halo, score_thr=args.score_thr,
                        methods={})
    kept: dict = {}
    methods = args.methods or [m for m in METHODS if m != 'ours-coarse' or args.coarse]
    if 'ours-coarse' in methods and not args.coarse:
        p.error('ours-coarse needs --coarse F')
    for name in methods:
        print(f'{name} ...', flush=True)
        try:
            run = RUNNERS[name]
            objs, seconds, peak = measured(lambda: run(model, reader, args))  # noqa: B023
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            print(f'  {name} failed: {type(e).__name__}: {e}')
            report['methods'][name] = dict(error=f'{type(e).__name__}: {e}')
            continue
        kept[name] = objs
        masks = all(o.mask is not None for o in objs) and bool(objs)
        row = dict(seconds=seconds, peak_gib=peak, **coco_ap(gt, objs, h, w, masks),
                   **seam_measures(gt_objs, objs, args.score_thr, h, w))
        report['methods'][name] = row
        print('  ' + json.dumps(row))
    if 'ours' in kept and 'whole' in kept:
        from mmlinattn.engine.tiled_detection import match_detections
        report['ours_vs_whole'] = match_detections(kept['ours'], kept['whole'])
        sure = [[o for o in kept[k] if o.score >= args.score_thr] for k in ('ours', 'whole')]
        report['ours_vs_whole_above_thr'] = match_detections(*sure)
        print('ours vs whole: ' + json.dumps(report['ours_vs_whole']) + f'; scoring >= '
              f'{args.score_thr}: ' + json.dumps(report['ours_vs_whole_above_thr']))
    if args.second_tile and 'ours' in kept:
        from mmlinattn.engine.tiled_detection import match_detections
        other = argparse.Namespace(**dict(vars(args), tile=args.second_tile))
        objs, seconds, _ = measured(lambda: run_ours(model, reader, other))
        report['second_tile'] = dict(tile=args.second_tile, seconds=seconds,
                                     **match_detections(objs, kept['ours']))
        report['second_tile_above_thr'] = match_detections(
            [o for o in objs if o.score >= args.score_thr],
            [o for o in kept['ours'] if o.score >= args.score_thr])
        print(f'ours with {args.second_tile} px tiles vs {args.tile} px: '
              + json.dumps(report['second_tile']) + '; scoring >= thr: '
              + json.dumps(report['second_tile_above_thr']))
    print(table(report))
    if args.report:
        with open(args.report, 'w') as f:
            json.dump(report, f, indent=1)
    return report


def table(report: dict) -> str:
    """The report as a Markdown table."""
    rows = ['| method | s | GiB | bbox AP | segm AP | recall seam | recall inside | '
            'recall large | duplicates / object | split | mask IoU seam / inside |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
    for name, r in report['methods'].items():
        if 'error' in r:
            rows.append(f'| {name} | {r["error"]} |' + ' |' * 9)
            continue
        segm = f'{r["segm"]["AP"]:.3f}' if 'segm' in r else '-'
        mi = (f'{r["mask_iou_seam"]:.3f} / {r["mask_iou_inside"]:.3f}'
              if r['mask_iou_seam'] == r['mask_iou_seam'] else '-')
        rows.append(f'| {name} | {r["seconds"]:.1f} | {r["peak_gib"]:.2f} | '
                    f'{r["bbox"]["AP"]:.3f} | {segm} | {r["recall_seam"]:.3f} | '
                    f'{r["recall_inside"]:.3f} | {r["recall_large"]:.3f} | '
                    f'{r["duplicates_per_object"]:.4f} | {r["split"]} | {mi} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    main()
