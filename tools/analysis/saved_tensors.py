#!/usr/bin/env python
"""What autograd keeps for backward, per token, in InLine blocks and whole backbones.

    python tools/analysis/saved_tensors.py                     # stage-1 blocks of Swin-T and PVT-S
    python tools/analysis/saved_tensors.py --backbone inline-swin-t --size 512

Counts the distinct storages autograd saves during one forward (parameters
excluded; views of one tensor count once), in bytes per token of the block's map
and in units of one float32 token row (``4 * C`` bytes), under float32 and bf16
autocast, for global and windowed InLine attention.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmlinattn.utils import record_saved_tensors  # noqa: E402

#: Stage-1 blocks: (name, channels, heads, qkv layout, MLP ratio).
BLOCKS = [('InLine-Swin-T stage 1', 96, 3, 'qkv', 4), ('InLine-PVT-S stage 1', 64, 2, 'q_kv', 8)]


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, bf16: bool) -> int:
    with record_saved_tensors(exclude=module.parameters()) as saved, \
            torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        out = module(x)
    del out
    return saved.bytes


def blocks(side: int) -> None:
    from mmlinattn.models.layers import InLineAttention, TransformerBlock

    print(f'| block ({side}x{side} map) | InLine | autocast | block: B/token (fp32 rows) | '
          'attention: B/token (fp32 rows) |')
    print('|---|---|---|---|---|')
    for name, dim, heads, layout, ratio in BLOCKS:
        for window in (None, 7):
            block = TransformerBlock(dim, InLineAttention(dim, heads, qkv_layout=layout,
                                                          window_size=window), mlp_ratio=ratio)
            x = torch.randn(1, side, side, dim, requires_grad=True)
            for bf16 in (False, True):
                n = side * side
                b = saved_bytes(block, x, bf16) / n
                a = saved_bytes(block.attn, x, bf16) / n
                print(f"| {name} | {'global' if window is None else f'window {window}'} | "
                      f"{'bf16' if bf16 else 'off'} | {b:.0f} ({b / 4 / dim:.1f}) | "
                      f'{a:.0f} ({a / 4 / dim:.1f}) |')


def backbone(name: str, size: int) -> None:
    from mmlinattn.benchmark import backbone_contenders

    model = backbone_contenders()[name].build()
    model.train()
    x = torch.randn(1, 3, size, size)
    for bf16 in (False, True):
        total = saved_bytes(model, x, bf16)
        print(f"{name} at {size} px, autocast {'bf16' if bf16 else 'off'}: autograd keeps "
              f'{total / 2**20:.0f} MiB ({total / (size / 4)**2:.0f} B per stride-4 token)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--side', type=int, default=62, help='block map side (tokens)')
    parser.add_argument('--backbone', help='a benchmark contender: whole-backbone totals')
    parser.add_argument('--size', type=int, default=512, help='input side for --backbone')
    args = parser.parse_args(argv)
    if args.backbone:
        backbone(args.backbone, args.size)
    else:
        blocks(args.side)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
