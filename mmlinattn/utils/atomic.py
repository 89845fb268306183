"""Files that appear whole or not at all.

A file is written under a temporary name in its own folder, flushed and fsynced, then
renamed over its final name (an atomic step on POSIX file systems), and the folder is
fsynced so that the rename survives a power cut. A process killed at any instant leaves
either the old file or the new one, plus at most a ``.partial`` file that nothing reads.
"""
from __future__ import annotations

import contextlib
import errno
import os
import os.path as osp
import tempfile
from typing import IO, Iterator

__all__ = ['atomic_write', 'write_bytes_atomic', 'write_text_atomic', 'PARTIAL_SUFFIX',
           'remove_partials', 'sync_and_replace']

#: The suffix of files being written (left behind only by a killed process).
PARTIAL_SUFFIX = '.partial'


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', encoding: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing so that it appears only once the block has finished
    without an exception. A full disk raises ``OSError(ENOSPC)`` naming the file and
    leaves the previous file, if any, untouched."""
    if mode not in ('wb', 'w'):
        raise ValueError(f'atomic_write: mode must be "wb" or "w", got {mode!r}')
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix=PARTIAL_SUFFIX,
                               dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # what open() would have given the file
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f'no space left on the device writing {path}: nothing '
                          'was replaced; free some space and run again (or resume)') from e
        raise
    _fsync_folder(folder)


def sync_and_replace(tmp: str, path: str) -> None:
    """Flush the finished file ``tmp`` to the disk and rename it to ``path`` (for files
    a library writes by name)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_folder(osp.dirname(osp.abspath(path)))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """``path`` holds ``data``, or what it held before (see :func:`atomic_write`)."""
    with atomic_write(path, 'wb') as f:
        f.write(data)


def write_text_atomic(path: str, text: str, encoding: str = 'utf-8') -> None:
    """``path`` holds ``text``, or what it held before (see :func:`atomic_write`)."""
    with atomic_write(path, 'w', encoding=encoding) as f:
        f.write(text)


def remove_partials(folder: str) -> list[str]:
    """Remove the ``.partial`` files a killed writer left in ``folder``; their names."""
    removed = []
    if osp.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith('.') and name.endswith(PARTIAL_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(osp.join(folder, name))
                    removed.append(name)
    return removed
