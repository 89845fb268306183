#!/usr/bin/env python
"""Does mixed precision change training? The same steps in float32 and under autocast.

    python tools/analysis/amp_check.py configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py --steps 20

Builds the config's model twice from one initialisation, trains each on the same
synthetic batches (the config's crop size, its batch size) for ``--steps`` steps
of its own optimizer settings (fp32 ``OptimWrapper``; bf16 ``CPUAutocastOptimWrapper``
on the CPU, ``AmpOptimWrapper`` on a GPU) and prints both losses per step, their
relative difference and the time per step.
"""
from __future__ import annotations

import argparse
import copy
import os.path as osp
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmlinattn.engine.build import build_from_config, synthetic_train_batch  # noqa: E402


def _wrapper(model, cfg, dtype: str, device: str):
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from mmengine.registry import OPTIMIZERS

    from mmlinattn.engine import CPUAutocastOptimWrapper

    opt_cfg = copy.deepcopy(cfg.optim_wrapper.optimizer)
    opt_cfg['params'] = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS.build(opt_cfg)
    if dtype == 'fp32':
        return OptimWrapper(optimizer)
    if device == 'cpu':
        return CPUAutocastOptimWrapper(optimizer, dtype='bfloat16')
    return AmpOptimWrapper(optimizer=optimizer, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    from mmengine.config import Config

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--dtype', choices=['bf16', 'fp16'], default='bf16')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help="default: the config's crop size")
    args = parser.parse_args(argv)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = Config.fromfile(args.config)
    torch.manual_seed(0)
    model, scope = build_from_config(cfg)
    size = args.size or cfg.get('crop_size', (512, 512))
    batch = cfg.get('train_dataloader', {}).get('batch_size', 2)
    batches = [synthetic_train_batch(model, scope, *size, batch=batch, seed=i)
               for i in range(args.steps)]
    runs = {}
    for dtype in ('fp32', args.dtype):
        run_model = copy.deepcopy(model).to(device).train()
        wrapper = _wrapper(run_model, cfg, dtype, device)
        losses, times = [], []
        for data in batches:
            t0 = time.perf_counter()
            log = run_model.train_step(data, wrapper)
            times.append(time.perf_counter() - t0)
            losses.append(float(log['loss']))
        runs[dtype] = (losses, times)
    (ref, t_ref), (amp, t_amp) = runs['fp32'], runs[args.dtype]
    print(f'| step | fp32 loss | {args.dtype} loss | relative difference |')
    print('|---|---|---|---|')
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, amp)):
        rel = abs(b - a) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f'| {i} | {a:.5f} | {b:.5f} | {rel:.2%} |')
    mid = len(t_ref) // 2
    t32, tlo = sorted(t_ref)[mid], sorted(t_amp)[mid]
    print(f'\nlargest relative difference: {worst:.2%}; median step {t32:.2f} s (fp32) vs '
          f'{tlo:.2f} s ({args.dtype}): {tlo / t32:.2f}x, {size[0]}x{size[1]}, batch {batch}, '
          f'{device}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
