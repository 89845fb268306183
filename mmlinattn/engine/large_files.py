"""Whole-image segmentation of an image file, by regions, into pyramidal files.

:func:`segment_file` joins the pieces: a region reader
(:mod:`mmlinattn.rasters`) feeds the chunked backbone band by band
(:func:`~mmlinattn.engine.large_image.segment_large`); with a spill folder every
whole map (the backbone's blocks and outputs, the labels) is a memory-mapped file
there (:mod:`mmlinattn.utils.spill`), so memory in use stays a few bands
whatever the image size; the labels go to a pyramidal OME-TIFF (GeoTIFF tags
kept), optionally with a colour overlay pyramid and a deep-zoom viewer.

A run with a spill folder is resumable: the backbone's four maps are kept there
when the backbone finishes, and ``state.json`` lists every finished row of tiles
after it is written, so ``resume=True`` continues from the last finished row of
tiles (or from the saved maps). Writes to the shared mappings are in the page
cache once made, so a killed process loses nothing written (a power cut may).
Outputs are written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import os.path as osp
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..parallel import SpatialGroup
from ..rasters import (
    CompactedReader,
    RegionReader,
    kept_pixels,
    kept_rectangles,
    tissue_mask,
    write_label_pyramid,
    write_overlay_pyramid,
    write_viewer,
)
from ..rasters.writers import default_palette
from ..utils.atomic import write_text_atomic
from ..utils.spill import (
    SpillStore,
    open_persistent_map,
    persistent_map,
    spill_maps,
)
from .large_image import Progress, Resumable, segment_large

__all__ = ['FileOutputs', 'RunFolder', 'segment_file', 'label_dtype', 'compact_background']


@dataclass
class FileOutputs:
    """What :func:`segment_file` writes: the label pyramid ``labels`` (``.ome.tif``),
    optionally an ``overlay`` pyramid and a ``viewer`` folder."""

    labels: Optional[str] = None
    overlay: Optional[str] = None
    viewer: Optional[str] = None
    alpha: float = 0.5


def label_dtype(num_classes: int, nodata: Optional[int]) -> torch.dtype:
    """The smallest label type holding every class index and ``nodata``."""
    top = max(num_classes - 1, nodata or 0)
    return torch.uint8 if top < 256 else torch.int16 if top < 32768 else torch.int32


class RunFolder(Resumable):
    """A run's spill folder: spilled maps in ``maps/``, the kept backbone outputs
    ``feat{i}.bin``, the labels ``labels.bin`` and ``state.json`` (the run's
    fingerprint, the saved maps' shapes and the finished tile rows)."""

    def __init__(self, folder: str, fingerprint: dict, resume: bool) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        os.makedirs(folder, exist_ok=True)
        self.state_path = osp.join(folder, 'state.json')
        state = None
        if resume and osp.isfile(self.state_path):
            with open(self.state_path) as f:
                state = json.load(f)
            if state.get('fingerprint') != fingerprint:
                changed = sorted(k for k in set(fingerprint) | set(state.get('fingerprint', {}))
                                 if fingerprint.get(k) != state.get('fingerprint', {}).get(k))
                raise ValueError(f'--resume: {folder} holds a run with different settings '
                                 f'({", ".join(changed)}); use a new --spill folder or drop '
                                 '--resume')
        self.resumed = state is not None
        self.state = state or dict(fingerprint=fingerprint, features=None, rows=[])
        self.store: Optional[SpillStore] = None
        if not self.resumed:
            for name in os.listdir(folder):  # a fresh run: nothing of an old one is reused
                if name.startswith('feat') or name in ('labels.bin', 'state.json'):
                    os.remove(osp.join(folder, name))
            self._save()

    def _save(self) -> None:
        write_text_atomic(self.state_path, json.dumps(self.state))

    @contextlib.contextmanager
    def spilling(self, min_bytes: int) -> Iterator[SpillStore]:
        with spill_maps(osp.join(self.folder, 'maps'), min_bytes) as store:
            self.store = store
            try:
                yield store
            finally:
                self.store = None

    def labels(self, shape: tuple[int, int], dtype: torch.dtype, fill: int) -> Tensor:
        path = osp.join(self.folder, 'labels.bin')
        if self.resumed and osp.isfile(path):
            return open_persistent_map(path, shape, dtype)
        return persistent_map(path, shape, dtype, fill)

    # -- Resumable --------------------------------------------------------------------
    def load_features(self) -> Optional[tuple[Tensor, ...]]:
        saved = self.state.get('features')
        if not saved:
            return None
        return tuple(open_persistent_map(osp.join(self.folder, f'feat{i}.bin'), shape,
                                         torch.float32) for i, shape in enumerate(saved))

    def save_features(self, feats: Sequence[Tensor]) -> None:
        for i, f in enumerate(feats):
            dest = osp.join(self.folder, f'feat{i}.bin')
            if self.store is not None and self.store.owns(f):
                self.store.keep(f, dest)
            else:  # a map small enough to stay in memory: written out once
                persistent_map(dest, f.shape, f.dtype).copy_(f)
        self.state['features'] = [list(f.shape) for f in feats]
        self._save()

    def rows_done(self) -> set[int]:
        return set(self.state['rows'])

    def row_done(self, row: int) -> None:
        self.state['rows'].append(row)
        self._save()


def _file_digest(path: str) -> str:
    """Size, mtime and a hash of the first MiB: enough to tell another file apart."""
    st = os.stat(path)
    with open(path, 'rb') as f:
        head = hashlib.sha256(f.read(2**20)).hexdigest()[:16]
    return f'{st.st_size}:{int(st.st_mtime)}:{head}'


def segment_file(model: Any, reader: RegionReader, outputs: FileOutputs, *,
                 chunk_tokens: int, tile: int = 2048, halo: int = 256,
                 spill: Optional[str] = None, resume: bool = False,
                 background: Optional[str] = None, nodata: int = 255,
                 min_spill_bytes: int = 64 * 2**20, progress: Progress = None,
                 blocks_progress: Optional[Callable[[int, int], None]] = None,
                 group: Optional[SpatialGroup] = None, settings: Optional[dict] = None
                 ) -> tuple[Any, dict]:
    """Segment the image of ``reader`` whole and write ``outputs``.

    ``spill``: a folder for maps too large for memory, and for ``resume``.
    ``background``: None, ``'otsu'`` or a mask file: only the block rows and columns
    with tissue are predicted (a compacted image, :mod:`mmlinattn.rasters.tissue`),
    the rest is ``nodata``. ``settings``: what else must match for ``resume``
    (the config, the weights). ``group``: spatial parallelism; every rank passes a
    reader of the same file and reads only its rows, spills only its maps, and
    writes its rows of the labels file in ``spill`` (a folder all ranks see; without
    ``spill`` the labels are gathered in the first rank's memory); the group's first
    rank writes the outputs. Returns the labels (a tensor, memory
    mapped with ``spill``) and an info dict (timings, bytes, pixels decoded).
    """
    if resume and not spill:
        raise ValueError('--resume needs --spill DIR (the run is kept there)')
    classes = list(getattr(model, 'dataset_meta', None) and model.dataset_meta.get('classes')
                   or [str(i) for i in range(model.decode_head.out_channels)])
    palette = (getattr(model, 'dataset_meta', None) or {}).get('palette') or \
        default_palette(len(classes))
    palette = [list(map(int, c)) for c in palette][:len(classes)]
    h, w = reader.height, reader.width
    info: dict = dict(image=[h, w], level=reader.level, mpp=reader.mpp)

    src, keep = compact_background(reader, background, info)
    dtype = label_dtype(len(classes), nodata if keep is not None else None)

    run = None
    if spill:
        rank_folder = spill if group is None else osp.join(spill, f'rank{group.rank}')
        fingerprint = dict(settings or {}, image=_file_digest(reader.path), level=reader.level,
                           chunk_tokens=chunk_tokens, tile=tile, halo=halo,
                           background=background, ranks=1 if group is None else group.size)
        run = RunFolder(rank_folder, fingerprint, resume)
        info['resumed'] = run.resumed
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(run.spilling(min_spill_bytes)) if run else None
        if run is not None:
            labels = _shared_labels(run, spill, (src.height, src.width), dtype, group)
        elif group is None:
            labels = torch.empty(src.height, src.width, dtype=dtype)
        else:  # gathered on the first rank
            labels = None
        with _counting_blocks(model, blocks_progress):
            labels, seg = segment_large(model, src, chunk_tokens, tile, halo, progress,
                                        group=group, labels=labels, resume=run)
        info.update(seg)
        if store is not None:
            info['spill'] = store.summary()
    info['decoded_pixels_model'] = reader.decoded_pixels  # the prediction's own reads
    if group is not None:
        import torch.distributed as dist
        dist.barrier(group=group.group)
        if not group.first:
            return labels, info
    if keep is not None:
        labels = _expand(labels, keep, (h, w), nodata, run)
    start = time.perf_counter()
    arr = labels.numpy()
    source = dict(image=osp.basename(reader.path), level=reader.level,
                  **{k: v for k, v in (settings or {}).items() if isinstance(v, str)})
    if outputs.labels:
        write_label_pyramid(outputs.labels, arr, classes, palette, reader.geo, reader.mpp,
                            nodata if keep is not None else None, source)
    if outputs.overlay:
        write_overlay_pyramid(outputs.overlay, reader, arr, palette, outputs.alpha,
                              nodata if keep is not None else None)
    if outputs.viewer:
        info['viewer_page'] = write_viewer(outputs.viewer, reader, arr, classes, palette,
                                           nodata if keep is not None else None,
                                           osp.basename(reader.path))
    info['write_s'] = time.perf_counter() - start
    info['decoded_pixels'] = reader.decoded_pixels
    return labels, info


def compact_background(reader: RegionReader, background: Optional[str], info: dict
                       ) -> tuple[RegionReader, Optional[tuple[np.ndarray, np.ndarray]]]:
    """The reader of what is predicted and the kept rows and columns: with
    ``background`` (``'otsu'`` or a mask file) only the tissue's block rows and columns
    (a :class:`CompactedReader`, its counts and time in ``info['tissue']``), else the
    image itself and None."""
    if not background:
        return reader, None
    h, w = reader.height, reader.width
    start = time.perf_counter()
    mask, scale = tissue_mask(reader, background)
    keep = kept_pixels(mask, scale, h, w)
    info['tissue'] = dict(rows=len(keep[0]), cols=len(keep[1]),
                          fraction=len(keep[0]) * len(keep[1]) / (h * w),
                          seconds=time.perf_counter() - start)
    return CompactedReader(reader, *keep), keep


def _shared_labels(run: RunFolder, spill: str, shape: tuple[int, int], dtype: torch.dtype,
                   group: Optional[SpatialGroup]) -> Tensor:
    """The labels file: the run folder's own, or (spatially parallel) one in ``spill``
    that the first rank creates and every rank writes its rows of."""
    if group is None:
        return run.labels(shape, dtype, 0)
    import torch.distributed as dist
    path = osp.join(spill, 'labels.bin')
    if group.first and not (run.resumed and osp.isfile(path)):
        persistent_map(path, shape, dtype)
    dist.barrier(group=group.group)
    return open_persistent_map(path, shape, dtype)


def _expand(compact: Tensor, keep: tuple[np.ndarray, np.ndarray], shape: tuple[int, int],
            nodata: int, run: Optional[RunFolder]) -> Tensor:
    """The compacted image's labels placed at their rows and columns of the whole image,
    ``nodata`` elsewhere (a file in the run folder, or in memory)."""
    if run is not None:
        full = persistent_map(osp.join(run.folder, 'labels-whole.bin'), shape, compact.dtype,
                              fill=nodata)
    else:
        full = torch.full(shape, nodata, dtype=compact.dtype)
    for (ra, rb, ca, cb), (y0, y1, x0, x1) in kept_rectangles(*keep):
        full[y0:y1, x0:x1] = compact[ra:rb, ca:cb]
    return full


@contextlib.contextmanager
def _counting_blocks(model: Any, report: Optional[Callable[[int, int], None]]
                     ) -> Iterator[None]:
    """``report(done, total)`` after each block of the backbone."""
    if report is None:
        yield
        return
    from ..models.layers import TransformerBlock
    backbone = model.backbone
    total = sum(1 for m in backbone.modules() if isinstance(m, TransformerBlock))
    done = [0]
    run_block = backbone.run_block

    def counted(block: Any, x: Any, **kwargs: Any) -> Any:
        out = run_block(block, x, **kwargs)
        done[0] += 1
        report(done[0], total)
        return out

    backbone.run_block = counted  # an instance attribute: the class's method is kept
    try:
        yield
    finally:
        del backbone.run_block
