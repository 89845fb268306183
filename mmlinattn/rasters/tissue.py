"""Which parts of a whole slide hold tissue: rows and columns of blocks to keep.

Whole slides are mostly empty glass. A tissue mask (Otsu's threshold on a
low-resolution view, tissue being darker than glass, or a mask file) marks the
``block x block`` pixel blocks with any tissue; every block row and block column
with none is dropped, and the rest is read as one smaller image
(:class:`~mmlinattn.rasters.CompactedReader`). The prediction is then exact for
that compacted image: InLine's global statistics cover the kept blocks only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .readers import ImageFileError, RegionReader

__all__ = ['otsu_tissue', 'tissue_mask', 'kept_pixels']


def otsu_tissue(thumb_bgr: np.ndarray) -> np.ndarray:
    """Tissue (True) where a thumbnail is darker than Otsu's threshold of its grey levels;
    all True for an image of one grey level (nothing to separate)."""
    import cv2
    grey = cv2.cvtColor(np.ascontiguousarray(thumb_bgr), cv2.COLOR_BGR2GRAY)
    if grey.min() == grey.max():
        return np.ones(grey.shape, bool)
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return grey <= threshold


def tissue_mask(reader: RegionReader, mask: str = 'otsu') -> tuple[np.ndarray, float]:
    """``(mask, scale)``: a boolean tissue mask of the whole image, ``scale`` image pixels
    per mask pixel; ``mask`` is ``'otsu'`` or a mask image file (non-zero = tissue, any
    size: it is stretched over the image)."""
    if mask == 'otsu':
        thumb, scale = reader.thumbnail()
        return otsu_tissue(thumb), scale
    import cv2
    m = cv2.imread(mask, cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageFileError(f'{mask}: the tissue mask is not an image cv2 can read')
    return m > 0, reader.height / m.shape[0]


def kept_pixels(mask: np.ndarray, scale: float, height: int, width: int, block: int = 64,
                scale_x: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Image rows and columns to keep: those of every ``block``-pixel block row (column)
    where ``mask`` (``scale`` image pixels per mask pixel) has any tissue. At least one
    block is kept on each axis."""
    sx = scale if scale_x is None else scale_x

    def axis(any_along: np.ndarray, size: int, s: float) -> np.ndarray:
        keep = []
        for b0 in range(0, size, block):
            m0, m1 = int(b0 / s), max(int(b0 / s) + 1, int(np.ceil(min(size, b0 + block) / s)))
            if any_along[m0:m1].any():
                keep.append(np.arange(b0, min(size, b0 + block)))
        if not keep:
            keep.append(np.arange(0, min(size, block)))
        return np.concatenate(keep)

    return axis(mask.any(axis=1), height, scale), axis(mask.any(axis=0), width, sx)
