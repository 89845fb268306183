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

from mmlinattn.utils import count_flops  # noqa: E402


def build_model(config: str, cfg_options: dict | None = None):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    import mmlinattn  # noqa: F401

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.model.get('backbone', {}).get('init_cfg'):
        cfg.model.backbone.init_cfg = None
    scope = cfg.get('default_scope', 'mmdet')
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model)
    return model.eval(), scope


def model_inputs(model, scope: str, h: int, w: int):
    """Preprocessed ``(inputs, data_samples)`` for one ``h x w`` image."""
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1., 1.),
                batch_input_shape=(h, w))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=meta)
    else:
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=meta)
    data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), False)
    return data['inputs'], data['data_samples']


def main(argv: list[str] | None = None) -> int:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    parser.add_argument('--backbone-only', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)

    model, scope = build_model(args.config, args.cfg_options)
    inputs, samples = model_inputs(model, scope, *args.shape)
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
    raise SystemExit(main())
