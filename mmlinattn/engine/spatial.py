"""Spatial parallelism for mmseg segmenters and mmdet detectors under mmengine.

One image's rows are split over the ranks of a spatial group (:mod:`mmlinattn.parallel`);
this module runs the OpenMMLab parts on bands: necks and decode heads whose layers are
convolutions, resizes and batch norm (each written here against the upstream
``forward``, with halos, resizes to the right rows and SyncBN semantics), the
segmentation loss as a sum over every pixel divided by the global count, and the
mmengine side: :class:`SpatialParallelWrapper` (a model wrapper: data x spatial mesh,
weight gradients summed over the spatial group and averaged over the data group),
:class:`SpatialGroupSampler` (the ranks of one spatial group read the same images) and
:func:`configure_spatial_parallel` (what ``spatial_parallel=dict(size=S)`` in a config
turns on in ``tools/train.py``).

Supported upstream modules: mmseg ``FPN`` and mmdet ``FPN`` necks; ``FPNHead`` (Semantic
FPN), ``UPerHead`` (UperNet) and ``FCNHead`` (their auxiliary head) decode heads with
``CrossEntropyLoss``. Anything else is refused by name.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.dataset import DefaultSampler
from torch import Tensor, nn

from .. import parallel as sp
from ..parallel import RowSpans, SpatialGroup, row_spans
from ..registry import DATA_SAMPLERS, FUNCTIONS, MODEL_WRAPPERS
from .large_image import features_given

__all__ = ['BAND_UNIT', 'SpatialParallelWrapper', 'SpatialGroupSampler', 'spatial_worker_init',
           'configure_spatial_parallel', 'sharded_neck', 'sharded_decode', 'sharded_seg_loss',
           'segmentor_loss', 'segmentor_logits', 'SpatialMesh', 'band_features',
           'detector_features', 'detector_loss']

#: Bands are cut on multiples of the coarsest stride of the backbones (32 px), so
#: every feature map's band starts on a whole row and patch embeddings stay local.
BAND_UNIT = 32


def _unsupported(module: nn.Module, where: str) -> ValueError:
    return ValueError(f'{type(module).__module__}.{type(module).__name__} ({where}) cannot be '
                      'spatially sharded; supported: FPN necks, FPNHead, UPerHead and FCNHead '
                      'decode heads with CrossEntropyLoss (see docs/spatial_parallel.md)')


# -- layers ---------------------------------------------------------------------------------

def _norm(norm: nn.Module, x: Tensor, g: SpatialGroup) -> Tensor:
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) or (
            hasattr(norm, 'running_mean') and hasattr(norm, 'momentum')):
        return sp.batch_norm(norm, x, g)
    raise _unsupported(norm, 'normalisation over the whole map')


def conv_module(cm: nn.Module, x: Tensor, g: SpatialGroup) -> Tensor:
    """mmcv ``ConvModule`` (conv -> norm -> act) on an NCHW band."""
    if getattr(cm, 'order', ('conv', 'norm', 'act')) != ('conv', 'norm', 'act') or \
            getattr(cm, 'with_spectral_norm', False) or not isinstance(cm.conv, nn.Conv2d):
        raise _unsupported(cm, 'ConvModule other than conv2d -> norm -> act')
    x = sp.conv2d(cm.conv, x, g)
    if cm.with_norm:
        x = _norm(cm.norm, x, g)
    if cm.with_activation:
        x = cm.activate(x)
    return x


def _sequential(seq: nn.Module, x: Tensor, g: SpatialGroup) -> Tensor:
    for m in (seq if isinstance(seq, nn.Sequential) else [seq]):
        name = type(m).__name__
        if name == 'ConvModule':
            x = conv_module(m, x, g)
        elif name == 'Upsample' and getattr(m, 'size', None) is None:
            x = upsample(x, m.scale_factor, m.mode, m.align_corners, g)
        elif isinstance(m, nn.Identity):
            pass
        else:
            raise _unsupported(m, 'layer of a decode head')
    return x


def upsample(x: Tensor, scale: float, mode: str, align_corners: Optional[bool],
             g: SpatialGroup) -> Tensor:
    """mmseg ``Upsample(scale_factor=s)``: output size ``int(H s)``, rank r's rows from
    ``int(a_r s)``."""
    spans = row_spans(x.shape[2], g)
    total = int(spans.total * scale)
    out = RowSpans(tuple(min(total, int(a * scale)) for a in spans.starts[:-1]) + (total, ),
                   g.rank)
    return sp.resize(x, out, int(x.shape[3] * scale), mode, align_corners, g=g, spans=spans)


def resize_like(x: Tensor, like: Tensor, mode: str, align_corners: Optional[bool],
                g: SpatialGroup) -> Tensor:
    """``resize(x, size=like's whole size)``: this rank's rows of ``like``."""
    return sp.resize(x, row_spans(like.shape[2], g), like.shape[3], mode, align_corners, g=g)


def adaptive_avg_pool(x: Tensor, bins: int, g: SpatialGroup) -> Tensor:
    """``nn.AdaptiveAvgPool2d(bins)`` of the whole map, on every rank: columns pooled
    locally, each row bin's partial sum all-reduced (bins as torch cuts them)."""
    spans = row_spans(x.shape[2], g)
    a, b = spans.mine
    cols = F.adaptive_avg_pool2d(x, (x.shape[2], bins))  # (B, C, h, bins): columns only
    rows = []
    for i in range(bins):
        lo, hi = (i * spans.total) // bins, -(-((i + 1) * spans.total) // bins)
        la, lb = max(lo, a), min(hi, b)
        part = cols[:, :, la - a:lb - a].sum(dim=2) if lb > la else cols.new_zeros(
            cols.shape[0], cols.shape[1], bins)
        rows.append(part / (hi - lo))
    return sp.global_sum(torch.stack(rows, dim=2), g)


def _replicated(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` on a tensor every rank holds whole (pooled maps): the ordinary layers."""
    with sp.suspended():
        return fn(x)


# -- necks and heads ------------------------------------------------------------------------

def sharded_neck(neck: nn.Module, inputs: Sequence[Tensor], g: SpatialGroup) -> tuple:
    """mmseg/mmdet ``FPN.forward`` on bands (extra levels by stride-2 max pooling only)."""
    if type(neck).__name__ != 'FPN' or getattr(neck, 'add_extra_convs', False):
        raise _unsupported(neck, 'neck')
    laterals = [conv_module(lc, inputs[i + neck.start_level], g)
                for i, lc in enumerate(neck.lateral_convs)]
    cfg = dict(neck.upsample_cfg)
    mode, align = cfg.pop('mode', 'nearest'), cfg.pop('align_corners', None)
    for i in range(len(laterals) - 1, 0, -1):
        if 'scale_factor' in cfg:
            up = upsample(laterals[i], cfg['scale_factor'], mode, align, g)
        else:
            up = resize_like(laterals[i], laterals[i - 1], mode, align, g)
        laterals[i - 1] = laterals[i - 1] + up
    outs = [conv_module(neck.fpn_convs[i], lat, g) for i, lat in enumerate(laterals)]
    for _ in range(neck.num_outs - len(outs)):  # F.max_pool2d(x, 1, stride=2)
        outs.append(sp.strided_rows(
            lambda band, r0, r1, off, h: band[:, :, :, ::2], outs[-1], 2, 1, 2, 0,
            lambda h: (h - 1) // 2 + 1, g))
    return tuple(outs)


def _cls_seg(head: nn.Module, x: Tensor) -> Tensor:
    # Dropout2d draws one value per (sample, channel): the same on every rank of a group
    # whose random generators agree (the same seed), as the wrapper checks at start.
    if head.dropout is not None:
        x = head.dropout(x)
    return head.conv_seg(x)  # 1x1: row-local


def _fpn_head(head: nn.Module, feats: Sequence[Tensor], g: SpatialGroup) -> Tensor:
    x = head._transform_inputs(feats)
    out = _sequential(head.scale_heads[0], x[0], g)
    for i in range(1, len(head.feature_strides)):
        out = out + resize_like(_sequential(head.scale_heads[i], x[i], g), out, 'bilinear',
                                head.align_corners, g)
    return _cls_seg(head, out)


def _uper_head(head: nn.Module, feats: Sequence[Tensor], g: SpatialGroup) -> Tensor:
    inputs = head._transform_inputs(feats)
    laterals = [conv_module(lc, inputs[i], g) for i, lc in enumerate(head.lateral_convs)]
    top = inputs[-1]
    psp = [top]
    for ppm in head.psp_modules:  # Sequential(AdaptiveAvgPool2d(s), ConvModule)
        pool, conv = ppm[0], ppm[1]
        pooled = adaptive_avg_pool(top, pool.output_size if isinstance(pool.output_size, int)
                                   else pool.output_size[0], g)
        pooled = _replicated(conv, pooled)
        psp.append(sp.resize(pooled, row_spans(top.shape[2], g), top.shape[3], 'bilinear',
                             head.align_corners))
    laterals.append(conv_module(head.bottleneck, torch.cat(psp, dim=1), g))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + resize_like(laterals[i], laterals[i - 1],
                                                        'bilinear', head.align_corners, g)
    outs = [conv_module(head.fpn_convs[i], laterals[i], g) for i in range(len(laterals) - 1)]
    outs.append(laterals[-1])
    for i in range(len(outs) - 1, 0, -1):
        outs[i] = resize_like(outs[i], outs[0], 'bilinear', head.align_corners, g)
    return _cls_seg(head, conv_module(head.fpn_bottleneck, torch.cat(outs, dim=1), g))


def _fcn_head(head: nn.Module, feats: Sequence[Tensor], g: SpatialGroup) -> Tensor:
    x = head._transform_inputs(feats)
    out = _sequential(head.convs, x, g)
    if head.concat_input:
        out = conv_module(head.conv_cat, torch.cat([x, out], dim=1), g)
    return _cls_seg(head, out)


_HEADS: dict[str, Callable[[nn.Module, Sequence[Tensor], SpatialGroup], Tensor]] = {
    'FPNHead': _fpn_head, 'UPerHead': _uper_head, 'FCNHead': _fcn_head}


def sharded_decode(head: nn.Module, feats: Sequence[Tensor], g: SpatialGroup) -> Tensor:
    """A decode head's logits for this rank's rows of its input maps."""
    fn = _HEADS.get(type(head).__name__)
    if fn is None or getattr(head, 'input_transform', None) == 'resize_concat':
        raise _unsupported(head, 'decode head')
    return fn(head, feats, g)


def sharded_seg_loss(head: nn.Module, logits: Tensor, data_samples: Sequence[Any],
                     bands: Sequence[tuple[int, int]], g: SpatialGroup) -> dict:
    """mmseg ``loss_by_feat`` on this rank's rows: logits resized to its label rows,
    each ``CrossEntropyLoss`` (a mean over pixels, or over non-ignored pixels with
    ``avg_non_ignore``) scaled by this rank's share of the counted pixels, so that the
    sum over ranks is the whole-image loss. Logged values are the whole image's."""
    from mmseg.models.losses import CrossEntropyLoss, accuracy
    if head.sampler is not None:
        raise _unsupported(head.sampler, 'pixel sampler of the decode head')
    a, b = bands[g.rank]
    label = head._stack_batch_gt(data_samples)[:, :, a:b]
    out_spans = RowSpans(tuple(x for x, _ in bands) + (bands[-1][1], ), g.rank)
    logits = sp.resize(logits, out_spans, label.shape[3], 'bilinear', head.align_corners, g=g)
    label = label.squeeze(1)
    losses_decode = head.loss_decode if isinstance(head.loss_decode, nn.ModuleList) else [
        head.loss_decode]
    valid = (label != head.ignore_index).sum().to(logits.dtype)
    counts = sp.global_sum(torch.stack([valid, valid.new_tensor(float(label.numel()))]), g)
    loss: dict = {}
    for loss_decode in losses_decode:
        if type(loss_decode) is not CrossEntropyLoss or loss_decode.use_sigmoid or \
                loss_decode.use_mask or loss_decode.reduction != 'mean':
            raise _unsupported(loss_decode, 'loss (CrossEntropyLoss, softmax, mean only)')
        value = loss_decode(logits, label, weight=None, ignore_index=head.ignore_index)
        if loss_decode.avg_non_ignore:
            share = valid / counts[0].clamp_min(1.0)
        else:
            share = label.numel() / counts[1]
        value = value * share
        total = sp.global_sum(value.detach(), g)
        value = value + (total - value).detach()  # logs the whole image; grads its own
        name = loss_decode.loss_name
        loss[name] = loss[name] + value if name in loss else value
    acc = accuracy(logits, label, ignore_index=head.ignore_index).reshape(())
    loss['acc_seg'] = sp.global_sum((acc * valid).detach(), g) / counts[0].clamp_min(1.0)
    return loss


def _check_backbone(model: nn.Module) -> None:
    from ..models.backbones.base import InLineBackbone
    if not isinstance(model.backbone, InLineBackbone):
        raise _unsupported(model.backbone, 'backbone (InLine backbones only)')


def band_features(model: nn.Module, inputs: Tensor, g: SpatialGroup, unit: int = BAND_UNIT
                  ) -> tuple[tuple[Tensor, ...], list[tuple[int, int]]]:
    """The backbone's (and FPN neck's) maps of this rank's band of ``inputs`` (the whole
    batch after the data preprocessor; every rank of the group passes the same), and the
    image bands of every rank. Call within :func:`mmlinattn.parallel.spatial_parallel`."""
    _check_backbone(model)
    bands = sp.image_bands(inputs.shape[2], g.size, unit)
    a, b = bands[g.rank]
    feats = model.backbone(inputs[:, :, a:b])
    if model.with_neck:
        feats = sharded_neck(model.neck, feats, g)
    return tuple(feats), bands


def segmentor_logits(model: nn.Module, inputs: Tensor, g: SpatialGroup,
                     unit: int = BAND_UNIT) -> tuple[Tensor, list[tuple[int, int]]]:
    """Decode-head logits (stride 4) of this rank's band of ``inputs``, and the bands."""
    with sp.spatial_parallel(g):
        feats, bands = band_features(model, inputs, g, unit)
        return sharded_decode(model.decode_head, feats, g), bands


def segmentor_loss(model: nn.Module, inputs: Tensor, data_samples: Sequence[Any],
                   g: SpatialGroup, unit: int = BAND_UNIT) -> dict:
    """mmseg ``EncoderDecoder.loss`` on this rank's band: decode and auxiliary heads,
    losses whose sum over the group is the whole-image loss."""
    from mmseg.utils import add_prefix
    losses: dict = {}
    with sp.spatial_parallel(g):
        feats, bands = band_features(model, inputs, g, unit)
        heads = [('decode', model.decode_head)]
        if model.with_auxiliary_head:
            aux = model.auxiliary_head
            heads += ([(f'aux_{i}', h) for i, h in enumerate(aux)]
                      if isinstance(aux, nn.ModuleList) else [('aux', aux)])
        for prefix, head in heads:
            logits = sharded_decode(head, feats, g)
            losses.update(add_prefix(sharded_seg_loss(head, logits, data_samples, bands, g),
                                     prefix))
    return losses


def detector_features(model: nn.Module, inputs: Tensor, g: SpatialGroup,
                      unit: int = BAND_UNIT) -> tuple[Tensor, ...]:
    """An mmdet detector's backbone and FPN neck on this rank's band, then the neck's
    maps gathered whole on every rank (for the heads, which are not sharded: proposals,
    sampling and RoI pooling are not row-local)."""
    with sp.spatial_parallel(g):
        feats, _ = band_features(model, inputs, g, unit)
        return tuple(sp.gather_rows(f, 2, row_spans(f.shape[2], g), g) for f in feats)


def detector_loss(model: nn.Module, inputs: Tensor, data_samples: Sequence[Any],
                  g: SpatialGroup, unit: int = BAND_UNIT) -> dict:
    """mmdet ``loss`` with a sharded backbone and neck: every rank runs the heads on the
    gathered maps, so each rank's losses are scaled by ``1 / S`` (their sum over the
    group is the image's loss; the gathering sums the maps' gradients). Logged values
    are the unscaled losses."""
    feats = detector_features(model, inputs, g, unit)
    with features_given(model, feats):
        losses = model.loss(inputs, data_samples)

    def share(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v / g.size + (v - v / g.size).detach()
        if isinstance(v, (list, tuple)):
            return type(v)(share(x) for x in v)
        return v

    return {k: share(v) if 'loss' in k else v for k, v in losses.items()}


# -- mmengine -------------------------------------------------------------------------------

def _model_kind(model: nn.Module) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if 'EncoderDecoder' in names:
        return 'segmentor'
    if 'BaseDetector' in names and hasattr(model, 'backbone'):
        return 'detector'
    raise _unsupported(model, 'model: mmseg EncoderDecoder segmenters and mmdet detectors '
                       'train spatially sharded')


class SpatialMesh:
    """The ranks as a ``data x spatial`` grid: rank ``d * S + s`` holds band ``s`` of the
    images of data-parallel replica ``d`` (the spatial ranks of one image are neighbours,
    on one node where possible)."""

    def __init__(self, spatial_size: int) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                'spatial_parallel needs a distributed launch: run tools/dist_train.sh CONFIG N '
                '(torchrun, --launcher pytorch) with N a multiple of the spatial size')
        world = dist.get_world_size()
        if spatial_size < 1 or world % spatial_size:
            raise ValueError(f'spatial_parallel size {spatial_size} does not divide the world '
                             f'size {world}: launch a multiple of {spatial_size} processes')
        self.world, self.spatial_size = world, spatial_size
        self.data_size = world // spatial_size
        rank = dist.get_rank()
        self.data_rank, self.spatial_rank = divmod(rank, spatial_size)
        groups = [tuple(range(d * spatial_size, (d + 1) * spatial_size))
                  for d in range(self.data_size)]
        mine = None
        for ranks in groups:  # every rank creates every group, in the same order
            pg = dist.new_group(list(ranks)) if spatial_size < world else None
            if rank in ranks:
                mine = SpatialGroup(pg, self.spatial_rank, spatial_size, ranks)
        self.group: SpatialGroup = mine


def spatial_mesh_info() -> tuple[int, int]:
    """``(data rank, data size)`` of this process under the configured spatial size
    (environment ``MMLINATTN_SPATIAL_SIZE``, set by :func:`configure_spatial_parallel`)."""
    size = int(os.environ.get('MMLINATTN_SPATIAL_SIZE', '1'))
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank() // size, dist.get_world_size() // size


@DATA_SAMPLERS.register_module()
class SpatialGroupSampler(DefaultSampler):
    """``DefaultSampler`` over the data-parallel replicas only: the ranks of one spatial
    group get the same indices in the same order (the seed is shared by all ranks)."""

    def __init__(self, dataset: Any, shuffle: bool = True, seed: Optional[int] = None,
                 round_up: bool = True) -> None:
        super().__init__(dataset, shuffle=shuffle, seed=seed, round_up=round_up)
        self.rank, self.world_size = spatial_mesh_info()
        if self.round_up:
            self.num_samples = math.ceil(len(self.dataset) / self.world_size)
            self.total_size = self.num_samples * self.world_size
        else:
            self.num_samples = math.ceil((len(self.dataset) - self.rank) / self.world_size)
            self.total_size = len(self.dataset)


@FUNCTIONS.register_module()
def spatial_worker_init(worker_id: int, num_workers: int, rank: int, seed: int,
                        disable_subprocess_warning: bool = False) -> None:
    """Data-loader worker seeds by data-parallel replica, not by rank: the ranks of a
    spatial group draw the same augmentations for the same image."""
    from mmengine.dataset.utils import worker_init_fn
    data_rank, _ = spatial_mesh_info()
    worker_init_fn(worker_id, num_workers, data_rank, seed, disable_subprocess_warning)


@MODEL_WRAPPERS.register_module()
class SpatialParallelWrapper(nn.Module):
    """mmengine model wrapper: each image over ``spatial_size`` ranks, ``world /
    spatial_size`` images at a time.

    ``train_step`` runs the model's loss on this rank's band (:func:`segmentor_loss`
    for mmseg segmenters, :func:`detector_loss` for mmdet detectors), back-propagates it,
    then sums every weight gradient over all ranks and divides by the data-parallel size
    (one all-reduce of one flat buffer): summed over the spatial group (each rank's loss
    is its share of the image's) and averaged over the data group (as DDP does).
    Batch-norm moments in the neck and head are taken over the spatial group (SyncBN
    within the image's ranks). ``test_step``/``val_step``: see :meth:`test_step`.

    The ranks form their groups with ``torch.distributed.new_group`` (what
    ``init_device_mesh`` builds on), which serves gloo on the CPU and NCCL alike.
    """

    def __init__(self, module: nn.Module, spatial_size: int = 2, unit: int = BAND_UNIT,
                 check_inputs: bool = True, **kwargs: Any) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - {'broadcast_buffers', 'find_unused_parameters',
                                        'device_ids', 'output_device'})
        if unknown:
            raise ValueError(f'SpatialParallelWrapper: unknown options {unknown}')
        self.kind = _model_kind(module)
        self.module = module
        self.mesh = SpatialMesh(spatial_size)
        self.unit = unit
        self.check_inputs = check_inputs
        self._broadcast_parameters()

    @property
    def group(self) -> SpatialGroup:
        return self.mesh.group

    def _broadcast_parameters(self) -> None:
        """Start from rank 0's weights and buffers everywhere (as DDP does)."""
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            dist.broadcast(t.data, 0)

    def _check_same_image(self, inputs: Tensor) -> None:
        """The ranks of a spatial group must hold the same batch: compare a checksum."""
        g = self.group
        mine = torch.tensor([float(inputs.shape[2]), float(inputs.shape[3]),
                             float(inputs.double().sum())], dtype=torch.float64,
                            device=inputs.device)
        everyone = [torch.zeros_like(mine) for _ in range(g.size)]
        dist.all_gather(everyone, mine, group=g.group)
        if any(not torch.equal(e, everyone[0]) for e in everyone):
            raise RuntimeError(
                'the ranks of a spatial group received different images '
                f'({[tuple(e.tolist()) for e in everyone]}); use SpatialGroupSampler and '
                'spatial_worker_init (configure_spatial_parallel sets both)')

    def sync_gradients(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        dist.all_reduce(flat)
        flat /= self.mesh.data_size
        start = 0
        for p in params:  # the gradients become views of the one reduced buffer
            n = p.numel()
            p.grad = flat[start:start + n].view_as(p)
            start += n

    def loss(self, inputs: Tensor, data_samples: Sequence[Any]) -> dict:
        if self.check_inputs:
            self._check_same_image(inputs)
        fn = segmentor_loss if self.kind == 'segmentor' else detector_loss
        return fn(self.module, inputs, data_samples, self.group, self.unit)

    def train_step(self, data: Any, optim_wrapper: Any) -> dict:
        with optim_wrapper.optim_context(self):
            data = self.module.data_preprocessor(data, True)
            losses = self.loss(data['inputs'], data['data_samples'])
        parsed, log_vars = self.module.parse_losses(losses)
        optim_wrapper.backward(optim_wrapper.scale_loss(parsed))
        if optim_wrapper.should_update():
            self.sync_gradients()
            optim_wrapper.step()
            optim_wrapper.zero_grad()
        return log_vars

    def val_step(self, data: Any) -> list:
        return self.test_step(data)

    def test_step(self, data: Any) -> list:
        """Prediction with each image's rows over the group. The ranks of a group load
        different images (the usual sampler); in turn, each rank's batch is broadcast to
        the group, predicted sharded (``whole`` mode) and its stride-4 logits gathered on
        that rank, which finishes mmseg's prediction. Every image is predicted once, so
        the metrics see each once. Detectors predict their own images whole."""
        if self.kind != 'segmentor':
            return self.module.test_step(data)
        mode = self.module.test_cfg.get('mode', 'whole') if self.module.test_cfg else 'whole'
        if mode != 'whole':
            raise ValueError(f"spatially parallel prediction runs test_cfg.mode='whole', not "
                             f'{mode!r} (the point is the whole image)')
        data = self.module.data_preprocessor(data, False)
        g = self.group
        outputs = None
        for owner in range(g.size):
            inputs = sp.broadcast_tensor(data['inputs'] if g.rank == owner else None, owner, g)
            logits, _ = segmentor_logits(self.module, inputs, g, self.unit)
            whole = sp.gather_rows_to(logits, 2, owner, g)
            if g.rank == owner:
                samples = data['data_samples']
                seg = self.module.decode_head.predict_by_feat(
                    whole, [s.metainfo for s in samples])
                outputs = self.module.postprocess_result(seg, samples)
        return outputs


def configure_spatial_parallel(cfg: Any) -> Optional[int]:
    """Apply ``spatial_parallel=dict(size=S)`` of a config: the wrapper, the sampler and
    the worker seeds; returns S (None when the config does not ask for it)."""
    from mmengine.config import ConfigDict
    spec = cfg.get('spatial_parallel')
    if not spec:
        return None
    unknown = sorted(set(spec) - {'size', 'unit', 'check_inputs'})
    if unknown:
        raise ValueError(f'spatial_parallel: unknown keys {unknown}; expected size, unit, '
                         'check_inputs')
    size = int(spec.get('size', 0))
    if size < 1:
        raise ValueError(f'spatial_parallel.size must be a positive int, got {spec.get("size")}')
    if cfg.get('launcher', 'none') == 'none':
        raise ValueError('spatial_parallel needs a distributed launch: run tools/dist_train.sh '
                         f'CONFIG N (N a multiple of {size}), not tools/train.py alone')
    os.environ['MMLINATTN_SPATIAL_SIZE'] = str(size)
    cfg.model_wrapper_cfg = ConfigDict(type='mmlinattn.SpatialParallelWrapper',
                                       spatial_size=size, **{k: v for k, v in spec.items()
                                                             if k != 'size'})
    loader = cfg.get('train_dataloader')
    if loader:
        sampler = dict(loader.get('sampler') or {})
        if sampler.get('type', 'DefaultSampler').split('.')[-1] not in (
                'DefaultSampler', 'InfiniteSampler', 'SpatialGroupSampler'):
            raise ValueError(f'spatial_parallel: train sampler {sampler.get("type")} is not '
                             'supported; use DefaultSampler')
        loader.sampler = ConfigDict(type='mmlinattn.SpatialGroupSampler',
                                    shuffle=sampler.get('shuffle', True))
        loader.worker_init_fn = ConfigDict(type='mmlinattn.spatial_worker_init')
    return size
