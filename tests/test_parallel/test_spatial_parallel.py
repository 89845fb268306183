"""Spatial parallelism against the single-process computation, on real gloo groups.

Every case runs the ordinary (whole-image) forward and backward in each process as the
truth, then the sharded one on the process's band of rows, and compares outputs and
every parameter gradient (summed over ranks). Heights are odd so that the last band
is uneven and the last stride-32 row is partial.
"""
import pytest
import torch
from sharded_cases import run_cases
from spawn import run_ranks

from mmlinattn.parallel import RowSpans, image_bands, source_rows

FAMILIES = ('pvt', 'swin', 'cswin', 'deit')


def test_every_backbone_family_two_ranks():
    run_ranks(2, run_cases, [('backbone_exact', (f, (97, 45))) for f in FAMILIES])


def test_every_backbone_family_three_ranks():
    run_ranks(3, run_cases, [('backbone_exact', (f, (161, 38))) for f in FAMILIES])


def test_chunked_inference_on_each_ranks_rows():
    run_ranks(3, run_cases, [('backbone_chunked_exact', (f, (161, 45))) for f in FAMILIES])


def test_sibling_attentions_sharded():
    """Focused attention split over the ranks (its sums reduced, a 2-row halo for its
    5x5 convolution, the positional encoding resized for each rank's rows); agent
    attention too (each rank's share of the pooled agents and of the agent-to-key
    softmax reduced, the biases resized for its rows; Agent-DeiT's class token a key on
    the first rank only). Outputs and gradients equal the whole model's."""
    run_ranks(2, run_cases, [('backbone_exact', (f, (97, 45)))
                             for f in ('agent_swin', 'flatten_pvt', 'agent_deit')])
    run_ranks(3, run_cases, [('backbone_exact', (f, (161, 38)))
                             for f in ('flatten_pvt', 'agent_pvt', 'flatten_pvt_v2')])


def test_mlla_sharded(monkeypatch):
    """MLLA's blocks on each rank's rows with 4 rows of each neighbour and the attention's
    sums reduced; stem and merges by rows in eval, on the gathered map while their
    BatchNorms take batch statistics. In float64: a convolution bias before a
    BatchNorm has a gradient of zero up to rounding, which float32 leaves at 1e-4."""
    monkeypatch.setenv('SP_F64', '1')
    run_ranks(2, run_cases, [('backbone_exact', ('mlla', (97, 45)))])
    run_ranks(3, run_cases, [('backbone_exact', ('mlla', (161, 38)))])


def test_dropping_the_agent_reductions_is_caught():
    with pytest.raises(AssertionError, match='max abs error'):
        run_ranks(2, run_cases, [('backbone_exact', ('agent_swin', (97, 45), None, 32,
                                                     'agent_reduce'))])


def test_gradient_checkpointing_recomputes_sharded():
    run_ranks(2, run_cases, [('backbone_exact', ('pvt', (97, 45), dict(with_cp=True)))])


@pytest.mark.parametrize('what', ['halo', 'reduce'])
def test_dropping_a_halo_or_a_reduction_is_caught(what):
    with pytest.raises(AssertionError, match='max abs error'):
        run_ranks(2, run_cases, [('backbone_exact', ('pvt', (97, 45), None, 32, what))])


mm = pytest.importorskip  # the segmenter cases need mmseg


def test_segmenters_train_and_predict_exactly():
    mm('mmseg.models')
    run_ranks(2, run_cases, [('segmentor_exact', ('fpn', (97, 45))),
                             ('segmentor_exact', ('upernet', (97, 45)))])
    run_ranks(3, run_cases, [('segmentor_exact', ('upernet', (161, 50))),
                             ('mesh_refuses', (2, ))])


def test_whole_image_segmentation_over_ranks():
    mm('mmseg.models')
    run_ranks(2, run_cases, [('segment_large_exact', ('fpn', (250, 90)))])
    run_ranks(3, run_cases, [('segment_large_exact', ('upernet', (330, 90)))])


def test_detector_backbone_and_neck_sharded_heads_on_gathered_maps():
    mm('mmdet.models')
    run_ranks(2, run_cases, [('detector_exact', ((97, 130), ))])


def test_wrapper_train_step_equals_single_process_data_by_spatial():
    mm('mmseg.models')
    run_ranks(2, run_cases, [('train_step_exact', (2, (97, 45)))])
    run_ranks(4, run_cases, [('train_step_exact', (2, (97, 45)))])


def test_shipped_tiny_config_trains_the_same_on_two_ranks():
    """The tiny Semantic FPN config as shipped: one step on 2 ranks = one step on 1."""
    mm('mmseg.models')
    run_ranks(2, run_cases, [('train_step_exact', (
        2, (97, 70), 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'))])


def test_bands_and_clear_errors():
    assert image_bands(97, 2) == [(0, 64), (64, 97)]
    assert image_bands(161, 3) == [(0, 64), (64, 128), (128, 161)]
    with pytest.raises(ValueError, match='fewer than the 3 ranks'):
        image_bands(64, 3)


def test_config_switch_needs_a_launcher_and_known_keys():
    mm('mmseg.models')
    from mmengine.config import Config

    from mmlinattn.engine.spatial import configure_spatial_parallel
    cfg = Config(dict(spatial_parallel=dict(size=2), launcher='none'))
    with pytest.raises(ValueError, match='needs a distributed launch'):
        configure_spatial_parallel(cfg)
    cfg = Config(dict(spatial_parallel=dict(size=2, ranks=3), launcher='pytorch'))
    with pytest.raises(ValueError, match="unknown keys \\['ranks'\\]"):
        configure_spatial_parallel(cfg)
    cfg = Config(dict(spatial_parallel=dict(size=2), launcher='pytorch',
                      train_dataloader=dict(sampler=dict(type='DefaultSampler', shuffle=False))))
    assert configure_spatial_parallel(cfg) == 2
    assert cfg.model_wrapper_cfg.type == 'mmlinattn.SpatialParallelWrapper'
    assert cfg.train_dataloader.sampler == dict(type='mmlinattn.SpatialGroupSampler',
                                                shuffle=False)


def test_unsupported_head_is_named():
    mm('mmseg.models')
    from mmlinattn.engine.spatial import sharded_decode
    from mmlinattn.parallel import SpatialGroup

    class ASPPHead(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match='ASPPHead \\(decode head\\) cannot be spatially'):
        sharded_decode(ASPPHead(), [], SpatialGroup(None, 0, 1, (0, )))


@pytest.mark.parametrize('mode,align,in_rows,out_rows', [
    ('bilinear', False, 25, 97), ('bilinear', True, 13, 25), ('bilinear', False, 7, 3),
    ('nearest', None, 13, 25), ('nearest', None, 13, 26), ('nearest', None, 9, 4)])
def test_resize_rows_equal_interpolate(mode, align, in_rows, out_rows):
    """Row-wise resizing from the source rows torch would read equals F.interpolate."""
    from mmlinattn.parallel import resize
    x = torch.randn(2, 3, in_rows, 11)
    want = torch.nn.functional.interpolate(x, size=(out_rows, 17), mode=mode,
                                           align_corners=align)
    bounds = (0, out_rows // 3, out_rows)
    for r in range(2):
        got = resize(x, RowSpans(bounds, r), 17, mode, align)
        torch.testing.assert_close(got, want[:, :, bounds[r]:bounds[r + 1]])
    i0, i1, lam = source_rows(in_rows, out_rows, mode, align)
    assert int(i1.max()) < in_rows and float(lam.max()) <= 1.0
