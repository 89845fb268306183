"""safetensors files in and out: weights without pickle.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``), then the tensors' bytes. Nothing in it can run. It can still be
malformed, so :func:`read_safetensors` checks the header itself before any tensor
is read, and reports every problem as :class:`CheckpointFormatError` naming the file:
a header length past the file or absurdly large, JSON that does not parse, a dtype
we do not know, a shape that is not a list of sizes, offsets outside the data, of the
wrong size for the shape, or overlapping another tensor's. Only then are the tensors
read, by the ``safetensors`` library (memory-mapped).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import struct
from typing import Any, Mapping, Optional, Union

import torch

from .errors import CheckpointFormatError

__all__ = ['SAFETENSORS_SUFFIX', 'is_safetensors', 'read_safetensors',
           'read_safetensors_metadata', 'write_safetensors', 'MAX_HEADER_BYTES']

SAFETENSORS_SUFFIX = '.safetensors'
#: A header longer than this is refused (the format's own readers use 100 MB).
MAX_HEADER_BYTES = 100 * 2**20

#: safetensors dtype names and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
    'U8': torch.uint8, 'BOOL': torch.bool, 'F8_E4M3': torch.float8_e4m3fn,
    'F8_E5M2': torch.float8_e5m2,
}

PathLike = Union[str, os.PathLike]


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` is (by its name, or by its first bytes) a safetensors file: the
    name ends in ``.safetensors``, or the file opens with a plausible header length
    followed by ``{``."""
    path = os.fspath(path)
    if path.endswith(SAFETENSORS_SUFFIX):
        return True
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b'{':
        return False
    (n, ) = struct.unpack('<Q', head[:8])
    return 2 <= n <= MAX_HEADER_BYTES and n + 8 <= osp.getsize(path)


def _header(path: str) -> tuple[dict, dict, int]:
    """The checked header: ``(tensors, metadata, data start)``."""
    def fail(problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(path, f'safetensors: {problem}')

    size = osp.getsize(path)
    if size < 8:
        raise fail(f'the file is {size} bytes, shorter than the 8-byte header length')
    with open(path, 'rb') as f:
        (n, ) = struct.unpack('<Q', f.read(8))
        if n > MAX_HEADER_BYTES:
            raise fail(f'the header claims {n} bytes (at most {MAX_HEADER_BYTES} are read)')
        if 8 + n > size:
            raise fail(f'the header claims {n} bytes but the file holds {size - 8} after the '
                       'length (truncated)')
        raw = f.read(n)
    try:
        header = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f'the header is not JSON ({e})') from e
    if not isinstance(header, dict):
        raise fail('the header is not a JSON object')
    metadata = header.pop('__metadata__', None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise fail('__metadata__ must map strings to strings')
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) - {'dtype', 'shape', 'data_offsets'}:
            raise fail(f'entry {name!r} is not a tensor description')
        dtype = DTYPES.get(entry.get('dtype'))
        if dtype is None:
            raise fail(f'tensor {name!r} has dtype {entry.get("dtype")!r}, which is not one of '
                       f'{", ".join(DTYPES)}')
        shape = entry.get('shape')
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                  and s >= 0 for s in shape):
            raise fail(f'tensor {name!r} has shape {shape!r}, not a list of sizes')
        offsets = entry.get('data_offsets')
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f'tensor {name!r} has data_offsets {offsets!r}, not [begin, end]')
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise fail(f'tensor {name!r} lies at bytes {begin}:{end}, outside the '
                       f'{data_size} bytes of data (truncated or corrupt)')
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise fail(f'tensor {name!r} ({entry["dtype"]} {shape}) needs {expected} bytes, '
                       f'its offsets span {end - begin}')
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, end_b, b) in zip(spans, spans[1:]):
        if begin_b < end_a and end_b > begin_b:
            raise fail(f'tensors {a!r} and {b!r} overlap in the data')
    return header, metadata, 8 + n


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (checked like :func:`read_safetensors`)."""
    return _header(os.fspath(path))[1]


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` of a safetensors file, on the CPU, after the checks of
    the module docstring; every failure is a :class:`CheckpointFormatError`."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    header, metadata, _ = _header(path)
    try:
        from safetensors.torch import load_file
        tensors = load_file(path, device='cpu')
    except Exception as e:  # the library's own errors: one family for our callers
        raise CheckpointFormatError(path, f'safetensors: {type(e).__name__}: {e}') from e
    if set(tensors) != set(header):
        raise CheckpointFormatError(path, 'safetensors: the tensors read differ from the header')
    # The header's order (the writer's), not the library's.
    return {k: tensors[k] for k in header}, metadata


def write_safetensors(path: PathLike, state_dict: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``state_dict`` (CPU copies, contiguous, no shared storage) with string
    ``metadata`` to ``path``, through a temporary file synced and renamed when complete
(:func:`~mmlinattn.utils.atomic.atomic_write`)."""
    from safetensors.torch import save

    from ..utils.atomic import write_bytes_atomic
    path = os.fspath(path)
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in state_dict.items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v)
            for k, v in (metadata or {}).items()}
    write_bytes_atomic(path, save(tensors, metadata=meta))
