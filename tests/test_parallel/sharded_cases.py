"""What each rank runs in the spatial-parallelism tests (spawned: module-level functions).

Every rank builds the same model (same seed), computes the single-process forward and
backward itself on the whole input (the independent truth: the ordinary code path), then
the sharded forward on its band of rows, and compares its rows of every output and,
after summing over the ranks, every parameter gradient.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from mmlinattn.parallel import SpatialGroup, image_bands, spatial_parallel

ATOL, RTOL = 2e-5, 1e-5
DTYPE = torch.float64 if __import__('os').environ.get('SP_F64') else torch.float32


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rank: int,
           failures: Optional[list] = None, atol: Optional[float] = None) -> None:
    if got.shape != want.shape:
        raise AssertionError(f'rank {rank}: {name}: shape {tuple(got.shape)} vs '
                             f'{tuple(want.shape)}')
    scale = want.abs().max().clamp_min(1e-6)
    err = (got - want).abs().max()
    if not err <= (atol if atol is not None else ATOL + RTOL * scale):
        msg = (f'rank {rank}: {name}: max abs error {float(err):.3g} (max |value| '
               f'{float(scale):.3g}, relative {float(err / scale):.2g})')
        if failures is None:
            raise AssertionError(msg)
        failures.append(msg)


def _summed_grads_close(model: torch.nn.Module, ref_grads: dict, rank: int,
                        failures: list) -> None:
    """Every parameter's gradient summed over the ranks against the one-process one."""
    for n, p in model.named_parameters():
        if n in ref_grads:
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            _close(f'grad {n}', g, ref_grads[n], rank, failures)


def build_backbone(family: str, **kwargs: Any) -> torch.nn.Module:
    from mmlinattn.models import InLineCSwin, InLineDeiT, InLinePVT, InLineSwin
    torch.manual_seed(0)
    if family == 'pvt':
        return InLinePVT(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                         mlp_ratios=(2, 2, 2, 2), drop_path_rate=0., **kwargs)
    if family == 'swin':
        return InLineSwin(arch=dict(embed_dims=16, depths=(1, 1, 1, 2), num_heads=(1, 2, 2, 2),
                                    attn_types='IIIS'), softmax_window=3, drop_path_rate=0.,
                          **kwargs)
    if family == 'cswin':
        return InLineCSwin(arch=dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 2),
                                     attn_types='IISS'), split_size=2, drop_path_rate=0.,
                           **kwargs)
    if family == 'deit':
        return InLineDeiT(arch=dict(embed_dims=32, depth=4, num_heads=2, pretrain_img_size=64),
                          out_indices=(0, 1, 2, 3), drop_path_rate=0., **kwargs)
    if family == 'agent_swin':
        from mmlinattn.models import AgentSwin
        return AgentSwin(arch=dict(embed_dims=16, depths=(1, 1, 1, 2), num_heads=(1, 2, 2, 2),
                                   attn_types='AAAB', agent_num=(4, 4, 4, 4)),
                         pretrain_img_size=64, softmax_window=3, drop_path_rate=0., **kwargs)
    if family == 'flatten_pvt_v2':
        from mmlinattn.models import FLattenPVTv2
        return FLattenPVTv2(dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1),
                                 num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2)),
                            pretrain_img_size=64, drop_path_rate=0., **kwargs)
    if family == 'agent_deit':
        from mmlinattn.models import AgentDeiT
        return AgentDeiT(arch=dict(embed_dims=32, depth=4, num_heads=2, pretrain_img_size=64,
                                   agent_num=(4, 4, 9, 9), agent_layers=4),
                         out_indices=(0, 1, 2, 3), drop_path_rate=0., **kwargs)
    if family == 'mlla':
        from mmlinattn.models import MLLA
        return MLLA(dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8)),
                    drop_path_rate=0., **kwargs)
    if family == 'agent_pvt':
        from mmlinattn.models import AgentPVT
        return AgentPVT(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1),
                        num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2), agent_num=(4, 4, 9, 9),
                        agent_shapes=[(3, 2), (2, 2), (3, 3), None], pretrain_img_size=64,
                        drop_path_rate=0., **kwargs)
    if family == 'flatten_pvt':
        from mmlinattn.models import FLattenPVT
        return FLattenPVT(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2), pretrain_img_size=64,
                          drop_path_rate=0., **kwargs)
    raise ValueError(family)


def backbone_exact(rank: int, world: int, family: str, size: tuple[int, int],
                   kwargs: Optional[dict] = None, unit: int = 32, broken: str = '') -> None:
    """Outputs and every parameter gradient of a sharded backbone equal the whole one."""
    model = build_backbone(family, **(kwargs or {})).to(DTYPE)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size, dtype=DTYPE)
    ref = model(x)
    # A random linear read-out of every map: no cancellation that would leave only
    # rounding noise in some gradients (as sum() after a LayerNorm does).
    probes = [torch.randn_like(r) for r in ref]
    sum((r * w).sum() for r, w in zip(ref, probes)).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    group = SpatialGroup.world()
    bands = image_bands(size[0], world, unit)
    a, b = bands[rank]
    rows = [_rows_of(r.shape[2], size[0], bands, rank) for r in ref]
    with spatial_parallel(group):
        if broken:
            _break(broken)
        outs = model(x[:, :, a:b].clone().requires_grad_())
        sum((o * w[:, :, r0:r1]).sum() for o, w, (r0, r1) in zip(outs, probes, rows)).backward()
    for i, (o, r, (r0, r1)) in enumerate(zip(outs, ref, rows)):
        _close(f'output {i} ({r.shape[2]} rows)', o, r[:, :, r0:r1].detach(), rank)
    failures: list = []
    _summed_grads_close(model, ref_grads, rank, failures)
    if failures:
        raise AssertionError('\n'.join(failures))


def _rows_of(out_rows: int, in_rows: int, bands: list, rank: int) -> tuple[int, int]:
    """The output rows a rank owns at a map of ``out_rows`` rows (stride ``in/out``,
    rounded up as :func:`mmlinattn.parallel.strided_spans`)."""
    stride = 2 ** round(torch.log2(torch.tensor(in_rows / out_rows)).item())
    starts = [min(out_rows, -(-a // stride)) for a, _ in bands] + [out_rows]
    return starts[rank], starts[rank + 1]


def _break(what: str) -> None:
    """Break one piece on purpose: the tests must then fail."""
    from mmlinattn import parallel
    from mmlinattn.models.layers import local_residual
    if what == 'halo':  # the local residual without its neighbours' rows
        local_residual.halo_rows = lambda v, dim, top, bottom, g: torch.nn.functional.pad(
            v, (0, 0, 0, 0, top, bottom))
    elif what == 'reduce':  # InLine statistics of the local rows only
        import mmlinattn.models.layers.attention as attention
        attention.summing_over = lambda g: (lambda t: t)
    elif what == 'agent_reduce':  # agents pooled and softmax summed over the local rows only
        import mmlinattn.models.layers.agent_attention as agent_attention
        agent_attention.all_reduce_sum = lambda t, g: t
    else:
        raise ValueError(what)
    del parallel


SEG_CONFIGS = {
    'fpn': 'configs/segmentation/inline_pvt/fpn_inline-pvt-t_4xb4-40k_ade20k-512x512.py',
    'upernet': 'configs/segmentation/inline_swin/upernet_inline-swin-t_8xb2-160k_ade20k-512x512.py',
}
SMALL_BACKBONES = {
    'fpn': dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                mlp_ratios=(2, 2, 2, 2), drop_path_rate=0.),
    'upernet': dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 2), num_heads=(1, 2, 2, 2),
                              attn_types='IIIS'), softmax_window=3, drop_path_rate=0.),
}


def build_segmentor(kind: str) -> torch.nn.Module:
    """A shipped segmenter config with a small backbone, neck and head widths."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm

    from mmlinattn.engine.build import build_from_config
    cfg = Config.fromfile(SEG_CONFIGS[kind])
    cfg.model.backbone.update(SMALL_BACKBONES[kind])
    dims = (16, 32, 40, 48) if kind == 'fpn' else (16, 32, 64, 128)
    if kind == 'fpn':
        cfg.model.neck.update(in_channels=list(dims), out_channels=16)
        cfg.model.decode_head.update(in_channels=[16] * 4, channels=8, num_classes=5)
    else:
        cfg.model.decode_head.update(in_channels=list(dims), channels=8, num_classes=5)
        cfg.model.auxiliary_head.update(in_channels=dims[2], channels=8, num_classes=5)
    torch.manual_seed(0)
    model, _ = build_from_config(cfg)
    return revert_sync_batchnorm(model).to(DTYPE)


def segmentor_exact(rank: int, world: int, kind: str, size: tuple[int, int],
                    broken: str = '') -> None:
    """Loss, logged values, every parameter gradient and the batch-norm running
    statistics of a sharded training forward/backward equal the single-process ones."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from mmlinattn.engine.spatial import segmentor_logits, segmentor_loss

    model = build_segmentor(kind)
    model.train()
    torch.manual_seed(1)
    h, w = size
    inputs = torch.randn(2, 3, h, w, dtype=DTYPE)
    samples = []
    for _ in range(2):
        s = SegDataSample()
        label = torch.randint(0, 5, (1, h, w))
        label[:, :3] = 255  # some ignored pixels
        s.gt_sem_seg = PixelData(data=label)
        s.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        samples.append(s)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(2)  # the heads' Dropout2d draws the same channels in both runs
    ref_losses = model.loss(inputs, samples)
    ref_total, ref_log = model.parse_losses(ref_losses)
    ref_total.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_buffers = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model.load_state_dict(state)
    model.zero_grad()

    group = SpatialGroup.world()
    with spatial_parallel(group):
        if broken:
            _break(broken)
    torch.manual_seed(2)
    losses = segmentor_loss(model, inputs, samples, group)
    total, log = model.parse_losses(losses)
    total.backward()
    for k in ref_log:
        _close(f'logged {k} ({log[k]} vs {ref_log[k]})', torch.as_tensor(log[k]),
               torch.as_tensor(ref_log[k]), rank)
    failures: list = []
    _summed_grads_close(model, ref_grads, rank, failures)
    for k, v in ref_buffers.items():
        _close(f'buffer {k}', model.state_dict()[k], v, rank, failures)
    if failures:
        raise AssertionError('\n'.join(failures))
    # Inference: this rank's rows of the decode head's logits.
    model.eval()
    with torch.no_grad():
        ref = model.decode_head(model.extract_feat(inputs))
        logits, bands = segmentor_logits(model, inputs, group)
    a, b = bands[rank]
    _close('eval logits', logits, ref[:, :, a // 4:-(-b // 4) if rank == world - 1 else b // 4],
           rank)


def train_step_exact(rank: int, world: int, spatial: int, size: tuple[int, int],
                     config: str = '') -> None:
    """One ``SpatialParallelWrapper.train_step`` (data x spatial ranks) gives the loss and
    the updated weights of single-process steps: replica d trains on image d, and the
    update uses the mean over replicas of each image's whole-image gradient. ``config``:
    a shipped config as it is (default: Semantic FPN with a small backbone)."""
    import copy

    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import OptimWrapper

    from mmlinattn.engine.build import build_from_config, synthetic_train_batch
    from mmlinattn.engine.spatial import SpatialParallelWrapper

    if config:
        torch.manual_seed(0)
        model = revert_sync_batchnorm(build_from_config(config)[0])
    else:
        model = build_segmentor('fpn').float()
    model.train()
    data_size = world // spatial
    batches = [synthetic_train_batch(model, 'mmseg', *size, batch=1, seed=10 + d)
               for d in range(data_size)]
    lr = 0.1
    # Single process: each image's gradient from the same weights, averaged, one SGD step.
    ref = copy.deepcopy(model)
    grads, ref_losses = None, []
    for batch in batches:
        ref.zero_grad()
        torch.manual_seed(3)
        data = ref.data_preprocessor(copy.deepcopy(batch), True)
        total, log = ref.parse_losses(ref.loss(data['inputs'], data['data_samples']))
        total.backward()
        ref_losses.append(log['loss'])
        step = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for p in ref.parameters()]
        grads = step if grads is None else [a + b for a, b in zip(grads, step)]
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p -= lr * g / data_size

    wrapper = SpatialParallelWrapper(model, spatial_size=spatial)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=lr))
    torch.manual_seed(3)
    log = wrapper.train_step(copy.deepcopy(batches[wrapper.mesh.data_rank]), optim)
    _close('loss', torch.as_tensor(log['loss']),
           torch.as_tensor(ref_losses[wrapper.mesh.data_rank]), rank)
    failures: list = []
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        _close(f'updated {n}', p.detach(), q.detach(), rank, failures)
    if failures:
        raise AssertionError('\n'.join(failures))


def run_cases(rank: int, world: int, cases: list) -> None:
    """Several cases in one process group (spawning costs more than a tiny case)."""
    for name, args in cases:
        globals()[name](rank, world, *args)


def detector_exact(rank: int, world: int, size: tuple[int, int]) -> None:
    """Mask R-CNN with a sharded backbone and FPN (heads on the gathered maps): the same
    losses and, summed over the ranks, the same gradients as one process."""
    from mmengine.config import Config

    from mmlinattn.engine.build import build_from_config, synthetic_train_batch
    from mmlinattn.engine.spatial import detector_loss
    cfg = Config.fromfile('configs/tiny/mask-rcnn_inline-pvt-t_fpn_300i_tiny-coco.py')
    cfg.model.backbone.update(SMALL_BACKBONES['fpn'])
    cfg.model.neck.update(in_channels=[16, 32, 40, 48])
    torch.manual_seed(0)
    model, _ = build_from_config(cfg)
    model.train()
    batch = synthetic_train_batch(model, 'mmdet', *size, batch=1, seed=4)
    data = model.data_preprocessor(batch, True)
    torch.manual_seed(5)
    ref_total, ref_log = model.parse_losses(model.loss(data['inputs'], data['data_samples']))
    ref_total.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    group = SpatialGroup.world()
    torch.manual_seed(5)
    total, log = model.parse_losses(detector_loss(model, data['inputs'], data['data_samples'],
                                                  group))
    total.backward()
    # float32 only (mmcv's NMS and RoIAlign): the heads' ranking, suppression and ReLUs
    # near zero turn float32 rounding of the sharded features into small differences:
    # ~1e-3 relative in a few weights' gradients on a Xeon, and on an AMD EPYC (other
    # oneDNN kernels) loss_cls 6.6e-5 relative and the position embedding's gradient
    # 1.4%. A missing 1/S or gradient sum, or a dropped halo, would be 50-100%.
    for k in ref_log:
        want = torch.as_tensor(ref_log[k])
        _close(f'logged {k}', torch.as_tensor(log[k]), want, rank,
               atol=ATOL + 2e-4 * float(want.abs().max()))
    failures: list = []
    for n, p in model.named_parameters():
        if n in ref_grads:
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            err = (g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-6)
            if err > 3e-2:
                failures.append(f'rank {rank}: grad {n}: relative error {float(err):.3g}')
    if failures:
        raise AssertionError('\n'.join(failures))


def mesh_refuses(rank: int, world: int, spatial: int) -> None:
    """A spatial size that does not divide the world size is named."""
    from mmlinattn.engine.spatial import SpatialMesh
    try:
        SpatialMesh(spatial)
    except ValueError as e:
        assert f'size {spatial} does not divide the world size {world}' in str(e), e
    else:
        raise AssertionError('SpatialMesh accepted a size that does not divide the world')


def backbone_chunked_exact(rank: int, world: int, family: str, size: tuple[int, int],
                           chunk_tokens: int = 13) -> None:
    """Inference with token-chunked bands on each rank's rows equals the whole model."""
    from mmlinattn.models.layers import chunked
    model = build_backbone(family).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    group = SpatialGroup.world()
    bands = image_bands(size[0], world)
    a, b = bands[rank]
    calls = []
    original = chunked._global_inline

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[4])  # rows per band
        return original(*args, **kwargs)

    with torch.no_grad():
        ref = model(x)
        model.chunk_tokens = chunk_tokens
        chunked._global_inline = counting
        try:
            with spatial_parallel(group):
                outs = model(x[:, :, a:b])
        finally:
            chunked._global_inline = original
            model.chunk_tokens = None
    assert calls, 'the chunked two-pass path did not run'
    for i, (o, r) in enumerate(zip(outs, ref)):
        r0, r1 = _rows_of(r.shape[2], size[0], bands, rank)
        _close(f'{family} chunked output {i}', o, r[:, :, r0:r1], rank)


def segment_large_exact(rank: int, world: int, kind: str, size: tuple[int, int]) -> None:
    """Whole-image inference (chunked backbone, neck and head by tiles) with the rows over
    the ranks: each rank's logits equal the one-process run's rows; labels on rank 0."""
    from mmlinattn.engine import large_image as li
    model = build_segmentor(kind).float().eval()
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    ref, ref_info = li.segment_large(model, image, 13, 64, 64, keep_logits=True)
    labels, info = li.segment_large(model, image, 13, 64, 64, keep_logits=True,
                                    group=SpatialGroup.world())
    a, b = info['rows']
    _close('logits', info['logits'], ref_info['logits'][:, a:b], rank)
    if rank == 0:
        assert labels.shape == ref.shape
        # Ties broken by rounding aside, the same labels.
        assert (labels != ref).float().mean() < 1e-3
