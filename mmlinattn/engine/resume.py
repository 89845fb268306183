"""Training checkpoints that survive a kill, and a resumed run that is the interrupted one.

:class:`ResumableCheckpointHook` is mmengine's ``CheckpointHook`` with three changes:

* **Atomic files.** Checkpoints go through :class:`AtomicLocalBackend` (temporary name,
  fsync, rename) and ``last_checkpoint`` moves only once the checkpoint it names is
  complete; older checkpoints beyond ``max_keep_ckpts`` are removed after that, not
  before (mmengine removes the oldest first, so a kill during the save could leave
  nothing to resume from).
* **The random state of every rank** (torch, CUDA, numpy, python) is gathered at the
  save into ``meta['rng_states']``, with the layout that wrote it (``meta['layout']``:
  ranks and spatial parallelism). On resume, after mmengine's loop has skipped the
  consumed batches (which consumes random numbers of its own), each rank gets its state
  back just before the next batch is drawn, where the uninterrupted run was when it
  saved. The sampler's position is mmengine's (seeded, advanced by the skip) and the
  dataloader workers re-seed from the config's seed, then redo the skipped batches, so
  they are where they were too.
* **Validation does not draw from the training's random stream** (its loop's random
  state is restored when it ends), so a run validated at the iteration it saved and a
  run resumed from that save draw the same numbers afterwards.

Resuming on another layout (another number of ranks, or spatial ranks) is refused by
default, naming both layouts: the states cannot be mapped onto other ranks, so such a
run would not be the interrupted one. ``layout_change='allow'`` resumes anyway, with
fresh random states, and says so.

:func:`pick_checkpoint` chooses what ``--resume auto`` resumes: the newest checkpoint
of the work dir that reads back whole, naming those it skipped and why.
"""
from __future__ import annotations

import logging
import os.path as osp
import random
import re
import zipfile
from typing import Any, Callable, Optional

import numpy as np
import torch
from mmengine.dist import get_rank, get_world_size, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from ..registry import HOOKS
from ..utils.atomic import remove_partials, write_bytes_atomic, write_text_atomic

__all__ = ['AtomicLocalBackend', 'ResumableCheckpointHook', 'rng_state', 'set_rng_state',
           'pick_checkpoint', 'ATOMIC_BACKEND']

#: The name of :class:`AtomicLocalBackend` among mmengine's file backends.
ATOMIC_BACKEND = 'mmlinattn_atomic'


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes appear whole or not at all."""

    def put(self, obj: bytes, filepath: Any) -> None:
        write_bytes_atomic(str(filepath), obj)

    def put_text(self, obj: str, filepath: Any, encoding: str = 'utf-8') -> None:
        write_text_atomic(str(filepath), obj, encoding)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


# -- random state ---------------------------------------------------------------------
def rng_state() -> dict:
    """This process's random state, as tensors, lists and numbers (nothing a
    weights-only checkpoint reader refuses)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(torch=torch.get_rng_state(),
                 numpy=[kind, keys.tolist(), pos, has_gauss, gauss],
                 python=[version, list(internal), gauss_next])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _gathered_rng_states() -> list[dict]:
    """Every rank's random state, in rank order (on every rank)."""
    if get_world_size() == 1:
        return [rng_state()]
    out: list = [None] * get_world_size()
    torch.distributed.all_gather_object(out, rng_state())
    return out


class _RestoreBeforeBatch:
    """The train loop's batch iterator, restoring ``state`` just before the batch after
    the first ``skip`` (those mmengine skips on resume)."""

    def __init__(self, iterator: Any, skip: int, state: dict) -> None:
        self.iterator, self.skip, self.state, self.calls = iterator, skip, state, 0

    def __iter__(self) -> _RestoreBeforeBatch:
        return self

    def __next__(self) -> Any:
        if self.state is not None and self.calls == self.skip:
            set_rng_state(self.state)
            self.state = None
        self.calls += 1
        return next(self.iterator)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.iterator, name)


def _keeping_rng(run: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped() -> Any:
        state = rng_state()
        try:
            return run()
        finally:
            set_rng_state(state)
    wrapped.__wrapped__ = run  # type: ignore[attr-defined]
    return wrapped


def _layout(runner: Any) -> dict:
    spatial = runner.cfg.get('spatial_parallel') if getattr(runner, 'cfg', None) else None
    return dict(world_size=get_world_size(), spatial=repr(spatial) if spatial else None)


@HOOKS.register_module()
class ResumableCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with atomic files and exact resume
    (see the module's note). ``layout_change``: ``'refuse'`` (default) a resume on
    another layout than the checkpoint's, or ``'allow'`` it with fresh random states."""

    def __init__(self, *args: Any, layout_change: str = 'refuse', **kwargs: Any) -> None:
        if kwargs.get('backend_args') is None and kwargs.get('file_client_args') is None:
            kwargs['backend_args'] = dict(backend=ATOMIC_BACKEND)
        if layout_change not in ('refuse', 'allow'):
            raise ValueError(f"layout_change must be 'refuse' or 'allow', got {layout_change!r}")
        super().__init__(*args, **kwargs)
        self.layout_change = layout_change
        self._resumed: Optional[dict] = None

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        meta = checkpoint.get('meta') or {}
        self._resumed = dict(states=meta.get('rng_states'), layout=meta.get('layout'),
                             iter=meta.get('iter'))

    def before_train(self, runner: Any) -> None:
        super().before_train(runner)
        if is_main_process():
            for folder in {str(self.out_dir), runner.work_dir}:
                remove_partials(folder)
        val = getattr(runner, '_val_loop', None)
        if val is not None and not isinstance(val, dict):
            val.run = _keeping_rng(val.run)
        resumed, self._resumed = self._resumed, None
        if resumed is None or runner.iter == 0 and runner.epoch == 0:
            return  # a fresh run, or weights loaded with load_from only
        states, layout = resumed['states'], resumed['layout']
        now = _layout(runner)
        if states is None:
            print_log('resumed from a checkpoint without random states (written before '
                      'exact resume): the run goes on, but not as the interrupted one would '
                      'have', logger='current', level=logging.WARNING)
            return
        if layout != now:
            message = (f'the checkpoint was written by {layout} and this run is {now}: '
                       'random states cannot be mapped onto other ranks, so the resumed '
                       'run would not be the interrupted one')
            if self.layout_change == 'refuse':
                raise ValueError(f'refusing to resume: {message} (resume on the same layout, '
                                 'or set layout_change="allow" on the checkpoint hook)')
            print_log(f'resuming anyway (layout_change="allow"): {message}',
                      logger='current', level=logging.WARNING)
            return
        state = states[get_rank()]
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):  # by iterations: after mmengine's skip
            loop.dataloader_iterator = _RestoreBeforeBatch(loop.dataloader_iterator,
                                                           runner.iter, state)
        else:  # by epochs: the next epoch's loader is created after this hook
            set_rng_state(state)

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
        meta = dict(meta, rng_states=_gathered_rng_states(), layout=_layout(runner))
        prune = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                            and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                prune = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, ckpt_filename, self.file_client_args,
            save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler,
            meta=meta, by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        # The pointer moves once the file it names is complete; older files go after.
        write_text_atomic(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        if prune is not None:
            old = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(prune))
            if self.file_backend.isfile(old):
                self.file_backend.remove(old)


# -- choosing what to resume ----------------------------------------------------------
_STEP = re.compile(r'(?:iter|epoch)_(\d+)\.pth$')


def _unreadable(path: str) -> Optional[str]:
    """Why ``path`` cannot be a checkpoint to resume from, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # every member's CRC: a truncated or damaged file fails
        if bad is not None:
            return f'member {bad} is damaged'
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f'not a complete checkpoint ({type(e).__name__}: {e})'
    return None


def pick_checkpoint(work_dir: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint ``--resume auto`` resumes from: the one ``last_checkpoint`` names
    and the ``iter_*.pth`` / ``epoch_*.pth`` of ``work_dir``, newest first, the first
    that reads back whole; each skipped one is logged with the reason. None if none."""
    import glob
    found = sorted(((int(m.group(1)), p) for p in glob.glob(osp.join(work_dir, '*.pth'))
                    if (m := _STEP.search(osp.basename(p)))), reverse=True)
    candidates = [p for _, p in found]
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):  # a checkpoint named otherwise (another filename_tmpl)
        with open(pointer) as f:
            named = f.read().strip()
        named = named if not named or osp.isabs(named) else osp.join(work_dir, named)
        if named and osp.abspath(named) not in {osp.abspath(p) for p in candidates}:
            candidates.insert(0, named)
    for path in candidates:
        why = 'missing' if not osp.isfile(path) else _unreadable(path)
        if why is None:
            return path
        log(f'resume: skipped {path}: {why}')
    return None
