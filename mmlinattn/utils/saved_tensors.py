"""What autograd keeps for backward: bytes of the tensors saved during a forward."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor

__all__ = ['SavedTensors', 'record_saved_tensors']


class SavedTensors:
    """The distinct storages autograd saved, and their bytes.

    Views of one tensor share a storage and count once; storages listed in
    ``exclude`` (e.g. a module's parameters, which exist anyway) do not count.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self.storages: dict[tuple, int] = {}

    def add(self, t: Tensor) -> None:
        key = _storage_key(t)
        if key not in self._exclude:
            self.storages[key] = t.untyped_storage().nbytes()

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr())


@contextmanager
def record_saved_tensors(exclude: Iterable[Tensor] = ()) -> Iterator[SavedTensors]:
    """Record every tensor autograd saves for backward inside the ``with`` block."""
    record = SavedTensors(exclude)

    def pack(t: Tensor) -> Tensor:
        if t.device.type != 'meta':
            record.add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield record
