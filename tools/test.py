#!/usr/bin/env python
"""Evaluate a checkpoint of a detector or segmenter on its config's test set.

    python tools/test.py <config> <checkpoint> [--show-dir vis]
    bash tools/dist_test.sh <config> <checkpoint> 8

Prints the config's metrics (COCO bbox/segm mAP for mmdet, mIoU for mmseg).
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmlinattn.engine.build import clear_pretrained  # noqa: E402
from mmlinattn.engine.launch import (  # noqa: E402
    add_common_arguments,
    add_safety_hooks,
    build_runner,
    check_data_roots,
    import_project,
    load_config,
    process_group_lifetime,
)
from mmlinattn.utils.precision import add_dtype_arguments, resolve_dtype  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--show-dir', help='save images with drawn predictions here '
                        '(relative to the work dir / timestamp for mmdet)')
    add_common_arguments(parser)
    add_dtype_arguments(parser)
    return parser.parse_args(argv)


def enable_drawing(cfg, show_dir: str) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show-dir needs a visualization hook in default_hooks')
    hook['draw'] = True
    if cfg.default_scope == 'mmdet':
        hook['test_out_dir'] = show_dir
    else:
        cfg.visualizer['save_dir'] = show_dir
        hook['interval'] = 1


def bf16_test_step(model, device: str) -> None:
    """``model.test_step`` under bf16 autocast, its predictions handed to the metrics in
    float32 (numpy, and so the metrics, have no bfloat16), with mmcv's NMS and RoIAlign
    in float32 (see ``mmlinattn.ops.mmcv_autocast``)."""
    from mmengine.structures import BaseDataElement

    from mmlinattn.ops.mmcv_autocast import float32_mmcv_ops
    float32_mmcv_ops()
    step = model.test_step

    def as_float32(element):
        for key in list(element.keys()):
            value = getattr(element, key)
            if isinstance(value, BaseDataElement):
                as_float32(value)
            elif isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
                setattr(element, key, value.float())
        return element

    def test_step(data):
        with torch.autocast(device, dtype=torch.bfloat16):
            outputs = step(data)
        return [as_float32(o) if isinstance(o, BaseDataElement) else o for o in outputs]
    model.test_step = test_step
    print('testing in bf16 (autocast)')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with process_group_lifetime():  # the launcher may start one in load_config
        import_project()
        cfg = load_config(args.config, args)
        if not osp.isfile(args.checkpoint):
            raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
        cfg.load_from = args.checkpoint
        clear_pretrained(cfg)  # the checkpoint replaces the backbone's ImageNet weights
        if args.show_dir:
            enable_drawing(cfg, args.show_dir)
        check_data_roots(cfg, ('test_dataloader', ))
        add_safety_hooks(cfg)
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        dtype = resolve_dtype(args.dtype, device, args.force_bf16)
        runner = build_runner(cfg)
        if dtype == 'bf16':
            bf16_test_step(runner.model, device)
        metrics = runner.test()
        print('metrics: ' + ', '.join(f'{k}={v}' for k, v in metrics.items()))


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
