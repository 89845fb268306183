"""What the CPU offers for reduced precision."""
from __future__ import annotations

import functools
from typing import Optional

__all__ = ['cpu_flags', 'cpu_has_native_bf16', 'EMULATED_BF16_NOTE']

#: Said wherever bf16 autocast is chosen on a CPU without bf16 instructions.
EMULATED_BF16_NOTE = (
    'this CPU has no bfloat16 instructions (no avx512_bf16 or amx_bf16 flag): bf16 matrix '
    'products are emulated, so bf16 autocast is several times slower than float32 here '
    '(measured 7x to 35x per product on an AVX2-only EPYC); use float32 on this machine')


@functools.lru_cache(maxsize=1)
def cpu_flags() -> Optional[frozenset[str]]:
    """The flags of the first CPU in ``/proc/cpuinfo``; None where that cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        return None
    return None


def cpu_has_native_bf16() -> bool:
    """Whether bfloat16 matrix products run in hardware (True when the flags are unknown)."""
    flags = cpu_flags()
    return flags is None or bool(flags & {'avx512_bf16', 'amx_bf16'})
