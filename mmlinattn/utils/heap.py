"""How the C heap returns memory: kept for reuse in long runs of large maps.

glibc serves every allocation over its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back on free, so each tile's or band's maps fault their pages in
anew: a 4096^2 Mask R-CNN run by regions took 21.9 million minor page faults and 23% of
its CPU time in the kernel. Served from the heap and kept there when freed, the same
buffers are reused without faults (the same run: 1.4 million faults, 26% less time).
The memory in use is unchanged; the resident size keeps the heap's peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

__all__ = ['keep_freed_memory', 'trim_freed_memory']

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def keep_freed_memory(top_pad: int = 256 * 2**20) -> bool:
    """Serve large allocations from the heap and keep freed memory there (glibc's
    ``mallopt``: no mmap'ed chunks, no trimming, the heap grown ``top_pad`` bytes at a
    time). Call once before the large work; returns False where the C library is not
    glibc (nothing changed)."""
    path = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
        if not hasattr(libc, 'gnu_get_libc_version'):  # other C libraries' mallopt differ
            return False
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, top_pad) == 1
    return bool(ok)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    if not hasattr(libc, 'mallinfo2') or not hasattr(libc, 'malloc_trim'):
        return None  # not glibc >= 2.33
    libc.mallinfo2.restype = _MallInfo2
    libc.mallinfo2.argtypes = []
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def trim_freed_memory(keep_bytes: int = 2**30) -> bool:
    """Give the heap's free pages back to the system when more than ``keep_bytes`` of
    it are free (``malloc_trim``). A heap that keeps what it frees fragments as map
    sizes change (a band, a border tile, an interior one); called between units of work
    this bounds the resident size to the memory in use plus ``keep_bytes``. Returns
    whether it trimmed."""
    libc = _libc()
    if libc is None or libc.mallinfo2().fordblks <= keep_bytes:
        return False
    libc.malloc_trim(0)
    return True
