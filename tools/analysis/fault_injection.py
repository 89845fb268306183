#!/usr/bin/env python
"""Kill runs at random instants, resume them, and compare with runs never interrupted.

    python tools/analysis/fault_injection.py train --kills 20            # one process
    python tools/analysis/fault_injection.py train --kills 20 --ranks 2  # DDP, torchrun
    python tools/analysis/fault_injection.py train --kills 20 --ranks 2 --spatial
    python tools/analysis/fault_injection.py infer --kills 10 --size 2048
    python tools/analysis/fault_injection.py lost-rank --ranks 3 --signal stop

``train``: the shipped tiny Semantic FPN config (``configs/tiny/``, on the synthetic
data of ``tools/make_tiny_dataset.py``, made when missing), ``--iters`` iterations with a
checkpoint every ``--interval``. First a run that is never interrupted; then the same
run SIGKILLed (the whole process group: torchrun and every rank) at a random instant
of each attempt (in the forward, the backward, the optimizer step or a checkpoint
save: wherever it is then) ``--kills`` times, restarted each time with ``--resume auto``,
and left to finish. The final state dicts are compared bit for bit.

``lost-rank``: one of ``--ranks`` processes of ``tools/dist_infer_large.sh`` killed
(``--signal kill``) or stopped (``stop``): how long the others take to exit, and the
rank they name.

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
    elif args.ranks > 1 and 'tiny-ade20k' in args.config:
        # The decode head's SyncBN needs GPUs; CPU DDP runs plain BN (per rank).
        options.append('model.decode_head.norm_cfg.type=BN')
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
    kills = resumed = episodes = identical = 0
    log = osp.join(base, 'interrupted.log')
    import torch
    expected = _state(ref, args.iters)
    # Episodes: a run killed at random instants and resumed until it finishes; then its
    # weights are compared and, while kills are left, a new episode starts afresh.
    while kills < args.kills:
        episodes += 1
        shutil.rmtree(cut, ignore_errors=True)
        os.makedirs(cut)
        attempt = 0
        while True:
            attempt += 1
            kill_after = rng.uniform(0.1, 1.0) * took if kills < args.kills else None
            began = time.monotonic()
            code, killed = _run(_train_cmd(args, cut, attempt > 1), log, kill_after,
                                _env(args))
            if not killed and attempt == 1:  # a whole run took this long: kill within it
                took = min(took, time.monotonic() - began)
            resumed += attempt > 1
            if killed:
                kills += 1
                print(f'  episode {episodes}: kill {kills}/{args.kills} after '
                      f'{kill_after:.1f} s')
                continue
            if code == 0:
                break
            print(f'episode {episodes}, attempt {attempt} failed (exit {code}): see {log}')
            return 1
        got = _state(cut, args.iters)
        same = got.keys() == expected.keys() and all(torch.equal(expected[k], got[k])
                                                     for k in expected)
        identical += same
        print(f'  episode {episodes}: {attempt - 1} kill(s), final state dict '
              f'{"IDENTICAL" if same else "DIFFERENT"}')
    print(f'faults injected: {kills}; runs resumed: {resumed}; episodes: {episodes}, '
          f'{identical} of them bit-identical to the uninterrupted run '
          f'({len(expected)} tensors each)')
    return 0 if identical == episodes else 1


def infer(args: argparse.Namespace) -> int:
    import numpy as np
    import tifffile
    base = osp.abspath(args.work_dir)
    os.makedirs(base, exist_ok=True)
    image = osp.join(base, f'scene{args.size}.tif')
    if not osp.isfile(image):
        subprocess.run([sys.executable, osp.join(ROOT, 'tools/make_large_image.py'), image,
                        '--size', str(args.size), str(args.size)], check=True)
    weights = osp.join(base, 'random_weights.pth')
    if not osp.isfile(weights):  # one set of random weights for every run
        import torch

        from mmlinattn.engine.build import build_from_config
        torch.manual_seed(args.seed)
        model, _ = build_from_config(osp.join(ROOT, SEG))
        torch.save(model.state_dict(), weights)
    common = [sys.executable, osp.join(ROOT, 'tools/infer_large.py'), SEG, weights, image,
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
    reference = tifffile.imread(ref_out)
    kills = resumed = episodes = identical = 0
    while kills < args.kills:  # episodes: killed and resumed until done, then compared
        episodes += 1
        shutil.rmtree(spill, ignore_errors=True)
        if osp.exists(cut_out):
            os.remove(cut_out)
        attempt = 0
        while True:
            attempt += 1
            kill_after = rng.uniform(0.1, 1.0) * took if kills < args.kills else None
            cmd = common + ['--out', cut_out, '--spill', spill] + (['--resume'] if attempt > 1
                                                                      else [])
            code, killed = _run(cmd, osp.join(base, 'interrupted.log'), kill_after,
                                dict(os.environ))
            resumed += attempt > 1
            if killed:
                kills += 1
                print(f'  episode {episodes}: kill {kills}/{args.kills} after '
                      f'{kill_after:.1f} s; output present: {osp.exists(cut_out)}')
                continue
            if code == 0:
                break
            print(f'attempt {attempt} failed (exit {code})')
            return 1
        same = bool(np.array_equal(reference, tifffile.imread(cut_out)))
        identical += same
        print(f'  episode {episodes}: {attempt - 1} kill(s), labels '
              f'{"IDENTICAL" if same else "DIFFERENT"}')
    print(f'faults injected: {kills}; runs resumed: {resumed}; episodes: {episodes}, '
          f'{identical} of them with labels identical to the uninterrupted run')
    return 0 if identical == episodes else 1


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def lost_rank(args: argparse.Namespace) -> int:
    """One rank of ``tools/dist_infer_large.sh`` (``--ranks`` processes, a synthetic
    image) killed (SIGKILL) or stopped (SIGSTOP) ``--after`` seconds in: how long until
    every process has exited, and what the survivors said."""
    base = osp.abspath(args.work_dir)
    os.makedirs(base, exist_ok=True)
    log = osp.join(base, f'lost-{args.signal}-{args.ranks}.log')
    cmd = ['bash', osp.join(ROOT, 'tools/dist_infer_large.sh'), SEG, 'none', '', str(args.ranks),
           '--synthetic', str(args.size), str(args.size), '--tile', '512',
           '--out', osp.join(base, 'lost.png')]
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(29500 + random.randrange(1000)))
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        time.sleep(args.after)
        agent = [c for c in _children(proc.pid)]  # bash -> torchrun
        workers = sorted(w for a in agent for w in _children(a))
        if len(workers) < args.ranks:
            os.killpg(proc.pid, signal.SIGKILL)
            print(f'found {len(workers)} workers, expected {args.ranks}: see {log}')
            return 1
        victim = workers[-1]
        sig = signal.SIGKILL if args.signal == 'kill' else signal.SIGSTOP
        os.kill(victim, sig)
        hit = time.monotonic()
        try:
            proc.wait(timeout=args.stall + 120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            print(f'the group did not stop within {args.stall + 120} s: see {log}')
            return 1
        took = time.monotonic() - hit
    with open(log) as f:
        said = [ln.strip() for ln in f if 'lost rank' in ln or 'exitcode' in ln
                or ('rank' in ln and 'Signal' in ln)]
    print(f'{args.signal} of one of {args.ranks} ranks: every process gone {took:.1f} s later '
          f'(exit {proc.returncode}); what names the lost rank: {said[:3] or "nothing"}')
    return 0 if said else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('train', 'infer', 'lost-rank'))
    p.add_argument('--signal', choices=('kill', 'stop'), default='kill',
                   help='lost-rank: SIGKILL or SIGSTOP one rank')
    p.add_argument('--after', type=float, default=20.0,
                   help='lost-rank: seconds before the signal')
    p.add_argument('--stall', type=float, default=60.0,
                   help='lost-rank: MMLINATTN_STALL_S for the ranks')
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
    if args.what == 'lost-rank':
        os.environ['MMLINATTN_STALL_S'] = str(args.stall)
        return lost_rank(args)
    return train(args) if args.what == 'train' else infer(args)


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
