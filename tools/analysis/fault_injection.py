#!/usr/bin/env python
"""Kill runs at random instants, resume them, and compare with runs never interrupted.

    python tools/analysis/fault_injection.py train --kills 20            # one process
    python tools/analysis/fault_injection.py train --kills 20 --ranks 2  # DDP, torchrun
    python tools/analysis/fault_injection.py train --kills 20 --ranks 2 --spatial
    python tools/analysis/fault_injection.py infer --kills 10 --size 2048

``train``: the shipped tiny Semantic FPN config (``configs/tiny/``, on the synthetic
data of ``tools/make_tiny_dataset.py``, made when missing), ``--iters`` iterations with a
checkpoint every ``--interval``. First a run that is never interrupted; then the same
run SIGKILLed (the whole process group: torchrun and every rank) at a random instant
of each attempt (in the forward, the backward, the optimizer step or a checkpoint
save: wherever it is then) ``--kills`` times, restarted each time with ``--resume auto``,
and left to finish. The final state dicts are compared bit for bit.

``infer``: ``tools/infer_large.py --spill --resume`` on a synthetic tiled TIFF (Semantic
FPN, random weights), killed ``--kills`` times and resumed; the output labels are
compared with an uninterrupted run's.

Prints the faults injected, the runs that resumed and whether the results are
identical; exits 1 if they are not. Not a timed test: a run takes minutes.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

TINY_SEG = 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'
SEG = 'configs/segmentation/inline_pvt/fpn_inline-pvt-s_4xb4-40k_ade20k-512x512.py'


def _train_cmd(args: argparse.Namespace, work_dir: str, resume: bool) -> list[str]:
    options = [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={10**9}',
               f'default_hooks.checkpoint.interval={args.interval}',
               'default_hooks.checkpoint.max_keep_ckpts=2', 'default_hooks.logger.interval=1',
               f'randomness.seed={args.seed}', 'randomness.deterministic=False']
    if args.spatial:
        options.append(f'spatial_parallel.size={args.ranks}')
    tail = [args.config, '--work-dir', work_dir, '--cfg-options', *options]
    if resume:
        tail.insert(1, '--resume')
    if args.ranks == 1:
        return [sys.executable, osp.join(ROOT, 'tools/train.py'), *tail]
    return ['bash', osp.join(ROOT, 'tools/dist_train.sh'), tail[0], str(args.ranks), *tail[1:]]


def _run(cmd: list[str], log: str, kill_after: float | None, env: dict) -> tuple[int, bool]:
    """Run ``cmd`` in a process group of its own; SIGKILL the group after
    ``kill_after`` seconds (None: let it finish). Returns (exit code, killed)."""
    with open(log, 'a') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
            return proc.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode, True


def _state(work_dir: str, iters: int) -> dict:
    import torch
    return torch.load(osp.join(work_dir, f'iter_{iters}.pth'), map_location='cpu')['state_dict']


def _env(args: argparse.Namespace) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.ranks)),
                PORT=str(29500 + random.randrange(1000)), MMLINATTN_STALL_S='30')


def train(args: argparse.Namespace) -> int:
    if not osp.isdir(osp.join(ROOT, 'data/tiny/ade20k')):
        subprocess.run([sys.executable, osp.join(ROOT, 'tools/make_tiny_dataset.py'), 'ade20k',
                        osp.join(ROOT, 'data/tiny/ade20k')], check=True)
    base = osp.abspath(args.work_dir)
    ref, cut = osp.join(base, 'uninterrupted'), osp.join(base, 'interrupted')
    for d in (ref, cut):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    start = time.monotonic()
    code, _ = _run(_train_cmd(args, ref, False), osp.join(base, 'uninterrupted.log'), None,
                   _env(args))
    if code != 0:
        print(f'the uninterrupted run failed (exit {code}): see {base}/uninterrupted.log')
        return 1
    took = time.monotonic() - start
    print(f'uninterrupted: {args.iters} iterations in {took:.0f} s')
    rng = random.Random(args.seed)
    kills = resumed = 0
    log = osp.join(base, 'interrupted.log')
    attempt = 0
    while True:
        attempt += 1
        # A kill somewhere in the run that is left (after the start-up, before the end).
        kill_after = rng.uniform(0.15, 1.0) * took if kills < args.kills else None
        code, killed = _run(_train_cmd(args, cut, attempt > 1), log, kill_after, _env(args))
        resumed += attempt > 1 and (killed or code == 0)
        if killed:
            kills += 1
            print(f'  kill {kills}/{args.kills} after {kill_after:.1f} s')
            continue
        if code == 0:
            break
        print(f'attempt {attempt} failed (exit {code}): see {log}')
        return 1
    a, b = _state(ref, args.iters), _state(cut, args.iters)
    import torch
    same = sum(torch.equal(a[k], b[k]) for k in a) if a.keys() == b.keys() else 0
    print(f'faults injected: {kills}; runs resumed: {resumed}; tensors identical: {same} of '
          f'{len(a)}; final state dict {"IDENTICAL" if same == len(a) else "DIFFERENT"}')
    return 0 if same == len(a) else 1


def infer(args: argparse.Namespace) -> int:
    import numpy as np
    import tifffile
    base = osp.abspath(args.work_dir)
    os.makedirs(base, exist_ok=True)
    image = osp.join(base, f'scene{args.size}.tif')
    if not osp.isfile(image):
        subprocess.run([sys.executable, osp.join(ROOT, 'tools/make_large_image.py'), image,
                        '--size', str(args.size), str(args.size)], check=True)
    common = [sys.executable, osp.join(ROOT, 'tools/infer_large.py'), SEG, 'none', image,
              '--tile', '512']
    ref_out, cut_out = osp.join(base, 'uninterrupted.tif'), osp.join(base, 'interrupted.tif')
    spill = osp.join(base, 'spill')
    for p in (ref_out, cut_out):
        if osp.exists(p):
            os.remove(p)
    shutil.rmtree(spill, ignore_errors=True)
    start = time.monotonic()
    code, _ = _run(common + ['--out', ref_out], osp.join(base, 'uninterrupted.log'), None,
                   dict(os.environ))
    took = time.monotonic() - start
    if code != 0:
        print(f'the uninterrupted run failed (exit {code})')
        return 1
    print(f'uninterrupted: {took:.0f} s')
    rng = random.Random(args.seed)
    kills = resumed = 0
    attempt = 0
    while True:
        attempt += 1
        kill_after = rng.uniform(0.2, 1.0) * took if kills < args.kills else None
        cmd = common + ['--out', cut_out, '--spill', spill] + (['--resume'] if attempt > 1
                                                                  else [])
        code, killed = _run(cmd, osp.join(base, 'interrupted.log'), kill_after,
                            dict(os.environ))
        resumed += attempt > 1 and (killed or code == 0)
        if killed:
            kills += 1
            print(f'  kill {kills}/{args.kills} after {kill_after:.1f} s; output present: '
                  f'{osp.exists(cut_out)}')
            continue
        if code == 0:
            break
        print(f'attempt {attempt} failed (exit {code})')
        return 1
    same = np.array_equal(tifffile.imread(ref_out), tifffile.imread(cut_out))
    print(f'faults injected: {kills}; runs resumed: {resumed}; labels '
          f'{"IDENTICAL" if same else "DIFFERENT"}')
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('train', 'infer'))
    p.add_argument('--kills', type=int, default=20)
    p.add_argument('--ranks', type=int, default=1, help='train: processes (torchrun)')
    p.add_argument('--spatial', action='store_true', help='train: ranks split each image')
    p.add_argument('--config', default=TINY_SEG)
    p.add_argument('--iters', type=int, default=24)
    p.add_argument('--interval', type=int, default=4)
    p.add_argument('--size', type=int, default=2048, help='infer: image side')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs/fault_injection'))
    args = p.parse_args(argv)
    return train(args) if args.what == 'train' else infer(args)


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
