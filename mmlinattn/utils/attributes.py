"""Instance attributes set for the length of a ``with`` block, then restored exactly."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

__all__ = ['patched_attributes']

_ABSENT = object()


@contextlib.contextmanager
def patched_attributes(patches: Iterable[tuple[Any, str, Any]]) -> Iterator[int]:
    """Within the block, ``obj.name = value`` for each ``(obj, name, value)``, set on
    the instance (a method patched this way shadows its class's); afterwards each
    instance gets back what it held itself (its own attribute, or none, so that the
    class's shows again), also when the block raises. Patching the same attribute
    twice, or in nested blocks, restores in reverse order. Yields how many were set."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for obj, name, value in patches:
            saved.append((obj, name, vars(obj).get(name, _ABSENT)))
            setattr(obj, name, value)
        yield len(saved)
    finally:
        for obj, name, own in reversed(saved):
            if own is _ABSENT:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, own)
