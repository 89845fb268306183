"""Semantic FPN on tiles with a halo per level (``mmlinattn.engine.fpn_levels``).

The reference is mmseg's own FPN neck and FPNHead on the whole pyramid of a padded
image, whose finest map has room for tiles away from every edge (so that a level
computed on too little context shows: the comparison can fail).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmseg.models', reason='mmseg is needed')

from seeded import seeded_model  # noqa: E402

from mmlinattn.engine.fpn_levels import SemanticFPNLevels, semantic_fpn_levels  # noqa: E402
from mmlinattn.engine.large_image import (  # noqa: E402
    _box,
    feature_tiles,
    prepare_image,
    segment_large,
    segment_whole,
)

REPO = Path(__file__).resolve().parents[2]
SEG_CFG = REPO / 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'
UPER_CFG = (REPO / 'configs/segmentation/inline_swin'
            / 'upernet_inline-swin-t_8xb2-160k_ade20k-512x512.py')
TILE, HALO = 16, 40  # finest (stride-4) pixels: 64 and 160 image pixels
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def segmenter():
    return seeded_model(SEG_CFG)


@pytest.fixture(scope='module')
def pyramid(segmenter):
    """The backbone's maps of a 448 x 384 image and mmseg's logits on their whole."""
    image = torch.randint(0, 256, (3, 448, 384), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    x, _, _ = prepare_image(segmenter, image, 'mmseg')
    with torch.no_grad():
        feats = segmenter.backbone(x)
        whole = segmenter.decode_head.forward(list(segmenter.neck(feats)))
    return feats, whole


def _by_tiles(levels: SemanticFPNLevels, feats, whole) -> float:
    """Largest difference from ``whole`` of the logits ``levels`` gives on every tile,
    after checking each covers its tile and one pixel around (within the map)."""
    h, w = feats[0].shape[2:]
    worst = 0.0
    for t in feature_tiles(h, w, TILE, HALO):
        crops = [_box(f, t.cy0, t.cy1, t.cx0, t.cx1, h / f.shape[2]) for f in feats]
        with torch.no_grad():
            got, logits = levels(crops, t)
        assert (got.y0, got.y1, got.x0, got.x1) == (t.y0, t.y1, t.x0, t.x1)
        assert (got.cy0, got.cy1, got.cx0, got.cx1) == (
            max(0, t.y0 - 1), min(h, t.y1 + 1), max(0, t.x0 - 1), min(w, t.x1 + 1))
        ref = whole[:, :, got.cy0:got.cy1, got.cx0:got.cx1]
        assert logits.shape == ref.shape
        worst = max(worst, float((logits - ref).abs().max()))
    return worst


def test_each_level_reads_its_branchs_receptive_field(segmenter) -> None:
    levels = semantic_fpn_levels(segmenter)
    assert levels is not None
    # Level k: its FPN 3x3 convolution reads one pixel of 2**k finest pixels; level 0's
    # head one more 3x3 convolution; a coarser head at each stride on the way down to
    # the finest a 3x3 convolution and a 2x bilinear upsampling, one input pixel each.
    expected = (1 + 1, *(2 ** k + 2 * sum(2 ** j for j in range(1, k + 1)) for k in (1, 2, 3)))
    assert levels.reaches == expected == (2, 6, 16, 36)


def test_tiles_by_levels_equal_the_whole_pyramid(segmenter, pyramid) -> None:
    feats, whole = pyramid
    assert feats[0].shape[2:] == (112, 96)  # tiles away from every edge exist
    assert _by_tiles(semantic_fpn_levels(segmenter), feats, whole) < TOL['atol']


@pytest.mark.parametrize('level', range(4))
def test_a_level_two_of_its_pixels_short_differs(segmenter, pyramid, level) -> None:
    # The reaches are bounds (an upsampled pixel reads one input pixel past it on one
    # side only, and regions are rounded out to whole pixels of their level), but not
    # loose ones: two pixels of the level less and the logits differ.
    feats, whole = pyramid
    levels = semantic_fpn_levels(segmenter)
    branches = list(levels.branches)
    less, steps = 2 * 2 ** level, []
    for step in branches[level]:  # taken from the first steps on
        cut = min(less, step.reach)
        steps.append(dataclasses.replace(step, reach=step.reach - cut))
        less -= cut
    branches[level] = steps
    short = SemanticFPNLevels(levels.neck, levels.head, branches)
    assert _by_tiles(short, feats, whole) > 100 * TOL['atol']


def test_segment_large_uses_the_levels_and_equals_whole(segmenter, monkeypatch) -> None:
    calls = []
    call = SemanticFPNLevels.__call__
    monkeypatch.setattr(SemanticFPNLevels, '__call__',
                        lambda self, crops, t: calls.append(t) or call(self, crops, t))
    image = torch.randint(0, 256, (3, 200, 330), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(2))
    labels_ref, logits_ref = segment_whole(segmenter, image)
    labels, info = segment_large(segmenter, image, chunk_tokens=50, tile=64, halo=192,
                                 keep_logits=True)
    assert len(calls) == 4 * 6  # every tile: 256 x 384 padded, 64-pixel tiles
    torch.testing.assert_close(info['logits'], logits_ref, **TOL)
    assert torch.equal(labels.long(), labels_ref)


def test_other_heads_and_options_run_on_the_whole_crop(segmenter) -> None:
    uper = seeded_model(UPER_CFG, dict(model=dict(backbone=dict(depths=(1, 1, 1, 1)))))
    assert semantic_fpn_levels(uper) is None
    segmenter.decode_head.align_corners = True  # crops would not be translation-invariant
    try:
        assert semantic_fpn_levels(segmenter) is None
    finally:
        segmenter.decode_head.align_corners = False


def test_bf16_logits_are_upsampled_in_float32() -> None:
    # The tiles' labels: bilinear x4 of the logits in float32 whatever the head's dtype
    # (bf16 scores rounded after the interpolation tie and flip labels).
    import torch.nn.functional as F

    from mmlinattn.engine.large_image import Tile, _write_labels
    from mmlinattn.ops import class_argmax

    logits = torch.randn(1, 20, 18, 18, generator=torch.Generator().manual_seed(3))
    logits = logits.to(torch.bfloat16)
    labels = torch.empty(64, 64, dtype=torch.int32)
    _write_labels(labels, Tile(0, 16, 0, 16, 0, 18, 0, 18), logits, 4, False)

    def upsampled(x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=(72, 72), mode='bilinear', align_corners=False)
        return class_argmax(up[0])[:64, :64]

    assert torch.equal(labels.long(), upsampled(logits.float()))
    assert not torch.equal(labels.long(), upsampled(logits))  # bf16 would differ here
