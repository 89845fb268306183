"""Memory in use by a CPU worker, and its out-of-memory judgement.

Resident memory (RSS) is the wrong measure for a benchmark worker that keeps
freed memory for stable latency (see ``STEADY_MALLOC_ENV`` in the runner): freed
blocks stay resident, the heap fragments, and RSS grows far past what the model
holds. What a case *uses* is the heap's allocated bytes: glibc's ``mallinfo2()``
reports ``uordblks`` (bytes in allocated heap chunks, over every arena) and
``hblkhd`` (bytes in blocks it mmap'ed directly); their sum is memory in use, and
freed-but-kept memory is in neither. Where glibc is not available the current RSS
stands in, and the measure says so.

:class:`MemoryWatch` samples that measure in a thread of the worker, keeps its
peak, and stops the worker with an ``oom`` result the moment it passes the limit.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
from typing import Callable, Optional

from ..utils.heap import anon_rss_bytes, mallinfo2

__all__ = ['heap_in_use_bytes', 'anon_rss_bytes', 'in_use_measure', 'MemoryWatch',
           'machine_memory_bytes']


_MALLINFO2 = mallinfo2


def _current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def heap_in_use_bytes() -> int:
    """Bytes of memory this process has allocated and not freed (see the module docstring)."""
    if _MALLINFO2 is None:
        return _current_rss_bytes()
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def in_use_measure() -> str:
    """What :func:`heap_in_use_bytes` measures here, for result tables."""
    return ('heap in use (glibc mallinfo2: allocated + mmapped bytes)' if _MALLINFO2 is not None
            else 'current RSS (glibc mallinfo2 unavailable)')


def machine_memory_bytes() -> Optional[int]:
    """Physical memory of this machine, or None where it cannot be read."""
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


class MemoryWatch:
    """Sample memory in use every ``interval_s``; keep the peak; enforce ``limit_bytes``.

    Used as a context manager around the measured work. Past the limit, ``on_exceed``
    runs in the watching thread (default: print an ``oom`` result line with
    ``result_prefix`` and end the process at once, so that nothing larger is
    allocated). Peaks shorter than the interval can be missed; the torch calls
    measured here hold their buffers for far longer.
    """

    def __init__(self, limit_bytes: Optional[float] = None, interval_s: float = 0.002,
                 result_prefix: str = '', on_exceed: Optional[Callable[[int], None]] = None
                 ) -> None:
        self.limit = limit_bytes
        self.interval_s = interval_s
        self.result_prefix = result_prefix
        self.on_exceed = on_exceed or self._stop_process
        self.start = heap_in_use_bytes()
        self.peak = self.start
        self.peak_anon = anon_rss_bytes()  # sampled every 10th sample (a /proc read)
        self._samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name='memory-watch', daemon=True)

    def sample(self) -> int:
        now = heap_in_use_bytes()
        self.peak = max(self.peak, now)
        self._samples += 1
        if self._samples % 10 == 1:
            self.peak_anon = max(self.peak_anon, anon_rss_bytes())
        if self.limit is not None and now > self.limit:
            self.on_exceed(now)
        return now

    def _watch(self) -> None:
        while not self._done.wait(self.interval_s):
            self.sample()

    def _stop_process(self, now: int) -> None:
        limit_gib = self.limit / 2**30
        print(self.result_prefix + json.dumps(dict(
            status='oom', limit_gib=round(limit_gib, 3), in_use_gib=round(now / 2**30, 3),
            error=f'memory in use ({now / 2**30:.2f} GiB, {in_use_measure()}) passed the '
            f'{limit_gib:.3g} GiB limit; the worker stopped itself')), flush=True)
        sys.stderr.flush()
        os._exit(0)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.sample()
