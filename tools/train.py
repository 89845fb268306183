#!/usr/bin/env python
"""Train a detector or segmenter from an mmlinattn (or any mmdet/mmseg) config.

    python tools/train.py configs/detection/inline_swin/mask-rcnn_inline-swin-t_fpn_1x_coco.py
    bash tools/dist_train.sh <config> 8                       # 8 GPUs with torchrun

The config's default_scope (mmdet or mmseg) picks the library. Besides the
upstream flags this tool adds two checks to every run: training stops at the
first non-finite loss naming it, and a backbone/neck channel mismatch is
reported before the first iteration.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmlinattn.engine.launch import (  # noqa: E402
    add_common_arguments,
    add_fault_tolerance,
    add_safety_hooks,
    build_runner,
    check_data_roots,
    enable_amp,
    import_project,
    load_config,
    process_group_lifetime,
)
from mmlinattn.utils.precision import add_dtype_arguments, resolve_dtype  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector or segmenter')
    parser.add_argument('config', help='config file')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision (fp16 with loss scaling on GPU, bf16 on CPU): '
                        'on the CPU the same as --dtype bf16')
    add_dtype_arguments(parser)
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or (no value) from the latest one in '
        'the work dir')
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with process_group_lifetime():  # the launcher may start one in load_config
        import_project()
        cfg = load_config(args.config, args)
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        # --amp on a GPU is fp16 with loss scaling; on the CPU it is bf16, refused where
        # bf16 is emulated (unless --force-bf16).
        dtype = resolve_dtype('bf16' if args.amp and device == 'cpu' else args.dtype, device,
                              args.force_bf16)
        if args.amp or dtype == 'bf16':
            gpu_dtype = 'bfloat16' if dtype == 'bf16' and not args.amp else 'float16'
            print(f'mixed precision: {enable_amp(cfg, gpu_dtype)}')
        if args.resume == 'auto':
            from mmlinattn.engine.resume import pick_checkpoint
            cfg.resume = True
            cfg.load_from = pick_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
            print(f'resume: from {cfg.load_from}' if cfg.load_from else
                  f'resume: no complete checkpoint in {cfg.work_dir}; starting afresh')
        elif args.resume is not None:
            cfg.resume = True
            cfg.load_from = args.resume
        check_data_roots(cfg, ('train_dataloader', 'val_dataloader'))
        add_safety_hooks(cfg)
        add_fault_tolerance(cfg)
        runner = build_runner(cfg)
        from mmlinattn.parallel.watchdog import watch_group
        # A dead or stopped rank stops the group within the collective timeout.
        with watch_group(cfg.env_cfg.dist_cfg.timeout if cfg.launcher != 'none' else 300,
                         lambda: f'last iteration {runner.iter}'):
            runner.train()


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
