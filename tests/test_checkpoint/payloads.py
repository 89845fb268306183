"""Hostile and broken checkpoint files, built in a temporary directory for the tests.

Every payload, if its code ran, would create the file ``marker``; the tests assert
that it does not exist after each loading path. :func:`live` proves the payloads
are real: a plain ``pickle.loads`` (or ``torch.load(weights_only=False)``) of
each does create the marker.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

MAGIC = 0x1950A86A20F9469CFC6C


class Reduce:
    """Pickles as ``func(*args)``: the classic code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def reduce_payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling creates ``marker`` (os.system, exec, eval)."""
    return {
        'os.system': Reduce(os.system, f'touch {marker}'),
        'exec': Reduce(exec, f'open({str(marker)!r}, "w").close()'),
        'eval': Reduce(eval, f'open({str(marker)!r}, "w").close()'),
    }


def getattr_chain(marker: Path) -> bytes:
    """``getattr(__import__('os'), 'system')('touch marker')``, hand-written (protocol 0)."""
    return (b'cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V'
            + f'touch {marker}'.encode() + b'\ntR.')


def zip_checkpoint(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
                   extra: dict[str, bytes] | None = None) -> Path:
    """A torch zip archive written by hand (stored records, as torch writes them)."""
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        z.writestr('archive/data.pkl', data_pkl)
        z.writestr('archive/byteorder', b'little')
        for key, data in (storages or {}).items():
            z.writestr(f'archive/data/{key}', data)
        for name, data in (extra or {}).items():
            z.writestr(f'archive/{name}', data)
        z.writestr('archive/version', b'3\n')
    return path


def legacy_checkpoint(path: Path, body: bytes, keys: list | None = None,
                      storages: bytes = b'') -> Path:
    """torch's legacy stream: magic, protocol, system info, ``body``, keys, storage bytes."""
    head = b''.join(pickle.dumps(x, protocol=2) for x in (
        MAGIC, 1001, dict(protocol_version=1001, little_endian=True,
                          type_sizes=dict(short=2, int=4, long=4))))
    path.write_bytes(head + body + pickle.dumps(keys or [], protocol=2) + storages)
    return path


def _str(text: str) -> bytes:
    return b'X' + struct.pack('<I', len(text)) + text.encode()


def _int(n: int) -> bytes:
    return b'J' + struct.pack('<i', n) if -2**31 <= n < 2**31 else \
        b'\x8a\x08' + n.to_bytes(8, 'little', signed=True)


def _tuple(values: tuple[int, ...]) -> bytes:
    return b'(' + b''.join(_int(v) for v in values) + b't'


def tensor_pickle(numel: int, size: tuple[int, ...] | None = None,
                  stride: tuple[int, ...] | None = None, key: str = '0',
                  legacy: bool = False) -> bytes:
    """Hand-assembled ``{'w': tensor}`` pickle whose float storage ``key`` declares ``numel``.

    ``size``/``stride`` default to a contiguous 1-D tensor over the whole storage.
    """
    size = size if size is not None else (numel, )
    stride = stride if stride is not None else (1, )
    pid = (b'(' + _str('storage') + b'ctorch\nFloatStorage\n' + _str(key) + _str('cpu')
           + _int(numel) + (b'N' if legacy else b'') + b'tQ')
    tensor = (b'ctorch._utils\n_rebuild_tensor_v2\n(' + pid + _int(0) + _tuple(size)
              + _tuple(stride) + b'\x89ccollections\nOrderedDict\n)RtR')
    return b'\x80\x02}' + _str('w') + tensor + b's.'


class ScriptedWriter(nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by torch.jit.load) writes a file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.weight = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.training = state[2]
        written = torch.from_file(self.path, True, 16, dtype=torch.uint8)  # creates the file
        written.fill_(65)
        self.weight = state[1] + written[:2].float() * 0  # keeps the write alive


def torchscript_archive(path: Path, marker: Path) -> Path:
    torch.jit.save(torch.jit.script(ScriptedWriter(str(marker))), str(path))
    return path


def with_torchscript_records(src: Path, dst: Path) -> Path:
    """A state-dict archive with TorchScript records (``constants.pkl``, ``code/``) added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
        folder = zin.namelist()[0].split('/')[0]
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr(f'{folder}/constants.pkl', pickle.dumps((), protocol=2))
        zout.writestr(f'{folder}/code/__torch__/m.py', b'def f(x):\n  return x\n')
    return dst


def set_zip_record_size(path: Path, record: str, size: int) -> None:
    """Patch the central directory so that ``record`` declares ``size`` bytes."""
    data = bytearray(path.read_bytes())
    name = record.encode()
    at = data.rfind(b'PK\x01\x02' + b'', 0)
    while at >= 0:
        n = struct.unpack_from('<H', data, at + 28)[0]
        if data[at + 46:at + 46 + n] == name:
            struct.pack_into('<LL', data, at + 20, size, size)  # compressed, uncompressed
            path.write_bytes(bytes(data))
            return
        at = data.rfind(b'PK\x01\x02', 0, at)
    raise KeyError(record)
