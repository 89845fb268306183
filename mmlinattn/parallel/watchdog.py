"""A rank that dies or stalls stops its group in seconds, and the survivors say which.

Every rank runs a :class:`Heartbeat`: a daemon thread that increments the rank's counter
in the process group's key-value store every ``interval`` seconds and reads the others'.
A rank killed (SIGKILL, the OOM killer, a lost node) or stopped (SIGSTOP, a hung
driver) stops counting, its threads with it; a rank alive but slow keeps counting (the
thread does not wait for the main one). When a peer's counter has not moved for
``stall_s`` seconds, the survivors print one line naming that rank, the operation they
were in and their last iteration, and exit with status :data:`LOST_RANK_EXIT`, instead
of waiting for the collective's own timeout (30 minutes by default in torch) and then
failing with a message that names no rank. ``torchrun --max-restarts`` then restarts the
group, and an exact resume (:mod:`mmlinattn.engine.resume`) carries on.

:func:`describe_lost` turns a collective's failure (a peer's socket closed, a timeout)
into the same one-line message when the main thread sees it first.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator, Optional

__all__ = ['LostRankError', 'watch_group', 'Heartbeat', 'LOST_RANK_EXIT', 'describe_lost',
           'current_heartbeat',
           'heartbeat_store']

#: Exit status of survivors that stopped because a peer was lost (EX_TEMPFAIL: retry).
LOST_RANK_EXIT = 75

_CURRENT: list[Heartbeat] = []


class LostRankError(RuntimeError):
    """A peer of the group died or stalled (the message names it)."""


def current_heartbeat() -> Optional[Heartbeat]:
    return _CURRENT[-1] if _CURRENT else None


def heartbeat_store() -> object:
    """A connection of its own to the group's key-value store (torchrun's, at
    ``MASTER_ADDR:MASTER_PORT``), so that the heartbeat thread never shares a socket
    with the main thread; the process group's store when those are not set."""
    import datetime

    import torch.distributed as dist
    addr, port = os.environ.get('MASTER_ADDR'), os.environ.get('MASTER_PORT')
    if addr and port:
        return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=30))
    from torch.distributed import distributed_c10d
    if not dist.is_initialized():
        raise RuntimeError('Heartbeat needs MASTER_ADDR/MASTER_PORT or a process group')
    return distributed_c10d._get_default_store()


class Heartbeat:
    """Counters in the process group's store (see the module's note). ``stall_s``: how
    long a peer may stay silent; ``interval``: seconds between beats; ``where``: returns
    the survivor's current operation and iteration for the message; ``on_lost``: what a
    survivor does (default: print and ``os._exit(LOST_RANK_EXIT)``)."""

    def __init__(self, stall_s: float, interval: float = 1.0,
                 where: Optional[Callable[[], str]] = None,
                 on_lost: Optional[Callable[[str], None]] = None, store: object = None,
                 rank: Optional[int] = None, world: Optional[int] = None,
                 prefix: str = 'mmlinattn/heartbeat') -> None:
        import torch.distributed as dist
        if stall_s <= 2 * interval:
            raise ValueError(f'stall_s={stall_s} must exceed twice the interval ({interval} s)')
        self.store = store if store is not None else heartbeat_store()
        self.rank = dist.get_rank() if rank is None else rank
        self.world = dist.get_world_size() if world is None else world
        self.stall_s, self.interval, self.where = stall_s, interval, where
        self.on_lost = on_lost or _exit_lost
        self.prefix = prefix
        self._stop = threading.Event()
        self._beats = 0
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it moved)
        self._thread = threading.Thread(target=self._run, name='mmlinattn-heartbeat',
                                        daemon=True)

    def _key(self, rank: int) -> str:
        return f'{self.prefix}/{rank}'

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval)
        if self in _CURRENT:
            _CURRENT.remove(self)

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(self._key(self.rank), str(self._beats))

    def silent(self) -> list[tuple[int, float]]:
        """The peers whose counter has not moved, with the seconds since it last did
        (``inf`` when the store itself cannot be reached: its host, rank 0, is gone)."""
        now = time.monotonic()
        out = []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                value = int(self.store.get(self._key(r))) if self.store.check(
                    [self._key(r)]) else 0
            except Exception:  # the store's server (rank 0) is gone
                return [(0, float('inf'))] if self.rank != 0 else out
            count, since = self._seen.get(r, (-1, now))
            if value != count:
                self._seen[r] = (value, now)
            else:
                out.append((r, now - since))
        return out

    def lost(self) -> list[tuple[int, float]]:
        """The peers silent for longer than ``stall_s``."""
        return [(r, s) for r, s in self.silent() if s > self.stall_s]

    def message(self, lost: list[tuple[int, float]], what: str = '') -> str:
        names = ', '.join(f'rank {r} ' + ('(its store is unreachable)' if s == float('inf')
                                         else f'(silent for {s:.0f} s)') for r, s in lost)
        where = self.where() if self.where is not None else ''
        return (f'rank {self.rank}: lost {names}{"; " + where if where else ""}'
                f'{"; " + what if what else ""}: stopping this rank (exit {LOST_RANK_EXIT}); '
                'torchrun --max-restarts restarts the group, and a run started with '
                '--resume goes on from its last checkpoint or row')

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                lost = self.lost()
            except Exception:
                lost = [(0, float('inf'))] if self.rank != 0 else []
            if lost:
                self.on_lost(self.message(lost))
                return


def _exit_lost(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(LOST_RANK_EXIT)


def describe_lost(error: BaseException) -> Optional[str]:
    """A one-line message naming the lost peers, for a collective's ``error``, when a
    heartbeat runs and a peer is silent (waiting up to three beats to be sure)."""
    beat = current_heartbeat()
    if beat is None:
        return None
    deadline = time.monotonic() + 3 * beat.interval
    while True:
        silent = [(r, s) for r, s in beat.silent() if s >= 2 * beat.interval]
        if silent or time.monotonic() > deadline:
            break
        time.sleep(beat.interval / 2)
    if not silent:
        return None
    first = ' '.join(str(error).split())[:200]
    return beat.message(silent, f'the collective failed: {first}')


@contextlib.contextmanager
def watch_group(stall_s: float, where: Optional[Callable[[], str]] = None,
                interval: float = 1.0) -> Iterator[Optional[Heartbeat]]:
    """Within the block, a :class:`Heartbeat` when a process group of several ranks is
    initialised (else nothing); a collective that fails because a peer is silent
    raises :class:`LostRankError` naming it."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        yield None
        return
    with Heartbeat(stall_s, min(interval, stall_s / 4), where) as beat:
        try:
            yield beat
        except dist.DistError as e:
            message = describe_lost(e)
            if message is None:
                raise
            raise LostRankError(message) from e
