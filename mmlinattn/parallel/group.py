"""The spatial group: the ranks that share one image, each holding a band of its rows.

A model runs spatially sharded while a :class:`SpatialGroup` is active
(:func:`spatial_parallel`). Layers then ask :func:`current_group` whether their
``(B, H, W, C)`` or ``(B, C, H, W)`` input is the whole map or one rank's band of
rows, and take the sharded path when it is a band. Every rank of a group runs the
same code on its own rows, so collectives are called in the same order everywhere;
a layer must never decide on a collective from its local size alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch.distributed as dist

__all__ = ['CommStats', 'SpatialGroup', 'current_group', 'spatial_parallel', 'suspended']


@dataclass
class CommStats:
    """Bytes a rank sent through each kind of collective (forward and backward).

    ``all_reduce``: InLine statistics, means, batch-norm moments, losses (the
    payload of each call, as a ring all-reduce sends about twice that);
    ``halo``: rows sent to neighbours for kernels that span band borders;
    ``gather``: rows of the small maps gathered for window/stripe softmax stages;
    ``sizes``: the row counts each rank announces (a few bytes per call);
    ``calls``: number of collective calls of each kind.
    """

    all_reduce: int = 0
    halo: int = 0
    gather: int = 0
    sizes: int = 0
    calls: dict = field(default_factory=lambda: {'all_reduce': 0, 'halo': 0, 'gather': 0,
                                                 'sizes': 0})
    #: ``(tokens of the whole map, channels)`` of each global attention layer run
    #: sharded (what ring attention would have to move instead).
    layers: list = field(default_factory=list)

    def add(self, kind: str, nbytes: int) -> None:
        setattr(self, kind, getattr(self, kind) + int(nbytes))
        self.calls[kind] += 1

    def reset(self) -> None:
        self.all_reduce = self.halo = self.gather = self.sizes = 0
        self.calls = {k: 0 for k in self.calls}
        self.layers = []

    def as_dict(self) -> dict:
        return dict(all_reduce_bytes=self.all_reduce, halo_bytes=self.halo,
                    gather_bytes=self.gather, size_bytes=self.sizes, calls=dict(self.calls))


@dataclass
class SpatialGroup:
    """One image's ranks.

    Args:
        group: the torch.distributed process group of these ranks (None: the world).
        rank: this process's index in the group (0 holds the top rows).
        size: ranks in the group.
        ranks: the global ranks of the group, in row order.
    """

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    ranks: tuple[int, ...]
    stats: CommStats = field(default_factory=CommStats)

    @classmethod
    def world(cls) -> SpatialGroup:
        """Every process of the default group shares one image."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError('spatial parallelism needs torch.distributed to be initialised '
                               '(launch with torchrun, or tools/dist_train.sh / dist_test.sh)')
        size = dist.get_world_size()
        return cls(None, dist.get_rank(), size, tuple(range(size)))

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def global_rank(self, index: int) -> int:
        return self.ranks[index]


_ACTIVE: list[Optional[SpatialGroup]] = [None]


def current_group() -> Optional[SpatialGroup]:
    """The active spatial group, or None when maps are whole (the ordinary forward)."""
    return _ACTIVE[-1]


@contextlib.contextmanager
def spatial_parallel(group: Optional[SpatialGroup]) -> Iterator[Optional[SpatialGroup]]:
    """Run the enclosed forward (and the backward it records) sharded over ``group``.

    Autograd's backward of the collectives does not consult this context: once a
    forward has recorded them, ``loss.backward()`` may run inside or outside it.
    """
    _ACTIVE.append(group)
    try:
        yield group
    finally:
        _ACTIVE.pop()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Whole-map code inside a sharded forward (a gathered softmax stage)."""
    with spatial_parallel(None):
        yield
