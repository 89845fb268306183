"""Faults lose nothing: atomic files, exact resume, no step on non-finite values, one-line errors.

The truths are independent of the code under test: a run that was never interrupted
(its final weights, bit for bit), the bytes a file held before a killed write, the
weights before the step that met a NaN.
"""
from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import mmlinattn  # noqa: F401  (registers the hooks and wrappers)
from mmlinattn.utils.atomic import PARTIAL_SUFFIX, atomic_write, remove_partials

REPO = Path(__file__).resolve().parents[2]


# -- atomic files ---------------------------------------------------------------------------
def test_a_write_killed_midway_leaves_the_old_file_and_only_a_partial(tmp_path) -> None:
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'old and complete')
    code = ('import os, signal, sys\n'
            'from mmlinattn.utils.atomic import atomic_write\n'
            'with atomic_write(sys.argv[1]) as f:\n'
            '    f.write(b"new but not fin"); f.flush()\n'
            '    os.kill(os.getpid(), signal.SIGKILL)\n')
    proc = subprocess.run([sys.executable, '-c', code, str(path)], cwd=REPO)
    assert proc.returncode == -9
    assert path.read_bytes() == b'old and complete'
    partials = [p.name for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    assert len(partials) == 1
    assert remove_partials(str(tmp_path)) == partials and len(list(tmp_path.iterdir())) == 1


def test_a_full_disk_names_the_file_and_replaces_nothing(tmp_path, monkeypatch) -> None:
    path = tmp_path / 'iter_8.pth'
    path.write_bytes(b'previous')

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(OSError, match='no space left on the device writing .*iter_8.pth'), \
            atomic_write(str(path)) as f:
        f.write(b'x' * 1000)
    assert path.read_bytes() == b'previous' and [p.name for p in tmp_path.iterdir()] == [
        'iter_8.pth']


# -- a toy training run with random numbers everywhere -----------------------------------------
class _Noisy(BaseModel):
    """Dropout in the forward: the weights depend on torch's random stream."""

    nan_loss_at: int | None = None  # the forward calls (iterations) that meet a NaN
    nan_grad_at: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.calls = 0
        # A finite loss whose gradient is not: the weight's gradient turned to NaN.
        self.fc.weight.register_hook(
            lambda g: g * float('nan') if self.calls == _Noisy.nan_grad_at else g)

    def forward(self, x, y=None, mode='tensor'):
        self.calls += 1
        out = self.fc(self.drop(self.bn(x)))
        if mode == 'loss':
            loss = ((out - y)**2).mean()
            if self.calls == _Noisy.nan_loss_at:
                loss = loss * float('nan')
            return dict(loss=loss)
        return out


class _Augmented(Dataset):
    """Each sample drawn with numpy's and python's random streams (an augmentation)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        import random

        import numpy as np
        x = torch.full((4, ), float(i)) + float(np.random.rand()) + random.random()
        return dict(x=x, y=torch.ones(1))


#: Runner names are process-wide instances (message hub, logger): one each.
_NAMES = itertools.count()


class _Crash(Exception):
    pass


def _runner(work_dir: Path, hook: str = 'mmlinattn.ResumableCheckpointHook', resume=False,
            crash_at: int | None = None, wrapper: str = 'mmlinattn.FiniteOptimWrapper',
            max_iters: int = 10, **wrapper_args) -> Runner:
    from mmengine.hooks import Hook

    class CrashAt(Hook):
        priority = 'LOWEST'  # after the checkpoint hook

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if crash_at is not None and runner.iter + 1 == crash_at:
                raise _Crash(f'killed at {crash_at}')

    torch.manual_seed(0)  # the initial weights: the runner seeds only what follows
    return Runner(
        model=_Noisy(), work_dir=str(work_dir), experiment_name=f'faults{next(_NAMES)}',
        train_dataloader=dict(dataset=_Augmented(), batch_size=4, collate_fn=dict(
            type='default_collate'), sampler=dict(type='InfiniteSampler', shuffle=True)),
        optim_wrapper=dict(type=wrapper, optimizer=dict(type='SGD', lr=0.05, momentum=0.9),
                           **wrapper_args),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, end=6),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type=hook, interval=3, by_epoch=False,
                                           max_keep_ckpts=2)),
        custom_hooks=[dict(type='mmlinattn.FiniteLossHook'), CrashAt()],
        randomness=dict(seed=7), resume=resume, default_scope='mmengine')


def _weights(runner: Runner) -> dict:
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


def _interrupted(tmp_path: Path, hook: str) -> dict:
    with pytest.raises(_Crash):
        _runner(tmp_path, hook, crash_at=8).train()  # after the save at 6
    resumed = _runner(tmp_path, hook, resume=True)
    resumed.train()
    assert resumed.iter == 10
    return _weights(resumed)


def test_a_resumed_run_ends_with_the_weights_of_the_run_never_interrupted(tmp_path) -> None:
    whole = _runner(tmp_path / 'whole')
    whole.train()
    again = _interrupted(tmp_path / 'cut', 'mmlinattn.ResumableCheckpointHook')
    for k, v in _weights(whole).items():
        assert torch.equal(v, again[k]), k
    ckpt = torch.load(tmp_path / 'cut' / 'iter_9.pth')
    assert len(ckpt['meta']['rng_states']) == 1 and ckpt['meta']['layout']['world_size'] == 1
    # Pruned only after the newer one was written: two kept.
    assert sorted(p.name for p in (tmp_path / 'cut').glob('iter_*.pth')) == [
        'iter_10.pth', 'iter_9.pth']


def test_without_the_random_states_the_resumed_run_is_another_run(tmp_path) -> None:
    """The control: mmengine's own hook resumes, but dropout and the augmentations draw
    other numbers after the resume (what the test above detects when the states are
    lost)."""
    whole = _weights(_trained(tmp_path / 'whole', 'CheckpointHook'))
    again = _interrupted(tmp_path / 'cut', 'CheckpointHook')
    assert any(not torch.equal(v, again[k]) for k, v in whole.items())


def _trained(work_dir: Path, hook: str) -> Runner:
    r = _runner(work_dir, hook)
    r.train()
    return r


def test_resume_picks_the_newest_checkpoint_that_reads_back_whole(tmp_path) -> None:
    from mmlinattn.engine.resume import pick_checkpoint
    _trained(tmp_path, 'mmlinattn.ResumableCheckpointHook')
    newest = tmp_path / 'iter_10.pth'
    assert (tmp_path / 'last_checkpoint').read_text().endswith('iter_10.pth')
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])  # what an in-place write killed midway leaves
    said: list[str] = []
    assert pick_checkpoint(str(tmp_path), said.append) == str(tmp_path / 'iter_9.pth')
    assert len(said) == 1 and 'iter_10.pth' in said[0] and 'not a complete' in said[0]


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_to_resume_from(
        tmp_path, monkeypatch) -> None:
    """The disk fills while iteration 6's checkpoint is written: the run stops naming the
    file, nothing named iter_6.pth exists, last_checkpoint still names iter_3.pth, and
    once space is back the run resumes from it to the uninterrupted run's weights."""
    whole = _weights(_trained(tmp_path / 'whole', 'mmlinattn.ResumableCheckpointHook'))
    fsync = os.fsync

    def full_at_six(fd: int) -> None:
        if 'iter_6.pth' in os.readlink(f'/proc/self/fd/{fd}'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        fsync(fd)
    with monkeypatch.context() as m:
        m.setattr(os, 'fsync', full_at_six)
        with pytest.raises(OSError, match='no space left on the device writing .*iter_6.pth'):
            _trained(tmp_path / 'cut', 'mmlinattn.ResumableCheckpointHook')
    cut = tmp_path / 'cut'
    assert sorted(p.name for p in cut.iterdir() if p.suffix == '.pth') == ['iter_3.pth']
    assert (cut / 'last_checkpoint').read_text().endswith('iter_3.pth')
    resumed = _runner(cut, resume=True)
    resumed.train()
    again = _weights(resumed)
    assert all(torch.equal(v, again[k]) for k, v in whole.items())


def test_resuming_on_another_layout_is_refused_naming_both(tmp_path) -> None:
    with pytest.raises(_Crash):
        _runner(tmp_path, crash_at=8).train()
    ckpt = torch.load(tmp_path / 'iter_6.pth')
    ckpt['meta']['layout']['world_size'] = 2
    torch.save(ckpt, tmp_path / 'iter_6.pth')
    with pytest.raises(ValueError, match="refusing to resume.*'world_size': 2.*'world_size': 1"):
        _runner(tmp_path, resume=True).train()


# -- non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize('where', ['loss', 'gradient'])
def test_a_non_finite_value_stops_before_the_step_naming_iteration_and_term(
        tmp_path, where, monkeypatch) -> None:
    two = _runner(tmp_path / 'two', max_iters=2)
    two.train()
    monkeypatch.setattr(_Noisy, f'nan_{"loss" if where == "loss" else "grad"}_at', 3)
    r = _runner(tmp_path / 'nan', max_iters=4)
    with pytest.raises(FloatingPointError) as e:
        r.train()
    text = str(e.value)
    assert 'iteration 3' in text and 'rank 0' in text and 'before the optimizer step' in text
    assert ('loss=nan' in text) if where == 'loss' else ('fc.weight' in text), text
    # The weights (and BN statistics, which the forward of iteration 3 moved) are not
    # stepped: the parameters are those after iteration 2.
    now = dict(r.model.named_parameters())
    for k, v in two.model.named_parameters():
        assert torch.equal(v, now[k]), k


def test_skip_mode_skips_the_step_on_every_rank_and_goes_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_Noisy, 'nan_grad_at', 3)
    r = _runner(tmp_path, nonfinite='skip')
    r.train()
    assert r.iter == 10 and r.optim_wrapper.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in r.model.state_dict().values())


# -- one-line errors ----------------------------------------------------------------------
def test_a_refused_input_is_one_line_without_a_traceback(tmp_path) -> None:
    """A PNG claiming 100000^2 pixels: refused as a decompression bomb, in one line."""
    import struct
    import zlib
    png = tmp_path / 'bomb.png'
    ihdr = struct.pack('>IIBBBBB', 100000, 100000, 8, 2, 0, 0, 0)
    chunk = b'IHDR' + ihdr
    png.write_bytes(b'\x89PNG\r\n\x1a\n' + struct.pack('>I', len(ihdr)) + chunk
                    + struct.pack('>I', zlib.crc32(chunk)))
    cfg = 'configs/segmentation/inline_pvt/fpn_inline-pvt-s_4xb4-40k_ade20k-512x512.py'
    cmd = [sys.executable, 'tools/infer_large.py', cfg, 'none', str(png), '--out',
           str(tmp_path / 'out.png')]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if 'Warning' not in ln
             and 'warn' not in ln and ln.strip() and not ln.startswith('  ')]
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith('infer_large.py: error: ') and \
        'decompression bomb' in lines[0], lines
    debug = subprocess.run(cmd + ['--debug'], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert debug.returncode == 1 and 'Traceback' in debug.stderr
