"""Maps spilled to files: a freed map's file serves the next map of its size, never
while a view still maps it, never once kept; nothing is left after the spill."""
from __future__ import annotations

import gc
import os

import torch

from mmlinattn.utils.spill import _FILE_BACKED, new_map, spill_maps

SHAPE = (1, 4, 16, 64)  # 16 KiB of float32


def _maps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith('map-'))


def test_a_freed_maps_file_serves_the_next_map_of_its_size(tmp_path) -> None:
    with spill_maps(str(tmp_path), min_bytes=0) as store:
        a = new_map(SHAPE, torch.float32)
        a.fill_(1.0)
        first = _maps(tmp_path)
        del a
        gc.collect()
        b = new_map(SHAPE, torch.float32)
        assert store.reused == 1 and store.files == 1 and _maps(tmp_path) == first
        assert b.untyped_storage().data_ptr() in _FILE_BACKED
        b.fill_(2.0)
        assert torch.equal(b, torch.full(SHAPE, 2.0))
        c = new_map((1, 8, 16, 64), torch.float32)  # another size: a file of its own
        assert store.files == 2 and store.reused == 1
        del b
        gc.collect()
        assert len(_maps(tmp_path)) == 2  # kept for reuse while the spill lasts
    assert len(_maps(tmp_path)) == 1  # c's, still mapped
    del c  # freed after the spill: its file goes
    gc.collect()
    assert _maps(tmp_path) == []


def test_a_file_still_mapped_by_a_view_is_not_reused(tmp_path) -> None:
    """The tensor returned may die while a view of its memory lives on (a reshape):
    its file is reused only once the memory itself is freed."""
    with spill_maps(str(tmp_path), min_bytes=0) as store:
        a = new_map(SHAPE, torch.float32)
        view = a.view(-1)
        view.fill_(3.0)
        del a
        gc.collect()
        b = new_map(SHAPE, torch.float32)
        b.fill_(7.0)
        assert store.reused == 0 and store.files == 2
        assert torch.equal(view, torch.full((view.numel(),), 3.0))
        del view
        gc.collect()
        new_map(SHAPE, torch.float32)
        assert store.reused == 1


def test_a_kept_file_is_never_reused(tmp_path) -> None:
    dest = tmp_path / 'feat0.bin'
    with spill_maps(str(tmp_path / 'maps'), min_bytes=0) as store:
        a = new_map(SHAPE, torch.float32)
        a.fill_(5.0)
        store.keep(a, str(dest))
        del a
        gc.collect()
        b = new_map(SHAPE, torch.float32)
        b.fill_(6.0)
        assert store.reused == 0 and store.live_bytes == b.numel() * 4
    assert dest.exists() and dest.stat().st_size == 4 * torch.Size(SHAPE).numel()
    kept = torch.from_file(str(dest), size=torch.Size(SHAPE).numel(), dtype=torch.float32)
    assert torch.equal(kept, torch.full((kept.numel(),), 5.0))
