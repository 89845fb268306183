"""Run a function on R CPU processes joined in a gloo group (tests of spatial parallelism)."""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple,
           errors: Any) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A collective that another rank never reaches fails in seconds, not CI's hour.
    dist.init_process_group('gloo', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
    except BaseException:  # report every rank's failure, not only the first
        errors.put(f'rank {rank}:\n{traceback.format_exc()}')
        raise
    finally:
        dist.destroy_process_group()


#: Seconds a rank waits in one collective; every case here is a few seconds of work.
COLLECTIVE_TIMEOUT_S = 120
#: Seconds all ranks of one ``run_ranks`` call have before they are killed.
DEADLINE_S = 300


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(rank, world, *args)`` on ``world`` processes; raises with every rank's
    traceback when any fails. ``fn`` must be importable (a module-level function)."""
    ctx = mp.get_context('spawn')
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:  # a collective that one rank never reached: do not leave them waiting
        p.kill()
        p.join()
    failed = [f'{len(hung)} rank(s) hung and were killed'] if hung else []
    while not errors.empty():
        failed.append(errors.get())
    codes = [p.exitcode for p in procs]
    if failed or any(c != 0 for c in codes):
        raise AssertionError(f'exit codes {codes}\n' + '\n'.join(failed))
