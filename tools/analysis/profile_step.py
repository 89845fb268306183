"""Where a backbone's forward or training step spends its time, by operator and dtype.

Builds the benchmark's contender (``tools/benchmark.py --contenders``), runs one warm-up
call and profiles one more with ``torch.profiler`` (CPU, or CPU and CUDA), in each
requested dtype in turn, and prints the operators' self time grouped by kind (matrix
products, convolutions, norms, activations, casts, layout copies, elementwise,
reductions): the share of a step that is matrix work, and what bf16 changes in each::

    python tools/analysis/profile_step.py inline-pvt-s --size 1024 --dtype fp32 bf16
    python tools/analysis/profile_step.py inline-swin-t --size 1024 --mode train \\
        --dtype fp32 bf16 --json work_dirs/profile.json

Self time: an operator's own time without the operators it calls (``aten::linear``
counts nothing; the ``aten::addmm`` inside it counts the product).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Optional

import torch

#: Operator kinds, first match wins (aten names, without the ``aten::`` prefix).
KINDS: list[tuple[str, str]] = [
    # (oneDNN's ``_linear_pointwise`` counts its fused bias and GELU as matrix work.)
    ('matrix products', r'^(mm|addmm|bmm|baddbmm|addbmm|matmul|_mkl_linear|mkldnn_linear|'
                        r'_linear_pointwise|_addmm_activation|linear_backward|dot|mv|addmv)$'),
    ('convolutions', r'conv|_slow_conv2d|mkldnn_convolution'),
    ('norms', r'norm'),
    ('activations', r'gelu|relu|silu|elu|sigmoid|tanh|softmax|hardswish|leaky'),
    ('casts', r'^_to_copy$'),
    ('layout copies', r'^(copy_|clone|contiguous|_unsafe_view|cat|stack|index|'
                      r'index_select|constant_pad_nd|narrow_copy|_reshape_alias|'
                      r'permute|transpose|view|reshape|unfold|im2col|col2im|roll|'
                      r'split|chunk|slice|select|expand|as_strided|unbind)'),
    ('reductions', r'^(sum|mean|amax|max|min|var|std|norm|cumsum|logsumexp|_foreach_norm)'),
    ('optimizer', r'_foreach|adam|lerp|addcdiv|addcmul|sqrt'),
    ('elementwise', r'^(add|sub|mul|div|neg|pow|exp|log|rsub|fill|zero|where|masked|'
                    r'clamp|abs|reciprocal|threshold|sign|floor|ceil|round)'),
]


def kind_of(name: str) -> str:
    """The kind of an operator (``aten::name`` or a Python-level record's name)."""
    op = name.split('::', 1)[-1]
    for kind, pattern in KINDS:
        if re.search(pattern, op):
            return kind
    return 'other'


def profile_case(contender: str, size: int, dtype: str, mode: str, device: str,
                 batch: int = 1) -> dict:
    """One warm-up and one profiled call of the case; its operators' self times (ms).

    Freed memory is kept for reuse (:func:`~mmlinattn.utils.heap.reused_heap`), as the
    benchmark's workers run: with glibc's defaults every buffer over 32 MiB is faulted in
    anew and the first operator to write it (``copy_``, a GELU) is charged the kernel's
    page zeroing (it doubled their share of a bf16 forward)."""
    from mmlinattn.benchmark.worker import _prepare
    from mmlinattn.utils.heap import reused_heap

    spec = dict(level='backbone', contender=contender, size=size, batch=batch, device=device,
                dtype=dtype, mode=mode, compile=False)
    run, _, _ = _prepare(spec)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with reused_heap():
        run()
        if device == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            run()
            if device == 'cuda':
                torch.cuda.synchronize()
        wall = time.perf_counter() - start
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        ms = (e.self_device_time_total if device == 'cuda' else e.self_cpu_time_total) / 1e3
        if ms > 0:
            ops[e.key] = ops.get(e.key, 0.0) + ms
    kinds: dict[str, float] = {}
    for name, ms in ops.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    return dict(contender=contender, size=size, dtype=dtype, mode=mode, device=device,
                wall_ms=wall * 1e3, total_ms=sum(ops.values()), kinds=kinds,
                top=sorted(ops.items(), key=lambda kv: -kv[1])[:12])


def table(cases: list[dict]) -> str:
    """Markdown: kinds by rows, the cases' ms and shares by columns."""
    kinds = [k for k, _ in KINDS] + ['other']
    head = ' | '.join(f"{c['dtype']} ms (share)" for c in cases)
    lines = [f'| kind | {head} |', '|---|' + '---|' * len(cases)]
    for k in kinds:
        if not any(c['kinds'].get(k) for c in cases):
            continue
        cells = [f"{c['kinds'].get(k, 0.0):.0f} ({c['kinds'].get(k, 0.0) / c['total_ms']:.0%})"
                 for c in cases]
        lines.append(f'| {k} | ' + ' | '.join(cells) + ' |')
    lines.append('| **all operators** | ' + ' | '.join(f"{c['total_ms']:.0f}" for c in cases)
                 + ' |')
    lines.append('| wall (profiled call) | ' + ' | '.join(f"{c['wall_ms']:.0f}" for c in cases)
                 + ' |')
    return '\n'.join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('contender', help='a backbone contender of tools/benchmark.py')
    p.add_argument('--size', type=int, default=512, help='square input side (px)')
    p.add_argument('--dtype', nargs='+', choices=['fp32', 'bf16', 'auto'], default=['fp32'],
                   help='profile each in turn (bf16 is refused where it is emulated unless '
                        '--force-bf16)')
    p.add_argument('--force-bf16', action='store_true')
    p.add_argument('--mode', choices=['infer', 'train'], default='infer')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--json', help='also write the profiles to this file')
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from mmlinattn.benchmark.contenders import backbone_contenders
    from mmlinattn.utils.precision import resolve_dtype

    if args.contender not in backbone_contenders():
        raise SystemExit(f'unknown contender {args.contender!r}: one of '
                         f'{", ".join(sorted(backbone_contenders()))}')
    dtypes = list(dict.fromkeys(resolve_dtype(d, args.device, args.force_bf16)
                                for d in args.dtype))
    cases = [profile_case(args.contender, args.size, d, args.mode, args.device)
             for d in dtypes]
    what = 'training step' if args.mode == 'train' else 'inference forward'
    print(f'{args.contender}, {what} at {args.size} px, {args.device}, '
          f'{torch.get_num_threads()} threads: self time by kind of operator\n')
    print(table(cases))
    for c in cases:
        print(f"\n{c['dtype']}: top operators by self time")
        for name, ms in c['top']:
            print(f'  {name:40s} {ms:9.1f} ms  ({kind_of(name)})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(cases, f, indent=1)
    return 0


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    sys.exit(run_tool(main))

