"""Gigapixel image files in and out: region readers (TIFF, whole slides, GeoTIFF, cv2),
pyramidal OME-TIFF predictions, detected objects (COCO JSON, GeoJSON, GeoPackage, an
SQLite store), a deep-zoom viewer and tissue
masks. Depends on numpy and cv2; tifffile and OpenSlide are the ``large-images``
extra, imported when a file needs them. See docs/large_images.md.
"""
from .objects import (
    CocoJsonSink,
    DetectedObject,
    GeoJsonSink,
    GeoPackageSink,
    LocalMask,
    ObjectStore,
    open_sinks,
    query_objects,
)
from .readers import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_RATIO,
    ArrayReader,
    CompactedReader,
    DownsampledReader,
    GeoReference,
    ImageFileError,
    OpenSlideReader,
    RegionReader,
    TiffReader,
    kept_rectangles,
    open_image,
)
from .tissue import kept_pixels, otsu_tissue, tissue_mask
from .viewer import write_viewer
from .writers import (
    atomic_output,
    default_palette,
    read_label_metadata,
    write_label_pyramid,
    write_overlay_pyramid,
)

__all__ = [
    'DEFAULT_MAX_PIXELS', 'DEFAULT_MAX_RATIO', 'ArrayReader', 'CompactedReader',
    'DownsampledReader', 'GeoReference',
    'ImageFileError', 'OpenSlideReader', 'RegionReader', 'TiffReader', 'kept_rectangles',
    'open_image',
    'kept_pixels', 'otsu_tissue', 'tissue_mask', 'write_viewer', 'atomic_output',
    'default_palette', 'read_label_metadata', 'write_label_pyramid',
    'write_overlay_pyramid', 'CocoJsonSink', 'DetectedObject', 'GeoJsonSink', 'GeoPackageSink',
    'LocalMask', 'ObjectStore', 'open_sinks', 'query_objects',
]
