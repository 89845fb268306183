"""The compute precision a tool runs in: ``--dtype fp32 | bf16 | auto``.

``bf16`` runs the model under ``torch.autocast`` in bfloat16 (matrix products and
convolutions in bf16; what must stay fp32 stays so: InLine's sums, the norms'
statistics, the softmax); ``auto`` picks bf16 where the device computes it in
hardware (a CPU with AVX512-BF16 or AMX-BF16, a GPU that supports it) and fp32
elsewhere. On a CPU where bf16 is emulated, ``bf16`` is refused with the reason
unless forced (``force=True``, the tools' ``--force-bf16``): it runs, several times
slower than fp32.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .cpu import EMULATED_BF16_NOTE, cpu_has_native_bf16

__all__ = ['DTYPE_CHOICES', 'resolve_dtype', 'autocast_for', 'add_dtype_arguments']

#: What ``--dtype`` accepts.
DTYPE_CHOICES = ('fp32', 'bf16', 'auto')


def _native_bf16(device: str) -> bool:
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_dtype(name: str, device: str = 'cpu', force: bool = False) -> str:
    """``'fp32'`` or ``'bf16'`` for ``--dtype name`` on ``device`` (see the module's note).
    Raises ValueError for an unknown name, or ``bf16`` on a device that emulates it
    (unless ``force``)."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f'--dtype must be one of {", ".join(DTYPE_CHOICES)}, got {name!r}')
    native = _native_bf16(device)
    if name == 'auto':
        return 'bf16' if native else 'fp32'
    if name == 'bf16' and not native and not force:
        where = 'this GPU' if torch.device(device).type == 'cuda' else 'this CPU'
        raise ValueError(f'--dtype bf16 refused on {where}: '
                         + (EMULATED_BF16_NOTE if where == 'this CPU' else
                            'it has no bfloat16 support')
                         + ' (--force-bf16 runs it anyway)')
    return name


def autocast_for(dtype: str, device: str = 'cpu') -> ContextManager:
    """The context a model runs in for a resolved ``dtype``: bf16 autocast, or none."""
    if dtype == 'fp32':
        return contextlib.nullcontext()
    if dtype != 'bf16':
        raise ValueError(f"dtype must be 'fp32' or 'bf16' (resolved), got {dtype!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def add_dtype_arguments(parser, default: str = 'fp32') -> None:
    """``--dtype`` and ``--force-bf16`` on a tool's argument parser."""
    parser.add_argument('--dtype', choices=DTYPE_CHOICES, default=default,
                        help='compute precision: fp32; bf16 (autocast: matrix products in '
                             'bfloat16, statistics in fp32); auto = bf16 where the CPU '
                             '(AVX512-BF16, AMX-BF16) or GPU computes it natively, else fp32 '
                             f'(default {default})')
    parser.add_argument('--force-bf16', action='store_true',
                        help='run --dtype bf16 even where bf16 is emulated (much slower)')
