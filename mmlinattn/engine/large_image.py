"""Whole-image dense prediction on images far larger than memory would allow.

The backbone runs token-chunked (:func:`~mmlinattn.models.backbones.base.chunked_inference`):
exact global InLine attention over the whole image. Necks and heads made of
convolutions and resizing (FPN, Semantic FPN's head, UperNet's FPN part) are
local: an output pixel reads only features within its receptive field. They run
tile by tile (:func:`run_by_tiles`) on crops of the feature pyramid with a
``halo`` around each tile, and each tile keeps only its own centre, which then
equals the whole-image computation when the halo covers the receptive field.
Global parts (UperNet's pyramid pooling) run once on their whole (stride-32)
map and are cropped per tile.

Exactness needs every level of every crop to line up: the image is zero-padded
(after normalisation, as mmseg's ``size_divisor`` pads) to a multiple of
:data:`SIZE_DIVISOR` and tiles and halos are multiples of it, so that crops of
the stride-4 ... stride-64 maps start and end on whole pixels of each.

Units: image pixels in the public functions; feature pixels of the finest map
(stride 4) inside.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import parallel as sp
from ..models.backbones.base import RowSource, chunked_inference
from ..models.layers import DEFAULT_CHUNK_TOKENS
from ..ops import class_argmax, upsampled_class_argmax
from ..parallel import SpatialGroup
from ..utils.heap import RetainedBound, reused_heap
from .fpn_levels import SemanticFPNLevels, semantic_fpn_levels
from .head_kernels import fast_cpu_heads

__all__ = ['SIZE_DIVISOR', 'Tile', 'feature_tiles', 'run_by_tiles', 'prepare_image',
           'segment_large', 'segment_whole', 'segment_slide', 'detect_large',
           'regionwise_neck', 'features_given']

#: Images are padded to a multiple of this (the coarsest stride of any map: FPN's P6).
SIZE_DIVISOR = 64

Progress = Optional[Callable[[int, int], None]]
#: An image: ``(3, H, W) uint8`` BGR in memory, or a region reader
#: (:class:`~mmlinattn.rasters.RegionReader`) decoded band by band.
ImageInput = Any


@dataclass(frozen=True)
class Tile:
    """A tile ``[y0, y1) x [x0, x1)`` and its crop with the halo ``[cy0, cy1) x [cx0, cx1)``,
    in pixels of the finest feature map."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    def crop(self, t: Tensor, scale: float) -> Tensor:
        """The crop of an NCHW map whose pixels are ``scale`` finest pixels each."""
        return _box(t, self.cy0, self.cy1, self.cx0, self.cx1, scale)

    def own(self, t: Tensor, scale: float) -> Tensor:
        """The tile's own part (no halo) of a whole NCHW map at ``scale``."""
        return _box(t, self.y0, self.y1, self.x0, self.x1, scale)

    def crop_scale(self, t: Tensor) -> float:
        """Finest pixels per pixel of a map ``t`` computed on the crop."""
        return (self.cy1 - self.cy0) / t.shape[2]

    def centre(self, t: Tensor) -> Tensor:
        """The tile's own part of a map computed on the crop, at any scale."""
        return _box(t, self.y0 - self.cy0, self.y1 - self.cy0, self.x0 - self.cx0,
                    self.x1 - self.cx0, self.crop_scale(t))


def _box(t: Tensor, y0: int, y1: int, x0: int, x1: int, scale: float) -> Tensor:
    """Rows ``[y0, y1)`` and columns ``[x0, x1)``, in finest pixels, of an NCHW map whose
    pixels are ``scale`` finest pixels each."""
    return t[:, :, int(y0 / scale):math.ceil(y1 / scale), int(x0 / scale):math.ceil(x1 / scale)]


def feature_tiles(height: int, width: int, tile: int, halo: int,
                  rows: Optional[tuple[int, int]] = None) -> list[Tile]:
    """Tiles of ``tile`` pixels (the last ones smaller) covering a ``height x width`` map,
    each with ``halo`` pixels of context on every side (clipped at the map); with
    ``rows=(r0, r1)`` only the tiles of those rows (a rank's band)."""
    tiles = []
    r0, r1 = rows if rows is not None else (0, height)
    for y0 in range(r0, r1, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(r1, y0 + tile), min(width, x0 + tile)
            tiles.append(Tile(y0, y1, x0, x1, max(0, y0 - halo), min(height, y1 + halo),
                              max(0, x0 - halo), min(width, x1 + halo)))
    return tiles


def run_by_tiles(fn: Callable[[list[Tensor], Tile], Sequence[Tensor]], feats: Sequence[Tensor],
                 tile: int, halo: int, progress: Progress = None,
                 band: Optional[tuple[int, int, int, int]] = None
                 ) -> Iterator[tuple[Tile, Sequence[Tensor]]]:
    """``fn`` on the crops of ``feats`` (NCHW, finest first) around each tile; yields the
    tile and ``fn``'s outputs (NCHW maps at any scale, on the crop).

    ``band=(r0, r1, offset, height)``: ``feats`` hold the finest rows from ``offset``
    of maps ``height`` rows high (a rank's rows with their halo); only the tiles of
    rows ``[r0, r1)`` run. Tiles are in the whole map's coordinates.
    """
    finest = feats[0]
    scales = [finest.shape[2] / f.shape[2] for f in feats]
    r0, r1, offset, height = band if band is not None else (0, finest.shape[2], 0,
                                                            finest.shape[2])
    tiles = feature_tiles(height, finest.shape[3], tile, halo, (r0, r1))
    for i, t in enumerate(tiles):
        crops = [_box(f, t.cy0 - offset, t.cy1 - offset, t.cx0, t.cx1, s)
                 for f, s in zip(feats, scales)]
        yield t, fn(crops, t)
        if progress is not None:
            progress(i + 1, len(tiles))


def prepare_image(model: Any, image: Tensor, scope: str) -> tuple[Tensor, list, tuple[int, int]]:
    """``image (3, H, W) uint8`` (as loaded, BGR) -> normalised ``(1, 3, Hp, Wp)`` input
    zero-padded to :data:`SIZE_DIVISOR`, its data samples, and ``(H, W)``. mmseg samples
    say the padded shape (logits are computed for it, then cropped); mmdet samples the
    image's own (boxes are clipped to it)."""
    h, w = image.shape[1:]
    hp, wp = (-(-s // SIZE_DIVISOR) * SIZE_DIVISOR for s in (h, w))
    # mmseg resizes logits to img_shape and we crop; mmdet clips boxes to img_shape.
    shown = (hp, wp) if scope == 'mmseg' else (h, w)
    meta = dict(img_shape=shown, ori_shape=shown, pad_shape=(hp, wp),
                scale_factor=(1., 1.), batch_input_shape=(hp, wp))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    data = model.data_preprocessor(dict(inputs=[image], data_samples=[Sample(metainfo=meta)]),
                                   False)
    x = data['inputs']
    if x.shape[2:] != (hp, wp):
        x = F.pad(x, (0, wp - x.shape[3], 0, hp - x.shape[2]))
    for sample in data['data_samples']:
        sample.set_metainfo(meta)
    return x, data['data_samples'], (h, w)


@contextlib.contextmanager
def _psp_from(head: Any, psp_out: Optional[Tensor], current: list[Tile],
              finest_height: int) -> Iterator[None]:
    """UperNet's pyramid pooling, computed once on the whole map: each tile's crop of it."""
    if psp_out is None:
        yield
        return
    scale = finest_height / psp_out.shape[2]
    head.psp_forward = lambda inputs: current[0].crop(psp_out, scale)
    try:
        yield
    finally:
        del head.psp_forward  # the class's method again


def _features(model: Any, image: ImageInput, scope: str, chunk_tokens: Optional[int],
              info: dict) -> tuple[Any, list, tuple[int, int], tuple[Tensor, ...], int]:
    """The prepared input (a tensor, or a :class:`RowSource` for a reader), its samples,
    the image size, the backbone's maps (chunked when ``chunk_tokens``) and their
    finest stride; ``info['backbone_s']``: the time."""
    start = time.perf_counter()
    if isinstance(image, Tensor):
        x, samples, size = prepare_image(model, image, scope)
    else:
        x, size = row_source(model, image, chunk_tokens)
        samples = []
    feats = backbone_maps(model, x, chunk_tokens)
    info['backbone_s'] = time.perf_counter() - start
    return x, samples, size, feats, x.shape[2] // feats[0].shape[2]


def backbone_maps(model: Any, x: Any, chunk_tokens: Optional[int],
                  group: Optional[SpatialGroup] = None) -> tuple[Tensor, ...]:
    """The backbone's maps of ``x`` (a tensor or a :class:`RowSource`), chunked when
    ``chunk_tokens``, over the ranks of ``group`` when given. The heap keeps freed
    buffers meanwhile (:func:`~mmlinattn.utils.heap.reused_heap`): band after band the
    chunked blocks allocate the same sizes again, which glibc would otherwise map, fault
    in and zero anew each time (a third of the backbone's time at 16384^2)."""
    with (chunked_inference(model, chunk_tokens) if chunk_tokens is not None
          else contextlib.nullcontext()), \
            (sp.spatial_parallel(group) if group is not None else contextlib.nullcontext()), \
            reused_heap():
        return model.backbone(x)


def _padded(size: int) -> int:
    return -(-size // SIZE_DIVISOR) * SIZE_DIVISOR


def normalised_rows(model: Any, reader: Any, r0: int, r1: int, width: int) -> Tensor:
    """Rows ``[r0, r1)`` of the padded, normalised input ``(1, 3, r1 - r0, width)``
    computed from the image rows a reader decodes: the data preprocessor's per-pixel
    normalisation of those rows alone, zeros below the image and right of it (as
    :func:`prepare_image` pads the whole image)."""
    stop = min(r1, reader.height)
    out = torch.zeros(1, 3, r1 - r0, width)
    if stop > r0:
        band = torch.from_numpy(reader.read(r0, stop)).permute(2, 0, 1)
        x = model.data_preprocessor(dict(inputs=[band]), False)['inputs']
        out[:, :, :stop - r0, :reader.width] = x[:, :, :stop - r0, :reader.width]
    return out


def row_source(model: Any, reader: Any, chunk_tokens: Optional[int],
               bands: Optional[list[tuple[int, int]]] = None
               ) -> tuple[RowSource, tuple[int, int]]:
    """The model's padded, normalised input of a region reader's image as a
    :class:`RowSource` (decoded band by band as the backbone's stem reads it) and the
    image's ``(H, W)``. Only the chunked backbone reads by rows: ``chunk_tokens`` None
    is refused here, before anything is decoded."""
    if chunk_tokens is None:
        raise ValueError('an image read from a file by regions needs the chunked backbone '
                         '(chunk_tokens)')
    h, w = reader.height, reader.width
    wp = _padded(w)
    return RowSource((1, 3, _padded(h), wp), lambda r0, r1: normalised_rows(
        model, reader, r0, r1, wp), bands), (h, w)


def segment_large(model: Any, image: ImageInput,
                  chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS, tile: int = 2048,
                  halo: int = 256, progress: Progress = None, keep_logits: bool = False,
                  group: Optional[SpatialGroup] = None, labels: Optional[Tensor] = None,
                  resume: Optional[Resumable] = None) -> tuple[Tensor, dict]:
    """Semantic segmentation of one whole image: ``(H, W)`` labels and timings.

    ``model`` an mmseg ``EncoderDecoder`` in eval mode; ``image (3, H, W) uint8``, or a
    region reader (:mod:`mmlinattn.rasters`), whose rows are decoded band by band as
    the chunked backbone's stem reads them (the whole image is never decoded).
    The backbone runs chunked; the neck and decode head per ``tile x tile`` image
    pixels with ``halo`` pixels of context (both multiples of :data:`SIZE_DIVISOR`);
    the logits are upsampled (as mmseg: bilinear to the padded image) and arg-maxed
    band by band, so no full-resolution logit map exists (``keep_logits=True``, for
    small images and tests, also returns them as ``info['logits'] (classes, H, W)``).

    ``labels``: an ``(H, W)`` integer tensor to write into (e.g. memory-mapped);
    default a new int32 tensor. ``resume``: hooks of a resumable run (see
    :class:`Resumable`): saved backbone maps, tile rows already done.

    ``group``: the image's rows split over these processes (spatial parallelism, every
    rank passes the whole image or a reader of it): each normalises and runs the chunked
    backbone on its band, fetches ``halo`` pixels of feature rows from its neighbours,
    decodes its own tiles, and the labels are gathered on the group's first rank (the
    others return their own rows, ``info['rows']``). With ``labels`` given, each rank
    writes its rows there and nothing is gathered.
    """
    if group is not None:
        return _segment_large_sharded(model, image, chunk_tokens, tile, halo, progress,
                                      keep_logits, group, labels, resume)
    _check_tiling(tile, halo)
    info: dict = {}
    with torch.no_grad():
        feats = resume.load_features() if resume is not None else None
        if feats is None:
            x, _, (h, w), feats, stride = _features(model, image, 'mmseg', chunk_tokens, info)
            del x
            if resume is not None:
                resume.save_features(feats)
        else:
            h, w = _image_size(image)
            stride = _padded(h) // feats[0].shape[2]
            info['backbone_s'] = 0.0
        start = time.perf_counter()
        head = model.decode_head
        psp_out = _whole_pooling(model, feats)
        if labels is None:
            labels = torch.empty(h, w, dtype=torch.int32)
        logits_out = torch.empty(head.out_channels, h, w) if keep_logits else None
        decode = _tile_decoder(model, psp_out, feats[0].shape[2])
        finest_h = feats[0].shape[2]
        count = _tile_counter(progress, finest_h, feats[0].shape[3], tile // stride, resume)
        _decode_tiles(decode, feats, labels, logits_out, head.align_corners, stride, tile,
                      halo, count, resume, finest_h)
        info['head_s'] = time.perf_counter() - start
        if keep_logits:
            info['logits'] = logits_out
    return labels, info


class Resumable:
    """What a resumable run (:mod:`mmlinattn.engine.large_files`) gives
    :func:`segment_large`: the backbone's maps saved by an earlier run (or None), a
    place to save them, the tile rows (first finest-map row of each) already written,
    and a call after each tile row is complete."""

    def load_features(self) -> Optional[tuple[Tensor, ...]]:
        return None

    def save_features(self, feats: Sequence[Tensor]) -> None:
        pass

    def rows_done(self) -> set[int]:
        return set()

    def row_done(self, row: int) -> None:
        pass


def _tile_rows(height: int, tile: int, resume: Optional[Resumable]
               ) -> Iterator[tuple[int, int]]:
    """``[r0, r1)`` of each row of tiles of a ``height``-row finest map still to do."""
    done = resume.rows_done() if resume is not None else set()
    for r0 in range(0, height, tile):
        if r0 not in done:
            yield r0, min(height, r0 + tile)


def _tile_counter(progress: Progress, height: int, width: int, tile: int,
                  resume: Optional[Resumable], rows: Optional[tuple[int, int]] = None
                  ) -> Callable[[], None]:
    """A call per finished tile that reports ``progress(done, total)`` over every tile of
    the map (or of ``rows``), counting those of tile rows done by an earlier run."""
    r0, r1 = rows if rows is not None else (0, height)
    across = -(-width // tile)
    starts = range(r0, r1, tile)
    done_rows = resume.rows_done() if resume is not None else set()
    state = [across * sum(1 for r in starts if r in done_rows), across * len(starts)]

    def count() -> None:
        state[0] += 1
        if progress is not None:
            progress(state[0], state[1])
    return count


def _image_size(image: ImageInput) -> tuple[int, int]:
    if isinstance(image, Tensor):
        return tuple(image.shape[1:])
    return image.height, image.width


def _whole_pooling(model: Any, feats: Sequence[Tensor]) -> Optional[Tensor]:
    """UperNet's pyramid pooling is global: computed once on the whole map (else None)."""
    head = model.decode_head
    if not hasattr(head, 'psp_forward'):
        return None
    if model.with_neck:
        raise NotImplementedError('a neck before a UperNet head is not supported')
    return head.psp_forward(head._transform_inputs(list(feats)))


def _tile_decoder(model: Any, psp_out: Optional[Tensor], finest_height: int
                  ) -> Callable[[list[Tensor], Tile], tuple[Tile, Tensor]]:
    """Neck and decode head on a tile's crops: the ``fn`` of :func:`run_by_tiles`,
    returning the tile narrowed to the crop its logits cover and the logits. Semantic
    FPN runs each level on what its branch reads (:mod:`.fpn_levels`); other heads on
    the whole crop (UperNet's pooling cropped from the whole map's ``psp_out``)."""
    levels = semantic_fpn_levels(model) if psp_out is None else None
    if levels is not None:
        return levels
    current: list[Tile] = []

    def decode(crops: list[Tensor], t: Tile) -> tuple[Tile, Tensor]:
        current[:] = [t]
        inputs = model.neck(crops) if model.with_neck else crops
        with _psp_from(model.decode_head, psp_out, current, finest_height):
            return t, model.decode_head.forward(list(inputs))

    return decode


def _decode_tiles(decode: Callable[[list[Tensor], Tile], tuple[Tile, Tensor]],
                  feats: Sequence[Tensor],
                  labels: Tensor, logits_out: Optional[Tensor], align: bool, stride: int,
                  tile: int, halo: int, count: Callable[[], None], resume: Optional[Resumable],
                  finest_total: int, own: Optional[tuple[int, int]] = None,
                  feats_row0: int = 0, labels_row0: int = 0,
                  height: Optional[int] = None) -> None:
    """The neck and head tile by tile, row of tiles by row of tiles, and their labels
    (:func:`_write_labels`). ``feats`` hold the finest rows from ``feats_row0`` of a map
    ``finest_total`` rows high; ``own``: the finest rows whose tiles this process decodes
    (a rank's band; default all); ``labels`` hold the image rows from ``labels_row0`` of an
    image ``height`` rows high. Rows of tiles ``resume`` has done are skipped, each row
    done is reported to it."""
    own = own or (0, finest_total)
    # Semantic FPN by levels: channels-last convolutions (see fast_cpu_heads).
    levels = (decode.neck, decode.head) if isinstance(decode, SemanticFPNLevels) else ()
    trim = RetainedBound()  # border tiles are smaller: bound what they strand
    with reused_heap(), fast_cpu_heads(*levels):  # tiles of one size: buffers taken again
        for r0, r1 in _tile_rows(finest_total, tile // stride, resume):
            if r1 <= own[0] or r0 >= own[1]:
                continue
            band = (max(r0, own[0]), min(r1, own[1]), feats_row0, finest_total)
            for _, (t, logits) in run_by_tiles(decode, feats, tile // stride, halo // stride,
                                               band=band):
                _write_labels(labels, t, logits, stride, align, logits_out, labels_row0,
                              height)
                count()
                trim()
            if resume is not None:
                resume.row_done(r0)


def _write_labels(labels: Tensor, t: Tile, logits: Tensor, stride: int, align: bool,
                  logits_out: Optional[Tensor] = None, row0: int = 0,
                  height: Optional[int] = None) -> None:
    """Arg-max of the ``stride``-times upsampled logits of the tile, band by band.
    ``labels`` holds the image rows from ``row0`` of an image ``height`` rows high."""
    w = labels.shape[1]
    h = labels.shape[0] + row0 if height is None else height
    scale = t.crop_scale(logits)
    if scale != 1:
        raise ValueError(f'the decode head returned logits at 1/{scale} of its finest input')
    for r0 in range(t.y0, t.y1, 32):
        r1 = min(t.y1, r0 + 32)
        top, bottom = max(t.cy0, r0 - 1), min(t.cy1, r1 + 1)  # one row for the interpolation
        left, right = max(t.cx0, t.x0 - 1), min(t.cx1, t.x1 + 1)
        # Upsampled in float32 whatever the head's dtype (bf16 logits convert exactly):
        # bf16's rounding of the upsampled scores would make ties, and keep many more
        # classes in contention (upsampled_class_argmax's margin is the dtype's).
        band = logits[:, :, top - t.cy0:bottom - t.cy0, left - t.cx0:right - t.cx0].to(
            torch.float32, memory_format=torch.contiguous_format)
        y0, x0 = (r0 - top) * stride, (t.x0 - left) * stride
        ys, xs = r0 * stride, t.x0 * stride
        ye, xe = min(h, r1 * stride), min(w, t.x1 * stride)
        if ye <= ys or xe <= xs:
            continue
        if logits_out is None and not align:
            # Only the classes that can win are upsampled: the same labels.
            best = upsampled_class_argmax(band, stride)
            labels[ys - row0:ye - row0, xs:xe] = best[y0:y0 + ye - ys, x0:x0 + xe - xs]
            continue
        up = F.interpolate(band, size=(band.shape[2] * stride, band.shape[3] * stride),
                           mode='bilinear', align_corners=align)
        up = up[0, :, y0:y0 + (r1 - r0) * stride, x0:x0 + (t.x1 - t.x0) * stride]
        labels[ys - row0:ye - row0, xs:xe] = class_argmax(up[:, :ye - ys, :xe - xs])
        if logits_out is not None:
            logits_out[:, ys - row0:ye - row0, xs:xe] = up[:, :ye - ys, :xe - xs]


def _segment_large_sharded(model: Any, image: ImageInput, chunk_tokens: Optional[int],
                           tile: int, halo: int, progress: Progress, keep_logits: bool,
                           group: SpatialGroup, labels_out: Optional[Tensor] = None,
                           resume: Optional[Resumable] = None) -> tuple[Tensor, dict]:
    """:func:`segment_large` with the image's rows over ``group`` (see there)."""
    _check_tiling(tile, halo)
    info: dict = {}
    h, w = _image_size(image)
    hp = _padded(h)
    bands = sp.image_bands(hp, group.size, SIZE_DIVISOR)
    a, b = bands[group.rank]
    with torch.no_grad():
        start = time.perf_counter()
        feats = resume.load_features() if resume is not None else None
        if feats is None:
            if isinstance(image, Tensor):
                # The band is padded at the bottom (last rank) and right as the whole is.
                x, _, _ = prepare_image(model, image[:, a:min(b, h)], 'mmseg')
            else:  # each rank decodes only the rows its stem reads
                x, _ = row_source(model, image, chunk_tokens, bands)
            feats = backbone_maps(model, x, chunk_tokens, group)
            del x
            if resume is not None:
                resume.save_features(feats)
        stride = (b - a) // feats[0].shape[2]  # of the finest map
        info['backbone_s'] = time.perf_counter() - start
        start = time.perf_counter()
        head = model.decode_head
        psp_out = None
        if hasattr(head, 'psp_forward'):  # UperNet: global pooling of the whole stride-32 map
            if model.with_neck:
                raise NotImplementedError('a neck before a UperNet head is not supported')
            levels = head._transform_inputs(list(feats))
            coarsest = levels[-1]  # the only map psp_forward reads: gathered whole
            whole = sp.gather_rows(coarsest, 2, sp.row_spans(coarsest.shape[2], group), group)
            psp_out = head.psp_forward(levels[:-1] + [whole])
            del whole, levels, coarsest
        # Each level with the rows of the halo from the neighbours (zero-free: clipped).
        finest_total = hp // stride
        lo = max(0, (a - halo) // stride)
        ext = []
        feats = list(feats)
        finest_rows = feats[0].shape[2]
        for i in range(len(feats)):
            f, feats[i] = feats[i], None  # each level held once: its band, then band + halo
            scale = finest_rows // f.shape[2]  # finest rows per row of this level
            spans = sp.row_spans(f.shape[2], group)
            needs = []
            for ra, rb in bands:
                rlo = max(0, (ra - halo) // stride)
                rhi = min(finest_total, (rb + halo) // stride)
                needs.append((rlo // scale, -(-rhi // scale)))
            ext.append(sp.fetch_rows(f, 2, spans, needs, group))
            del f
        del feats
        rows_here = min(b, h) - a
        labels = (torch.empty(rows_here, w, dtype=torch.int32) if labels_out is None
                  else labels_out[a:a + rows_here])
        logits_out = torch.empty(head.out_channels, rows_here, w) if keep_logits else None
        decode = _tile_decoder(model, psp_out, finest_total)
        own = (a // stride, b // stride)
        count = _tile_counter(progress, finest_total, ext[0].shape[3], tile // stride, resume,
                              own)
        _decode_tiles(decode, ext, labels, logits_out, head.align_corners, stride, tile, halo,
                      count, resume, finest_total, own=own, feats_row0=lo, labels_row0=a,
                      height=h)
        del ext, decode, psp_out
        info['head_s'] = time.perf_counter() - start
        info['rows'] = (a, a + rows_here)
        if keep_logits:
            info['logits'] = logits_out
        if labels_out is not None:
            return labels_out, info
        whole = sp.gather_rows_to(labels, 0, 0, group)
    return (whole if group.first else labels), info


def _check_tiling(tile: int, halo: int) -> None:
    for name, value in (('tile', tile), ('halo', halo)):
        if value < (SIZE_DIVISOR if name == 'tile' else 0) or value % SIZE_DIVISOR:
            raise ValueError(f'{name}={value} must be a positive multiple of {SIZE_DIVISOR} image '
                             'pixels, so that tiles line up with every feature level')


def segment_whole(model: Any, image: Tensor) -> tuple[Tensor, Tensor]:
    """mmseg's own whole-image inference of the padded image (the reference):
    ``(labels (H, W), logits (classes, H, W))``."""
    with torch.no_grad():
        x, samples, (h, w) = prepare_image(model, image, 'mmseg')
        logits = model.encode_decode(x, [s.metainfo for s in samples])[0, :, :h, :w]
    return logits.argmax(dim=0), logits


def segment_slide(model: Any, image: Tensor, crop: int = 512, stride: int = 341) -> Tensor:
    """mmseg's ``slide`` inference (tiles of ``crop`` px, ``stride`` apart, averaged
    logits) of the same image: the tiling a softmax backbone needs. ``(H, W)`` labels."""
    saved = model.test_cfg
    model.test_cfg = type(saved)(dict(saved, mode='slide', crop_size=(crop, crop),
                                      stride=(stride, stride)))
    try:
        with torch.no_grad():
            h, w = image.shape[1:]
            data = model.data_preprocessor(dict(inputs=[image]), False)
            meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))
            logits = model.inference(data['inputs'], [meta])[0]
    finally:
        model.test_cfg = saved
    return logits.argmax(dim=0)


def regionwise_neck(neck: Any, feats: Sequence[Tensor], tile: int, halo: int,
                    progress: Progress = None) -> list[Tensor]:
    """``neck(feats)`` computed tile by tile into whole output maps (finest-pixel
    ``tile``/``halo``), so only one tile's intermediates exist at a time."""
    outs: Optional[list[Tensor]] = None
    finest = feats[0].shape[2:]
    for t, parts in run_by_tiles(lambda crops, t: neck(crops), feats, tile, halo, progress):
        scales = [t.crop_scale(p) for p in parts]
        if outs is None:
            outs = [p.new_empty(p.shape[0], p.shape[1], math.ceil(finest[0] / scale),
                                math.ceil(finest[1] / scale)) for p, scale in zip(parts, scales)]
        for out, p, scale in zip(outs, parts, scales):
            t.own(out, scale).copy_(t.centre(p))
    return outs


def detect_large(model: Any, image: Tensor, chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS,
                 tile: int = 2048, halo: int = 256, masks: bool = True,
                 progress: Progress = None) -> tuple[Any, dict]:
    """Detection on one whole image: the chunked backbone, the neck tile by tile into
    whole maps, then mmdet's own heads (RPN/RoI or dense) on them.

    The heads run on the whole pyramid: proposals and RoI features are not local,
    so memory grows with the neck's maps (256 channels at stride 4). ``masks=False``
    skips a mask head (mmdet pastes every mask at full image size).
    Returns mmdet's ``DetDataSample`` (boxes in image pixels) and timings.
    """
    from .tile_pyramid import dense_head_of  # it imports this module

    _check_tiling(tile, halo)
    info: dict = {}
    with torch.no_grad(), fast_cpu_heads(dense_head_of(model), getattr(model, 'roi_head', None)):
        x, samples, _, feats, stride = _features(model, image, 'mmdet', chunk_tokens, info)
        start = time.perf_counter()
        feats = (regionwise_neck(model.neck, feats, tile // stride, halo // stride, progress)
                 if model.with_neck else feats)
        info['neck_s'] = time.perf_counter() - start
        start = time.perf_counter()
        feats = [f.float() for f in feats]  # the heads in fp32 (mmcv's CPU ops take float32)
        with torch.autocast(feats[0].device.type, enabled=False), \
                features_given(model, feats), _without_masks(model, not masks):
            result = model.predict(x, samples, rescale=True)[0]
        info['heads_s'] = time.perf_counter() - start
    return result, info


@contextlib.contextmanager
def features_given(model: Any, feats: Sequence[Tensor]) -> Iterator[None]:
    """mmdet's ``predict`` with ``extract_feat`` returning precomputed features."""
    model.extract_feat = lambda inputs: tuple(feats)
    try:
        yield
    finally:
        del model.extract_feat


@contextlib.contextmanager
def _without_masks(model: Any, drop: bool) -> Iterator[None]:
    roi_head = getattr(model, 'roi_head', None)
    mask_head = getattr(roi_head, 'mask_head', None)
    if not drop or mask_head is None:
        yield
        return
    roi_head.mask_head = None
    try:
        yield
    finally:
        roi_head.mask_head = mask_head
