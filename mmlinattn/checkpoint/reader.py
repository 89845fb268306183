"""Reading torch checkpoint files without running anything in them.

The file is parsed here, never handed to ``torch.load`` (which sends TorchScript
archives to ``torch.jit.load``, and allocates what a legacy file declares before
reading it). Two formats are read, as ``torch.save`` writes them:

* the zip archive (torch >= 1.6): ``<archive>/data.pkl`` plus one stored record
  per storage, ``<archive>/data/<key>``;
* the legacy stream (``_use_new_zipfile_serialization=False``): magic number,
  protocol, system info, the object pickle, the storage keys, then each storage
  as an 8-byte element count and its bytes.

Before anything is unpickled: TorchScript archives (``constants.pkl``,
``bytecode.pkl``, ``code/``) are refused with :class:`UnsafeCheckpointError`;
every zip record must lie inside the file, uncompressed; a legacy file may not
declare more storage bytes than it holds. The object pickle is read by
:class:`~.unpickler.RestrictedUnpickler`. Anything else that is wrong with a file
raises :class:`CheckpointFormatError` naming the file.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Mapping, Optional, Union

import torch

from .errors import CheckpointError, CheckpointFormatError, UnsafeCheckpointError
from .safetensors_io import is_safetensors, read_safetensors
from .unpickler import RestrictedUnpickler, StorageRef, StorageType, UntrustedObject

__all__ = ['read_checkpoint', 'safe_load', 'relocate', 'MAGIC_NUMBER']

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
BuildTypes = Mapping[type, Optional[Callable[[Any], None]]]
MapLocation = Union[None, str, torch.device, Mapping[str, str], Callable[..., Any]]

#: First object of a legacy torch checkpoint, then its protocol version.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_LOCAL_HEADER = struct.Struct('<4s5H3L2H')  # zip local file header, 30 bytes
_TORCHSCRIPT_RECORDS = ('constants.pkl', 'bytecode.pkl')


def read_checkpoint(source: Union[PathLike, BinaryIO],
                    extra_globals: Optional[Mapping[tuple[str, str], Any]] = None,
                    build_types: Optional[BuildTypes] = None) -> tuple[Any, set[str]]:
    """Read a torch checkpoint safely: ``(object, names kept inert)``.

    Args:
        source: a path, or a seekable binary file object.
        extra_globals: more trusted ``(module, name) -> object`` entries for the
            unpickler (e.g. what mmengine runners pickle).
        build_types: classes whose ``__setstate__`` may run, each with a check of
            the state to run first (or None).

    Tensors come back on the CPU, sharing memory per storage as ``torch.load``'s
    do. Raises :class:`FileNotFoundError`, :class:`UnsafeCheckpointError` or
    :class:`CheckpointFormatError`.
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f'checkpoint file not found: {source}')
        with open(source, 'rb') as f:
            return _read(f, os.fspath(source), extra_globals, build_types)
    return _read(source, getattr(source, 'name', '<in-memory checkpoint>'), extra_globals,
                 build_types)


def _read(f: BinaryIO, name: str, extra_globals: Optional[Mapping[tuple[str, str], Any]],
          build_types: Optional[BuildTypes]) -> tuple[Any, set[str]]:
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if size == 0:
        raise CheckpointFormatError(name, 'the file is empty')
    head = f.read(512)
    f.seek(0)
    reader = _ZipReader if head[:4] == b'PK\x03\x04' else (
        _LegacyReader if head[:1] == b'\x80' else None)
    if reader is None:
        if head[257:262] == b'ustar':
            raise CheckpointFormatError(name, 'a tar archive (the torch < 0.4 format is not '
                                        'supported; re-save it with a current torch)')
        raise CheckpointFormatError(name, f'unknown format (starts with {head[:8]!r}); a torch '
                                    'checkpoint is a zip archive or a binary pickle stream')
    try:
        return reader(f, name, size, extra_globals, build_types).read()
    except CheckpointError:
        raise
    except Exception as e:  # truncated, corrupt or hostile: one error type, with the file
        raise CheckpointFormatError(name, f'{type(e).__name__}: {e}') from e


class _Reader:
    def __init__(self, f: BinaryIO, name: str, size: int,
                 extra_globals: Optional[Mapping[tuple[str, str], Any]],
                 build_types: Optional[BuildTypes]) -> None:
        self.f, self.name, self.size = f, name, size
        self.extra_globals, self.build_types = extra_globals, build_types
        self.refused: set[str] = set()

    def unpickle(self, stream: BinaryIO,
                 persistent_load: Optional[Callable[[Any], Any]] = None) -> Any:
        unpickler = RestrictedUnpickler(stream, persistent_load, self.extra_globals,
                                        self.build_types, max_bytes=self.size)
        obj = unpickler.load()
        self.refused |= unpickler.refused
        return obj

    def fail(self, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(self.name, problem)

    def read_into(self, offset: int, nbytes: int, what: str,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``nbytes`` bytes of the file from ``offset``, as a ``uint8`` tensor (or into ``out``)."""
        if offset < 0 or offset + nbytes > self.size:
            raise self.fail(f'{what} declares {nbytes} bytes at offset {offset}; the file has '
                            f'{self.size} bytes')
        data = torch.empty(nbytes, dtype=torch.uint8) if out is None else out
        self.f.seek(offset)
        if nbytes and self.f.readinto(memoryview(data.numpy())) != nbytes:
            raise self.fail(f'{what} is truncated')
        return data

    def storage_id(self, pid: Any, length: int) -> tuple[Optional[StorageType], str, int, tuple]:
        """``(type, key, numel, rest)`` of a ``('storage', ...)`` persistent id of ``length``.

        The type is None for storages we do not read (quantized, or a name we do
        not know): the caller returns an inert stand-in for those, without reading.
        """
        if not isinstance(pid, tuple) or len(pid) != length or pid[0] not in ('storage',
                                                                              b'storage'):
            raise self.fail(f'unexpected persistent id {pid!r:.120}')
        stype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(stype, StorageType):
            stype = None
        key = key.decode('ascii') if isinstance(key, bytes) else key
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise self.fail(f'malformed storage id {pid!r:.120}')
        return stype, key, numel, pid[5:]


class _ZipReader(_Reader):
    """``torch.save``'s zip archive."""

    def read(self) -> tuple[Any, set[str]]:
        try:
            archive = zipfile.ZipFile(self.f)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
            raise self.fail(f'corrupt or truncated zip archive ({e})') from None
        records = self.index(archive)
        byteorder = 'little'
        if 'byteorder' in records:
            byteorder = self.record(records['byteorder'], 'byteorder').numpy().tobytes().decode()
            if byteorder not in ('little', 'big'):
                raise self.fail(f'byteorder record says {byteorder!r:.20}')
        pickled = self.record(records['data.pkl'], 'data.pkl').numpy().tobytes()
        loaded: dict[str, torch.Tensor] = {}

        def persistent_load(pid: Any) -> Union[StorageRef, UntrustedObject]:
            stype, key, numel, _ = self.storage_id(pid, 5)
            if stype is None:
                return UntrustedObject(pid[1])
            nbytes = numel * stype.dtype.itemsize
            if key not in loaded:
                info = records.get(f'data/{key}')
                if info is None:
                    raise self.fail(f'storage {key!r:.40} has no record data/{key:.40}')
                if info.file_size != nbytes:
                    raise self.fail(f'storage {key} declares {nbytes} bytes; its record holds '
                                    f'{info.file_size}')
                data = self.record(info, f'record data/{key}', check_crc=False)
                if byteorder != 'little' and data.numel():
                    data.untyped_storage().byteswap(stype.dtype)
                loaded[key] = data
            elif loaded[key].numel() < nbytes:
                raise self.fail(f'storage {key} is read as {nbytes} bytes and as '
                                f'{loaded[key].numel()}')
            return StorageRef(loaded[key][:nbytes], stype.dtype)

        return self.unpickle(io.BytesIO(pickled), persistent_load), self.refused

    def index(self, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
        """Records by name inside the archive folder, checked before any is read."""
        infos = archive.infolist()
        folders = {info.filename.split('/', 1)[0] for info in infos}
        if len(folders) != 1 or any('/' not in info.filename for info in infos):
            raise self.fail('a zip archive whose records do not share one folder: not written '
                            'by torch.save')
        records = {info.filename.split('/', 1)[1]: info for info in infos}
        code = sorted(r for r in records if r in _TORCHSCRIPT_RECORDS or r.startswith('code/'))
        if code:
            raise UnsafeCheckpointError(
                self.name, 'a TorchScript archive (records ' + ', '.join(code[:3]) +
                (', ...' if len(code) > 3 else '') + '): loading it would run the code it '
                'carries (torch.load hands such files to torch.jit.load). mmlinattn reads plain '
                'checkpoints only; re-save the weights with torch.save(model.state_dict(), '
                'path) where you trust the file')
        if 'data.pkl' not in records:
            raise self.fail('a zip archive without data.pkl: not a torch checkpoint')
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise self.fail(f'record {info.filename} is compressed or encrypted; torch.save '
                                'stores records as they are')
            self.data_offset(info)  # bounds of every record, before reading any
        return records

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes start, checked to fit in the file with its declared size."""
        self.f.seek(info.header_offset)
        header = self.f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b'PK\x03\x04':
            raise self.fail(f'record {info.filename} has no local header at offset '
                            f'{info.header_offset}')
        fields = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if start + info.file_size > self.size:
            raise self.fail(f'record {info.filename} declares {info.file_size} bytes; the file '
                            f'holds {max(self.size - start, 0)} after its header')
        return start

    def record(self, info: zipfile.ZipInfo, what: str, check_crc: bool = True) -> torch.Tensor:
        data = self.read_into(self.data_offset(info), info.file_size, what)
        if check_crc and zlib.crc32(data.numpy()) != info.CRC:
            raise self.fail(f'{what} fails its CRC check (corrupt file)')
        return data


class _LegacyReader(_Reader):
    """``torch.save(..., _use_new_zipfile_serialization=False)``'s pickle stream."""

    def read(self) -> tuple[Any, set[str]]:
        magic = self.unpickle(self.f)
        if type(magic) is not int or magic != MAGIC_NUMBER:
            raise self.fail(f'a pickle stream that is not a torch checkpoint (its first object is '
                            f'a {type(magic).__name__}, not torch\'s magic number)')
        version = self.unpickle(self.f)
        if version != LEGACY_PROTOCOL_VERSION:
            raise self.fail(f'legacy protocol version {version!r:.20}, expected '
                            f'{LEGACY_PROTOCOL_VERSION}')
        sys_info = self.unpickle(self.f)
        if not isinstance(sys_info, dict) or sys_info.get('little_endian') is not True:
            raise self.fail('a legacy checkpoint written on a big-endian machine (not supported)')
        roots: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
        views: dict[str, torch.Tensor] = {}
        declared = 0

        def persistent_load(pid: Any) -> Union[StorageRef, UntrustedObject]:
            nonlocal declared
            stype, key, numel, (view, ) = self.storage_id(pid, 6)
            if stype is None:
                raise self.fail(f'storage of a type the safe reader does not read: {pid[1]!r:.80}')
            itemsize = stype.dtype.itemsize
            if key not in roots:
                declared += numel * itemsize
                if declared > self.size:  # checked before allocating
                    raise self.fail(f'storages declare {declared} bytes; the file has '
                                    f'{self.size}')
                roots[key] = (torch.empty(numel * itemsize, dtype=torch.uint8), stype.dtype)
            data = roots[key][0]
            if view is not None:
                view_key, offset, view_size = view
                if type(offset) is not int or type(view_size) is not int or offset < 0 or \
                        view_size < 0 or (offset + view_size) * itemsize > data.numel():
                    raise self.fail(f'storage view {view!r:.80} lies outside storage {key}')
                data = views.setdefault(str(view_key),
                                        data[offset * itemsize:(offset + view_size) * itemsize])
            return StorageRef(data, stype.dtype)

        obj = self.unpickle(self.f, persistent_load)
        keys = self.unpickle(self.f)
        if not isinstance(keys, list) or set(keys) != set(roots):
            raise self.fail('the storage key list does not match the storages the object uses')
        offset = self.f.tell()
        for key in keys:  # every declared storage is filled from the file, none left as is
            data, dtype = roots[key]
            count = struct.unpack('<q', self.read_into(offset, 8, f'storage {key} size')
                                  .numpy().tobytes())[0]
            itemsize = dtype.itemsize
            if count * itemsize != data.numel():
                raise self.fail(f'storage {key} holds {count} elements of {itemsize} bytes; the '
                                f'object pickle declares {data.numel()} bytes')
            self.read_into(offset + 8, data.numel(), f'storage {key}', out=data)
            offset += 8 + data.numel()
        return obj, self.refused


def relocate(obj: Any, map_location: MapLocation) -> Any:
    """Move the tensors of a loaded checkpoint as ``torch.load``'s ``map_location`` would.

    ``None``/``'cpu'`` keep them on the CPU; a device (or its name) moves them; a
    dict maps ``'cpu'`` to a device; a callable is called as
    ``map_location(storage, 'cpu')`` once per storage.
    """
    if map_location is None:
        return obj
    if isinstance(map_location, Mapping):
        map_location = map_location.get('cpu', 'cpu')
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        if device.type == 'cpu':
            return obj
        move: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.to(device)  # noqa: E731
    else:
        moved: dict[int, torch.UntypedStorage] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in moved:
                moved[storage.data_ptr()] = map_location(storage, 'cpu') or storage
            new = moved[storage.data_ptr()]
            return torch.empty(0, dtype=t.dtype, device=new.device).set_(
                new, t.storage_offset(), t.size(), t.stride())

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return move(x)
        if isinstance(x, dict):
            for k, v in x.items():
                x[k] = walk(v)
            return x
        if isinstance(x, list):
            x[:] = [walk(v) for v in x]
            return x
        if type(x) is tuple:  # not torch.Size or named tuples
            return tuple(walk(v) for v in x)
        return x

    return walk(obj)


def safe_load(path: Union[PathLike, BinaryIO], map_location: MapLocation = 'cpu') -> Any:
    """Load a torch checkpoint without importing or calling anything but tensor rebuilds.

    Objects of other types come back as :class:`~.unpickler.UntrustedObject`
    stand-ins (their names are logged), so a released checkpoint's ``model``
    entry loads while its pickled config object stays inert. See
    :func:`read_checkpoint` for what is refused. A safetensors file (by its name or
    its header) is read by :func:`~.safetensors_io.read_safetensors`: its state dict.
    """
    if isinstance(path, (str, os.PathLike)) and is_safetensors(path):
        return relocate(read_safetensors(path)[0], map_location)
    obj, refused = read_checkpoint(path)
    if refused:
        logger.info('safe_load(%s): kept %d untrusted pickled type(s) inert: %s',
                    getattr(path, 'name', path), len(refused), ', '.join(sorted(refused)))
    return relocate(obj, map_location)
