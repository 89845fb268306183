#!/usr/bin/env python
"""FLOPs and parameters of a config's model at a given input size, counted per operator.

    python tools/analysis/get_flops.py configs/detection/inline_swin/mask-rcnn_inline-swin-t_fpn_1x_coco.py --shape 800 1333
    python tools/analysis/get_flops.py <config> --shape 1024 2048 --backbone-only

Every matmul, convolution and attention product is counted by
``torch.utils.flop_counter`` (softmax attention through SDPA included, which
module-level counters skip). A multiply-add counts as 2 FLOPs; GMACs are half.
"""  # noqa: E501
from __future__ import annotations

import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmlinattn.engine.build import build_from_config, synthetic_batch  # noqa: E402
from mmlinattn.utils import count_flops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    parser.add_argument('--backbone-only', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)

    model, scope = build_from_config(args.config, args.cfg_options)
    model.eval()
    inputs, samples = synthetic_batch(model, scope, *args.shape)
    with torch.no_grad():
        if args.backbone_only:
            total, per_module = count_flops(model.backbone, inputs)
        else:
            total, per_module = count_flops(model._forward, inputs, samples)
    params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    h, w = inputs.shape[-2:]
    print(f'config: {args.config}')
    print(f'input: {args.shape[0]}x{args.shape[1]} (padded to {h}x{w})')
    print(f'FLOPs: {total / 1e9:.2f} G ({total / 2e9:.2f} GMACs)')
    # The counter names each top-level call by its module's class.
    for part in ('backbone', 'neck', 'rpn_head', 'roi_head', 'bbox_head', 'decode_head'):
        module = getattr(model, part, None)
        key = type(module).__name__ if module is not None else None
        if key in per_module:
            print(f'  {part} ({key}): {per_module[key] / 1e9:.2f} G')
    print(f'params: {params / 1e6:.2f} M (backbone {backbone_params / 1e6:.2f} M)')
    return 0


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
