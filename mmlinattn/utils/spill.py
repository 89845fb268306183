"""Feature maps on disk: memory-mapped tensors for maps larger than memory.

At 32768^2 pixels the four output maps of a PVT-S backbone alone are 31 GiB in
fp32, more than the machine holds. Inside :func:`spill_maps`, every map that
chunked inference allocates whole (a block's output, an embedding's output, a
stage's NCHW copy) and that is at least ``min_bytes`` comes from
:func:`new_map` as a tensor backed by a file in the spill folder, mapped shared:
the computation writes and reads it band by band, and the kernel keeps in memory
only the pages in use (clean pages are dropped under pressure; nothing is
private memory). The values are the same as in memory: only where the bytes live
changes. A map's blocks are reserved on the disk when it is created, so that a full
disk is an error naming the map (``OSError(ENOSPC)``) rather than a SIGBUS later.

A freed map's file serves the next map of its size (a block's output, then the next
block's, where blocks do not write over their input): its pages are still in the page
cache, so writing the new map neither allocates nor zeroes them again, nor converts the
file's reserved blocks (at 16384^2 px that took the backbone's system time from 121 to
74 s, before a stage's blocks wrote over one map). The file is reused only once
its memory is unmapped (no view of it left), never once kept.

A map's file is removed when the spill ends (or when a second file of its size is
freed); :meth:`SpillStore.keep` keeps one under a name (a run's outputs, for
``--resume``), and :func:`spill_maps` clears the files a killed run left in its
folder.
"""
from __future__ import annotations

import contextlib
import errno
import os
import os.path as osp
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ['SpillStore', 'spill_maps', 'current_spill', 'new_map', 'persistent_map',
           'open_persistent_map', 'release_rows']

#: Storage addresses of the tensors mapped from files (see :func:`release_rows`).
_FILE_BACKED: dict[int, int] = {}
_MADV_REMOVE = 9  # Linux: free the range's pages and its blocks in the file
#: Files of freed maps kept for the next map of the same size, per size.
MAX_POOLED_FILES = 1


@dataclass
class SpillStore:
    """Where spilled maps go: ``folder``; maps of at least ``min_bytes`` spill.
    ``spilled_bytes``/``peak_bytes``: bytes created so far and the most mapped at once;
    ``files``/``reused``: maps given a fresh file and a freed map's file; ``closed``:
    the spill has ended (freed files are removed, not kept for reuse)."""

    folder: str
    min_bytes: int = 64 * 2**20
    spilled_bytes: int = 0  # every map ever spilled
    live_bytes: int = 0
    peak_bytes: int = 0
    files: int = 0
    reused: int = 0
    closed: bool = False
    _live: dict = field(default_factory=dict, repr=False)
    _free: dict = field(default_factory=dict, repr=False)

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised CPU tensor of ``shape`` backed by a file: one a freed map of
        the same size left (its pages still in the page cache), else a fresh one. The
        file is given back when the tensor's memory is freed (unless :meth:`keep`
        names it first)."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        pooled = self._free.get(nbytes)
        reusing = bool(pooled)
        if reusing:
            path = pooled.pop()
        else:
            fd, path = tempfile.mkstemp(prefix='map-', suffix='.bin', dir=self.folder)
            os.close(fd)
        try:
            # Reserved again when reused: release_rows may have punched holes in it.
            t = _map_file(path, shape, dtype, create=True)
        except BaseException:
            os.unlink(path)
            raise
        if reusing:
            self.reused += 1
        else:
            self.files += 1
        self.spilled_bytes += nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        # The file is reused or removed once the mapping is gone (the storage freed: a
        # view that outlives the tensor keeps it); ``owns`` follows the tensor itself.
        record = [path]
        weakref.finalize(t.untyped_storage(), self._unmapped, record, nbytes)
        self._live[id(t)] = (record, nbytes, weakref.finalize(t, self._live.pop, id(t), None))
        return t

    def summary(self) -> dict:
        """What went to the disk, for a run's report: files, GiB spilled and most
        mapped at once."""
        return dict(files=self.files, reused=self.reused,
                    spilled_gib=self.spilled_bytes / 2**30,
                    peak_mapped_gib=self.peak_bytes / 2**30)

    def owns(self, t: Tensor) -> bool:
        """Whether ``t`` is a live map allocated by this store."""
        return id(t) in self._live

    def keep(self, t: Tensor, dest: str) -> None:
        """Keep the file of a spilled map ``t`` as ``dest`` (a run's outputs, reopened
        by :func:`open_persistent_map` on ``--resume``)."""
        entry = self._live.get(id(t))
        if entry is None:
            raise ValueError('keep(): the tensor is not a map allocated by this store')
        record = entry[0]
        os.replace(record[0], dest)
        record[0] = None

    def _unmapped(self, record: list, nbytes: int) -> None:
        self.live_bytes -= nbytes
        path = record[0]
        if path is None:  # kept
            return
        pooled = self._free.setdefault(nbytes, [])
        if not self.closed and len(pooled) < MAX_POOLED_FILES:
            pooled.append(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Remove the files kept for reuse; the maps freed after this remove theirs."""
        self.closed = True
        for paths in self._free.values():
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._free.clear()


_CURRENT: list[SpillStore] = []


def current_spill() -> Optional[SpillStore]:
    """The active :class:`SpillStore`, or None."""
    return _CURRENT[-1] if _CURRENT else None


@contextlib.contextmanager
def spill_maps(folder: str, min_bytes: int = 64 * 2**20) -> Iterator[SpillStore]:
    """Within the block, :func:`new_map` puts maps of ``min_bytes`` or more in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # maps of a run that was killed: never reused
        if name.startswith('map-') and name.endswith('.bin'):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(osp.join(folder, name))
    if not os.access(folder, os.W_OK):
        raise PermissionError(f'spill folder {folder} is not writable')
    store = SpillStore(folder, min_bytes)
    _CURRENT.append(store)
    try:
        yield store
    finally:
        _CURRENT.remove(store)
        store.close()


def new_map(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = 'cpu'
            ) -> Tensor:
    """An uninitialised tensor for a whole map: on disk when a spill is active, the map
    is on the CPU and at least the store's ``min_bytes``; else ``torch.empty``."""
    store = current_spill()
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if store is None or torch.device(device).type != 'cpu' or nbytes < store.min_bytes:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return store.allocate(shape, dtype)


def persistent_map(path: str, shape: Sequence[int], dtype: torch.dtype,
                   fill: Optional[int] = None) -> Tensor:
    """A tensor backed by the file ``path`` (created, zero-filled by the file system,
    or set to ``fill`` a band of rows at a time), which stays after the run."""
    t = _map_file(path, shape, dtype, create=True)
    if fill:
        for r in range(0, t.shape[0], 1024):
            t[r:r + 1024].fill_(fill)
    return t


def open_persistent_map(path: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """The tensor of an existing :func:`persistent_map` file; its size must match."""
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if not osp.isfile(path) or osp.getsize(path) != expected:
        raise FileNotFoundError(f'{path}: missing or not {expected} bytes')
    return _map_file(path, shape, dtype, create=False)


def _fallocate(fd: int, nbytes: int) -> int:
    """``fallocate(2)`` of ``nbytes`` from 0 (mode 0: reserve the blocks, read as zeros):
    0, or the errno. Unlike ``posix_fallocate``, a file system without it answers
    EOPNOTSUPP instead of having every block written with zeros."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, 'fallocate64', None) or getattr(libc, 'fallocate', None)
    if fallocate is None:
        return errno.EOPNOTSUPP
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if fallocate(fd, 0, 0, nbytes) == 0 else ctypes.get_errno()


def _size(nbytes: int) -> str:
    return f'{nbytes / 2**30:.2f} GiB' if nbytes >= 2**30 else f'{nbytes / 2**20:.1f} MiB'


def _reserve(f: BinaryIO, path: str, nbytes: int) -> None:
    """Size the file ``nbytes`` and reserve its blocks on the disk now. A map's pages are
    written through a shared mapping: a block the disk cannot give then would kill the
    process with SIGBUS in the middle of a computation, so a full disk must show here,
    as an error naming the map, before anything is written to it."""
    if nbytes and (err := _fallocate(f.fileno(), nbytes)) in (errno.ENOSPC, errno.EDQUOT):
        folder = osp.dirname(osp.abspath(path))
        free = shutil.disk_usage(folder).free
        raise OSError(err, f'no space left on the device for a map of {_size(nbytes)} in '
                           f'{folder} ({_size(free)} free): free space (or spill elsewhere) '
                           f'and rerun with --resume')
    # Elsewhere (a file system without fallocate) the file stays sparse.
    f.truncate(nbytes)


def _map_file(path: str, shape: Sequence[int], dtype: torch.dtype, create: bool) -> Tensor:
    numel = torch.Size(shape).numel()
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if create:
        with open(path, 'r+b' if osp.exists(path) else 'w+b') as f:
            _reserve(f, path, nbytes)
    flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    address = flat.untyped_storage().data_ptr()
    _FILE_BACKED[address] = nbytes
    weakref.finalize(flat.untyped_storage(), _FILE_BACKED.pop, address, None)
    return flat.view(tuple(shape))


def release_rows(t: Tensor, stop: int) -> int:
    """Give back the pages of rows ``[0, stop)`` (dim 2) of a file-backed NCHW map
    that nothing will read again: the kernel drops them from the page cache without
    writing them out and the file's blocks are freed (reading them afterwards gives
    zeros). Keeps a pass over a map larger than memory from pushing out the pages
    still needed, and from writing dead ones to the disk. No-op (0) for a map in
    memory or a file system that cannot punch holes; returns the bytes released."""
    storage = t.untyped_storage()
    if (storage.data_ptr() not in _FILE_BACKED or t.dim() != 4 or stop <= 0
            or not t.is_contiguous()):
        return 0
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    n, c, h, w = t.shape
    stop = min(stop, h)
    row = w * t.element_size()
    released = 0
    base = t.data_ptr()
    for i in range(n * c):
        start = base + i * h * row
        lo = -(-start // page) * page  # whole pages inside the rows only
        hi = (start + stop * row) // page * page
        if hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo),
                                    _MADV_REMOVE) == 0:
            released += hi - lo
        elif hi > lo:
            return released  # not supported here: nothing more to gain
    return released
