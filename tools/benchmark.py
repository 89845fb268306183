#!/usr/bin/env python
"""High-resolution benchmark: does linear attention make large inputs affordable?

The default run (no arguments) times InLine-Swin-T, Swin-T (mmdet), InLine-PVT-S and
PVT-S (mmdet) backbones at 512, 1024 and 2048 px, inference on the CPU, every
contender at every size, and prints a verdict computed from it first (about
5 minutes: 4 min 45 s here on 2 cores). A contender too slow for a warm-up and a timed call at
a size (PVT-S at 2048 px) gets one timed call there, its own warm-up (see the notes).

    python tools/benchmark.py                       # the default run
    python tools/benchmark.py --level attention     # the operators alone, N up to 512x512
    python tools/benchmark.py --level backbone --contenders all --sizes 512 1024 2048
    python tools/benchmark.py --level model --configs configs/detection/inline_swin/mask-rcnn_inline-swin-t_fpn_1x_coco.py --sizes 800 1600
    python tools/benchmark.py --device cuda --dtype bf16 --sizes 1024 2048 4096
    python tools/benchmark.py --mode train --with-cp both --sizes 512 1024   # training steps
    python tools/benchmark.py --level model --mode train --configs <config.py> --sizes 512
    python tools/benchmark.py --find-max-size --mem-limit 16   # largest input that fits

Every case runs in its own worker process (so peak memory is that case's); a
case that runs out of memory or time is recorded with the limit and the sweep
goes on. ``--mode train`` times whole training steps (forward, backward, AdamW
step; at the model level the model's own train_step on a synthetic batch with
ground truth). ``--find-max-size`` searches, per contender, the largest square
input whose inference forward and whose training step fit --mem-limit (each probe
in its own worker). Results go to work_dirs/benchmark/<timestamp>/: results.json
(every figure and the environment), results.md (the tables) and log-log plots.
"""  # noqa: E501
from __future__ import annotations

import argparse
import datetime
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmlinattn.benchmark import (  # noqa: E402
    ATTENTION_CONTENDERS,
    DEFAULT_BACKBONES,
    SweepConfig,
    backbone_contenders,
    default_mem_limit_gib,
    find_max_sizes,
    run_sweep,
    write_outputs,
)

#: What ``--help`` says first.
DEFAULT_RUN = ('Without options, the default run: InLine-Swin-T, Swin-T (mmdet), InLine-PVT-S and '
               'PVT-S (mmdet)\nbackbones at 512, 1024 and 2048 px, inference on the CPU, every '
               'contender at every size,\na verdict computed from the run printed first; about '
               '5 minutes on 2 cores (4 min 45 s measured).')
DEFAULT_SIZES = {'attention': [64, 128, 256, 512], 'backbone': [512, 1024, 2048],
                 'model': [512, 1024]}
COMPARISONS = [('inline-swin-t', 'swin-t (mmdet)'), ('inline-swin-t', 'swin-t-global-softmax'),
               ('inline-swin-t-w56', 'swin-t (mmdet)'), ('inline-pvt-s', 'pvt-s (mmdet)'),
               ('inline-pvt-t', 'pvt-t (mmdet)'), ('inline-pvt-s', 'pvtv2-b2 (mmdet)'),
               ('inline-pvt-s', 'inline-pvt-s (authors)'),
               ('inline-pvt-t', 'pvtv2-b1 (mmdet)'), ('inline-cswin-t', 'cswin-t-global-softmax'),
               ('inline-deit-s', 'deit-s-global-softmax'), ('inline', 'softmax'),
               ('inline', 'linear'),
               # The sibling linear attentions on the same layouts (docs/sibling_attentions.md).
               ('flatten-swin-t', 'swin-t (mmdet)'), ('agent-swin-t', 'swin-t (mmdet)'),
               ('mlla-t', 'swin-t (mmdet)'), ('inline-swin-t', 'flatten-swin-t'),
               ('inline-swin-t', 'agent-swin-t'), ('flatten-pvt-s', 'pvt-s (mmdet)'),
               ('agent-pvt-s', 'pvt-s (mmdet)'), ('inline-pvt-s', 'flatten-pvt-s'),
               ('inline-pvt-s', 'agent-pvt-s')]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage='%(prog)s [options]\n\n' + DEFAULT_RUN + '\n(the options follow the description)')
    p.add_argument('--level', nargs='+', choices=['attention', 'backbone', 'model'],
                   default=['backbone'])
    p.add_argument('--contenders', nargs='+',
                   help='names, or "all" (backbone: ' + ', '.join(backbone_contenders()) +
                   '; attention: ' + ', '.join(ATTENTION_CONTENDERS) + ')')
    p.add_argument('--configs', nargs='+', default=[],
                   help='config files for the model level')
    p.add_argument('--sizes', type=int, nargs='+',
                   help='input sides in px (attention level: token-map sides); default '
                   'backbone 512 1024 2048, attention 64 128 256 512, model 512 1024')
    p.add_argument('--mode', choices=['infer', 'train'],
                   help='infer: a forward without autograd (default); train: a whole training '
                   'step. With --find-max-size: only this mode (default both)')
    p.add_argument('--with-cp', choices=['off', 'on', 'both'], default='off',
                   help='activation checkpointing in training steps; both: every contender '
                   'twice, the checkpointed one as "<name> +cp"')
    p.add_argument('--find-max-size', action='store_true',
                   help='instead of timing sizes: the largest square side (a multiple of '
                   '--max-size-step) that fits --mem-limit, per contender and mode, by bisection')
    p.add_argument('--max-size-step', type=int, default=32,
                   help='the search resolution in px, a multiple of 32 (default 32; coarser '
                   'steps need fewer of the slow large probes)')
    p.add_argument('--max-size-range', type=int, nargs=2, default=(512, 8192),
                   metavar=('START', 'LIMIT'), help='the search starts at START px and stops '
                   'at LIMIT px (default 512 8192)')
    p.add_argument('--spatial-ranks', type=int, default=1, metavar='R',
                   help='spatial parallelism: each image split by rows over R processes '
                   '(gloo), each its own memory (--mem-limit is per rank); backbone and '
                   'model levels; reports the bytes each rank sends against ring attention')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--dtype', nargs='+', choices=['fp32', 'bf16', 'fp16', 'auto'],
                   default=['fp32'],
                   help='compute precision (autocast for bf16/fp16); auto = bf16 where the '
                   'CPU (AVX512-BF16, AMX-BF16) or GPU computes it natively, else fp32; bf16 '
                   'is refused where it is emulated unless --force-bf16. Several (e.g. '
                   '--dtype fp32 bf16): a sweep each, in one run, and a table of each '
                   "contender's time over its fp32 time")
    p.add_argument('--force-bf16', action='store_true',
                   help='measure --dtype bf16 even where bf16 is emulated (much slower)')
    p.add_argument('--compile', action='store_true', help='torch.compile each contender')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch decides)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5, help='timed calls per case (at most)')
    p.add_argument('--budget', type=float, default=None,
                   help='seconds of measuring per case (default 30 on CPU, 60 on CUDA); a '
                   'size predicted to exceed it is recorded as "over budget"')
    p.add_argument('--mem-limit', type=float, default=default_mem_limit_gib(),
                   help='GiB of memory in use (heap bytes allocated, not RSS) per worker '
                   'before it stops as "oom" (default: 70%% of this machine\'s memory, '
                   '%(default)s GiB)')
    p.add_argument('--no-flops', action='store_true')
    p.add_argument('--system-malloc', action='store_true',
                   help="glibc's default: large freed blocks go back to the kernel and are "
                   'faulted in again each call (by default workers keep them, for every '
                   'contender alike)')
    p.add_argument('--no-plots', action='store_true')
    p.add_argument('--no-ceiling', action='store_true',
                   help="skip measuring this machine's fp32/bf16 GEMM ceiling and memory "
                        'bandwidth (by default measured first and every case reported '
                        'against it)')
    p.add_argument('--out-dir', help='default work_dirs/benchmark/<timestamp>')
    return p.parse_args(argv)


def _progress_printer(total: int | None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn('[bold]{task.description}'), BarColumn(),
                   TextColumn('{task.completed}/{task.total}'), TimeElapsedColumn())
    task = bar.add_task('benchmark', total=total)

    def update(case: dict) -> None:
        status = case['status']
        shown = f"{case['latency_ms']:.1f} ms" if status == 'ok' else status
        if case.get('peak_mem_mib') is not None:
            shown += f", {case['peak_mem_mib']:.0f} MiB"
        bar.console.print(f"  {case['level']:9s} {case.get('mode', 'infer'):5s} "
                          f"{case['contender']:24s} {case['size']:>5d}: {shown}")
        bar.advance(task)

    return bar, update


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmlinattn.utils.precision import resolve_dtype
    args.dtype = list(dict.fromkeys(
        d if d == 'fp16' else resolve_dtype(d, args.device, args.force_bf16)
        for d in args.dtype))
    budget = args.budget if args.budget is not None else (60.0 if args.device == 'cuda'
                                                          else 30.0)
    sweeps = []
    for level in args.level:
        if level == 'model':
            if not args.configs:
                raise SystemExit('--level model needs --configs <config.py> ...')
            names = args.configs
        elif args.contenders in (None, []):
            names = list(DEFAULT_BACKBONES) if level == 'backbone' else list(ATTENTION_CONTENDERS)
        else:
            backbones = backbone_contenders()
            table = backbones if level == 'backbone' else ATTENTION_CONTENDERS
            names = list(table) if args.contenders == ['all'] else [
                n for n in args.contenders if n in table]
            unknown = [n for n in args.contenders if n != 'all' and n not in
                       backbones and n not in ATTENTION_CONTENDERS]
            if unknown:
                raise SystemExit(f'unknown contenders {unknown}')
        sweeps += [SweepConfig(
            level=level, contenders=names, sizes=args.sizes or DEFAULT_SIZES[level],
            batch=args.batch, device=args.device, dtype=dtype, compile=args.compile,
            threads=args.threads, warmup=args.warmup, repeats=args.repeats, budget_s=budget,
            mem_limit_gib=args.mem_limit, flops=not args.no_flops,
            steady_malloc=not args.system_malloc, mode=args.mode or 'infer',
            with_cp=args.with_cp, spatial_ranks=args.spatial_ranks) for dtype in args.dtype]
    out_dir = args.out_dir or osp.join(
        'work_dirs', 'benchmark', datetime.datetime.now().strftime('%Y%m%d_%H%M%S'))
    if args.find_max_size:
        if len(sweeps) != 1:
            raise SystemExit('--find-max-size searches one --level and one --dtype at a time')
        modes = (args.mode, ) if args.mode else ('infer', 'train')
        bar, update = _progress_printer(None)
        with bar:
            found = find_max_sizes(sweeps[0], modes, *args.max_size_range, progress=update,
                                   multiple=args.max_size_step)
        write_outputs([], out_dir, max_sizes=(sweeps[0], found))
    else:
        total = sum(len(s.contenders) * len(s.sizes) * (2 if s.with_cp == 'both' else 1)
                    for s in sweeps)
        bar, update = _progress_printer(total)
        ceiling = None
        if not args.no_ceiling:  # the machine's limit, in the same run as the cases
            from mmlinattn.benchmark.ceiling import measure_ceiling
            ceiling = measure_ceiling(args.device, args.threads)
        runs = []
        with bar:
            for sweep in sweeps:
                runs.append((sweep, run_sweep(sweep, progress=update)))
        write_outputs(runs, out_dir, make_plots=not args.no_plots, comparisons=COMPARISONS,
                      ceiling=ceiling)
    with open(osp.join(out_dir, 'results.md')) as f:
        print(f.read())
    print(f'results: {os.path.abspath(out_dir)}')
    return 0


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
