"""How the C heap returns memory: kept for reuse while the chunked backbone runs.

glibc serves every allocation over its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back on free, so each tile's or band's maps are faulted in and
zeroed anew: a 4096^2 Mask R-CNN run by regions took 20.5 million minor page faults and
27% of its CPU time in the kernel. Served from the heap and kept there when freed, the
buffers are reused (the same run: 1.8 million faults, 19% less time). The memory in use
is unchanged, but the heap fragments as map sizes change: the resident size grows well
past it (RssAnon 12.4 GiB for 3.75 GiB in use at 16384^2), so it is not the default
for a whole run. (Transparent huge pages for torch's allocations,
``THP_MEM_ALLOC_ENABLE=1``, cut the faults 20-fold but not the kernel's time: the pages
are still zeroed anew.)

The chunked backbone is where reuse is safe: band after band it allocates buffers of
the same few sizes, so a freed buffer is taken again whole and the heap does not
fragment. :func:`reused_heap` keeps freed memory for the time of a block and gives the
free pages back (``malloc_trim``) when it ends; by regions at 16384^2 that cut the
backbone's time by a third (see docs/large_images.md). A loop whose steps allocate
varying sizes (detection tiles) calls :func:`trim_retained` after each step, which
gives the free pages back once more than a set amount of freed memory is resident;
a loop of same-size steps (Semantic FPN tiles) uses :class:`RetainedBound`, whose amount
follows what its first step keeps.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Any, Iterator, Optional

__all__ = ['keep_freed_memory', 'reused_heap', 'trim_retained', 'RetainedBound',
           'retained_bytes', 'RETAINED_SLACK', 'anon_rss_bytes', 'mallinfo2']

#: Freed memory a loop under :func:`reused_heap` may keep resident from one step (a
#: tile) to the next before :func:`trim_retained` gives its pages back.
RETAINED_SLACK = 2 * 2**30

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's defaults after a long run: the dynamic mmap threshold at its ceiling
#: (32 MiB on 64-bit), the trim threshold twice that, 65536 mmap'ed chunks at most.
_SETTLED = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 64 * 2**20),
            (_M_MMAP_MAX, 65536), (_M_TOP_PAD, 128 * 2**10))


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (byte counts over every arena)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[Any]:
    """glibc, with ``mallopt`` and ``malloc_trim`` typed, or None for another C library
    (whose ``mallopt`` parameters differ)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        if not hasattr(libc, 'gnu_get_libc_version'):
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def _load_mallinfo2() -> Optional[Any]:
    libc = _glibc()
    fn = getattr(libc, 'mallinfo2', None)  # glibc >= 2.33
    if fn is None:
        return None
    fn.restype = MallInfo2
    fn.argtypes = []
    return fn


#: ``mallinfo2()`` of glibc >= 2.33, else None.
mallinfo2 = _load_mallinfo2()


def anon_rss_bytes() -> int:
    """Private resident memory of this process (``RssAnon``): what it holds that the
    kernel cannot drop, unlike the page cache of memory-mapped files; 0 where unknown."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _keep(libc: Any, top_pad: int) -> bool:
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= libc.mallopt(_M_TOP_PAD, top_pad) == 1
    return bool(ok)


@functools.lru_cache(maxsize=1)
def keep_freed_memory(top_pad: int = 256 * 2**20) -> bool:
    """Serve large allocations from the heap and keep freed memory there for the rest
    of the process (glibc's ``mallopt``: no mmap'ed chunks, no trimming, the heap grown
    ``top_pad`` bytes at a time). Returns False where the C library is not glibc
    (nothing changed)."""
    libc = _glibc()
    return libc is not None and _keep(libc, top_pad)


@contextlib.contextmanager
def reused_heap(top_pad: int = 256 * 2**20) -> Iterator[bool]:
    """Within the block, large buffers come from the heap and stay there when freed, for
    the next one of their size; at its end the heap's free pages go back to the system
    (``malloc_trim``) and large buffers are mapped and unmapped again. Yields whether
    that applies (glibc, and :func:`keep_freed_memory` not already in force)."""
    libc = _glibc()
    if libc is None or keep_freed_memory.cache_info().currsize:
        yield False
        return
    _keep(libc, top_pad)
    try:
        yield True
    finally:
        for param, value in _SETTLED:
            libc.mallopt(param, value)
        libc.malloc_trim(0)


def retained_bytes() -> Optional[int]:
    """Freed memory the heap keeps resident: the private resident memory less the bytes
    in use (glibc's ``mallinfo2``); None without it."""
    if _glibc() is None or mallinfo2 is None:
        return None
    info = mallinfo2()
    return anon_rss_bytes() - (info.uordblks + info.hblkhd)


def trim_retained(slack: int = RETAINED_SLACK) -> bool:
    """Give the heap's free pages back to the system (``malloc_trim``) when the private
    resident memory exceeds the memory in use by more than ``slack`` bytes; for a loop
    under :func:`reused_heap` whose steps allocate different sizes (tiles), so that the
    kept memory is reused from one step to the next but bounded. Returns whether it
    trimmed (never without glibc's ``mallinfo2``)."""
    kept = retained_bytes()
    if kept is None or kept <= slack:
        return False
    _glibc().malloc_trim(0)
    return True


class RetainedBound:
    """:func:`trim_retained` for a loop whose steps take about the same buffers (tiles
    of one size): what the first step leaves resident once its buffers are freed is
    what every later step takes again, so the bound is ``max(slack, factor x that)``
    bytes, set after the first call. A fixed bound below one step's buffers trims after
    every step, and every step faults its buffers in and zeroes them anew: float32
    Semantic FPN tiles of 2048 px keep more than 2 GiB, and under the 2 GiB bound all 16
    tiles of an 8192^2 image were trimmed (12.1 M page faults, 36 s of kernel time).
    Call it after each step; returns whether it trimmed."""

    def __init__(self, slack: int = RETAINED_SLACK, factor: float = 1.5) -> None:
        self.slack, self.factor = slack, factor
        self.bound: Optional[int] = None

    def __call__(self) -> bool:
        if self.bound is None:
            kept = retained_bytes()
            if kept is None:
                return False
            self.bound = max(self.slack, int(self.factor * kept))
        return trim_retained(self.bound)
