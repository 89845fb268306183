"""Ranks of a gloo group for tests/test_parallel/test_watchdog.py (spawned processes)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mmlinattn.parallel.watchdog import Heartbeat


def one_rank_goes_silent(rank: int, world: int, silent: int) -> None:
    """Rank ``silent`` stops beating (as a stopped or killed process would); every
    other rank must name it within about stall_s and keep beating with the rest."""
    heard: list[str] = []
    beat = Heartbeat(stall_s=1.5, interval=0.25, on_lost=heard.append,
                     where=lambda: 'iteration 7')
    beat.__enter__()
    dist.barrier()
    if rank == silent:
        beat.__exit__(None)
        time.sleep(2.5)
    else:
        start = time.monotonic()
        while not heard and time.monotonic() - start < 10.0:
            time.sleep(0.05)
        took = time.monotonic() - start
        beat.__exit__(None)
        assert len(heard) == 1, heard
        assert f'rank {rank}: lost rank {silent} (silent for' in heard[0], heard[0]
        # About stall_s (more on a loaded machine, never less).
        assert 'iteration 7' in heard[0] and 1.5 <= took < 8.0, (heard[0], took)
    dist.barrier()


def every_rank_alive_is_never_lost(rank: int, world: int) -> None:
    """Busy main threads (a long computation) still beat: nothing is reported."""
    heard: list[str] = []
    with Heartbeat(stall_s=3.0, interval=0.3, on_lost=heard.append):
        x = torch.randn(256, 256)
        end = time.monotonic() + 4.0
        while time.monotonic() < end:  # the main thread busy, holding the GIL often
            x = (x @ x).tanh()
        dist.barrier()
    assert heard == [], heard
