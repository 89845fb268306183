"""Spatial parallelism: one image's rows split over the ranks of a process group.

InLine's global state is a few d x d sums per block, so a band of rows per rank needs
one small all-reduce per block, plus a row or two from each neighbour for kernels
that cross band borders. See docs/spatial_parallel.md.
"""
from .comm import (
    RowSpans,
    all_reduce_max,
    all_reduce_sum,
    broadcast_tensor,
    fetch_rows,
    gather_rows,
    gather_rows_to,
    own_rows,
    row_spans,
    summing_over,
)
from .group import CommStats, SpatialGroup, current_group, spatial_parallel, suspended
from .maps import (
    batch_norm,
    conv2d,
    gathered,
    global_sum,
    halo_rows,
    image_bands,
    mean_tokens,
    resize,
    resized_rows,
    source_rows,
    split_rows,
    strided_rows,
    strided_spans,
)

__all__ = [
    'RowSpans', 'all_reduce_max', 'all_reduce_sum', 'fetch_rows', 'gather_rows', 'own_rows',
    'row_spans',
    'gather_rows_to', 'broadcast_tensor', 'summing_over',
    'CommStats', 'SpatialGroup', 'current_group', 'spatial_parallel', 'suspended',
    'batch_norm', 'conv2d', 'global_sum', 'image_bands', 'mean_tokens', 'resize', 'resized_rows',
    'source_rows', 'split_rows', 'strided_rows', 'strided_spans', 'gathered', 'halo_rows',
]

