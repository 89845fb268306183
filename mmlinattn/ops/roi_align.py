"""RoIAlign on CPU over all cores: the regions split between threads.

mmcv's CPU RoIAlign runs on one core and holds the interpreter lock; torchvision's
computes the same values (the same sampling and bilinear rule, tested bit for bit) and
releases the lock, so its regions can be shared between threads. A Mask R-CNN tile of
a gigapixel image pools thousands of proposals, most of a tile's head time on one core.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ['threaded_roi_align']

#: Fewer regions than this a thread are not worth a thread.
MIN_ROIS_PER_THREAD = 64


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per thread count, kept for the process (a tile pools many times)."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix='roi-align')


def threaded_roi_align(feats: Tensor, rois: Tensor, output_size: Sequence[int],
                       spatial_scale: float, sampling_ratio: int, aligned: bool,
                       threads: Optional[int] = None) -> Tensor:
    """Average RoIAlign of ``rois`` (``(K, 5)``: batch index, x1, y1, x2, y2 in input
    pixels) on ``feats`` (``(N, C, H, W)``, ``spatial_scale`` map pixels an input
    pixel): ``(K, C, *output_size)``. The values of mmcv's and torchvision's
    ``roi_align``; ``threads`` (default torch's intra-op threads) share the regions."""
    from torchvision.ops import roi_align

    threads = threads or torch.get_num_threads()
    parts = min(threads, len(rois) // MIN_ROIS_PER_THREAD)
    size = tuple(int(s) for s in output_size)
    if parts <= 1 or feats.requires_grad or feats.device.type != 'cpu':
        return roi_align(feats, rois, size, spatial_scale, sampling_ratio, aligned)
    feats = feats.contiguous()
    # torchvision's CPU kernel is single-threaded inside; one part per thread.
    with torch.no_grad():
        chunks = torch.tensor_split(rois, parts)
        futures = [_pool(parts).submit(roi_align, feats, c, size, spatial_scale,
                                       sampling_ratio, aligned) for c in chunks]
        return torch.cat([f.result() for f in futures])
