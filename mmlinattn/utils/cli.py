"""Tools fail in one line: a refused input is an answer, not a crash.

:func:`run_tool` runs a tool's ``main``; an expected failure (a bad file, a refused
checkpoint or layout, a full disk, a lost rank, a non-finite loss: the exception types
of :func:`expected_errors`) is printed as one line, ``<tool>: error: <what>``, and the
tool exits with status 1. Anything else is a bug and keeps its traceback. ``--debug``
(removed from the arguments before ``main`` sees them) or ``MMLINATTN_DEBUG=1`` shows
the traceback of expected failures too.
"""
from __future__ import annotations

import os
import os.path as osp
import pickle
import sys
from typing import Any, Callable

__all__ = ['run_tool', 'expected_errors', 'one_line', 'DEBUG_ENV']

#: Set to 1 to see the traceback of an expected failure.
DEBUG_ENV = 'MMLINATTN_DEBUG'


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that report a refused input or a failed environment."""
    kinds: list[type[BaseException]] = [ValueError, OSError, FloatingPointError, ImportError,
                                        pickle.UnpicklingError, TimeoutError]
    try:
        from ..checkpoint.errors import CheckpointError
        kinds.append(CheckpointError)
    except ImportError:  # pragma: no cover - the package is importable without torch
        pass
    try:
        from PIL.Image import DecompressionBombError
        kinds.append(DecompressionBombError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch.distributed as dist

        from ..parallel.watchdog import LostRankError
        kinds += [dist.DistError, LostRankError]  # a lost rank, a timed-out collective
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return tuple(kinds)


def one_line(error: BaseException) -> str:
    """The error's type and message on one line."""
    text = ' '.join(str(error).split()) or type(error).__name__
    name = type(error).__name__
    return text if name in ('ValueError', 'FloatingPointError') else f'{name}: {text}'


def run_tool(main: Callable[[], Any], name: str | None = None) -> int:
    """Run ``main()``; its integer result (or 0) is the exit status, an expected failure
    prints one line on stderr and gives 1, an interrupt 130."""
    name = name or osp.basename(sys.argv[0])
    debug = '--debug' in sys.argv[1:] or os.environ.get(DEBUG_ENV, '') not in ('', '0')
    if '--debug' in sys.argv[1:]:
        sys.argv.remove('--debug')
    try:
        result = main()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f'{name}: interrupted', file=sys.stderr)
        return 130
    except expected_errors() as e:
        if debug:
            raise
        print(f'{name}: error: {one_line(e)} (--debug or {DEBUG_ENV}=1 for the traceback)',
              file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
