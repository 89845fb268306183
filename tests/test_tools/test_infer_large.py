"""Whole-image prediction of large images: tiles with a halo equal the whole-image model.

Small images and tiny tiles (64 px, so tiles and halos cut the feature pyramid
everywhere); the reference is mmseg's / mmdet's own unchunked inference of the
same padded image. A halo smaller than the head's receptive field must show a
difference (the comparison can fail).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet.models', reason='mmdet with a compiled mmcv is needed')
pytest.importorskip('mmseg.models', reason='mmseg is needed')

from seeded import seeded_model  # noqa: E402

from mmlinattn.engine.large_image import (  # noqa: E402
    detect_large,
    prepare_image,
    regionwise_neck,
    segment_large,
    segment_whole,
)

REPO = Path(__file__).resolve().parents[2]
SEG_CFG = REPO / 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'
DET_CFG = REPO / 'configs/tiny/mask-rcnn_inline-pvt-t_fpn_300i_tiny-coco.py'
UPER_CFG = (REPO / 'configs/segmentation/inline_swin'
            / 'upernet_inline-swin-t_8xb2-160k_ade20k-512x512.py')


def _image(h: int = 202, w: int = 330) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def fpn_segmenter():
    return seeded_model(SEG_CFG)


def test_semantic_fpn_tiles_equal_whole_image(fpn_segmenter) -> None:
    image = _image()
    labels_ref, logits_ref = segment_whole(fpn_segmenter, image)
    labels, info = segment_large(fpn_segmenter, image, chunk_tokens=50, tile=64, halo=128,
                                 keep_logits=True)
    torch.testing.assert_close(info['logits'], logits_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(labels.long(), labels_ref)
    # Too little context: the head's receptive field reaches past the tile's crop.
    _, short = segment_large(fpn_segmenter, image, chunk_tokens=50, tile=64, halo=0,
                             keep_logits=True)
    assert (short['logits'] - logits_ref).abs().max() > 1e-2


def test_upernet_tiles_equal_whole_image() -> None:
    # UperNet: pyramid pooling is global (computed once), the rest per tile.
    model = seeded_model(UPER_CFG, dict(model=dict(backbone=dict(depths=(1, 1, 1, 1)))))
    image = _image(150, 200)
    _, logits_ref = segment_whole(model, image)
    _, info = segment_large(model, image, chunk_tokens=64, tile=64, halo=64, keep_logits=True)
    torch.testing.assert_close(info['logits'], logits_ref, rtol=1e-4, atol=1e-4)


def test_tiling_arguments_are_checked(fpn_segmenter) -> None:
    with pytest.raises(ValueError, match='multiple of 64'):
        segment_large(fpn_segmenter, _image(64, 64), tile=100)


def test_detector_neck_by_tiles_and_predictions_equal_whole() -> None:
    model = seeded_model(DET_CFG, dict(model=dict(test_cfg=dict(
        rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(score_thr=0.0, max_per_img=20)))))
    image = _image(190, 260)
    x, samples, _ = prepare_image(model, image, 'mmdet')
    with torch.no_grad():
        feats = model.backbone(x)
        whole = model.neck(feats)
        tiled = regionwise_neck(model.neck, feats, tile=16, halo=16)
        assert len(tiled) == len(whole) == 5
        for a, b in zip(tiled, whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        expected = model.predict(x, samples, rescale=True)[0].pred_instances
    got, info = detect_large(model, image, chunk_tokens=40, tile=64, halo=64, masks=True)
    got = got.pred_instances
    assert len(got) == len(expected) > 0
    torch.testing.assert_close(got.bboxes, expected.bboxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-5)
    assert got.masks.shape[-2:] == (190, 260)  # pasted at the image's own size
    assert float(got.bboxes[:, 2].max()) <= 260 and float(got.bboxes[:, 3].max()) <= 190


def test_infer_large_tool_end_to_end(tmp_path) -> None:
    out = tmp_path / 'mask.png'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/infer_large.py'), str(SEG_CFG), 'none',
         '--synthetic', '150', '230', '--tile', '64', '--halo', '128', '--chunk-tokens', '40',
         '--out', str(out), '--compare', 'whole', 'slide', '--slide-crop', '128',
         '--slide-stride', '96'], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import mmcv
    mask = mmcv.imread(str(out), flag='unchanged')
    assert mask.shape == (150, 230)
    assert "mmseg 'whole' (unchunked)" in proc.stdout
    whole = proc.stdout.split("mmseg 'whole'")[1].split('\n')[1]
    differing = re.search(r'differing from the whole-image prediction: ([0-9.]+)% of pixels',
                          whole)
    assert differing, whole
    # The logits agree to 1e-4 (the tests above); with random weights an arg-max tie can
    # still flip a pixel or two (0.003% each), while a wrong halo or tile flips regions.
    assert float(differing.group(1)) < 0.01, whole
    assert "mmseg 'slide'" in proc.stdout and 'peak' in proc.stdout


def test_infer_large_tool_refuses_bad_input(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/infer_large.py'), str(SEG_CFG), 'none',
         str(tmp_path / 'missing.png')], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and 'image not found' in proc.stderr


def test_tool_under_torchrun_splits_rows_and_writes_the_same_mask(tmp_path):
    """tools/dist_infer_large.sh: two gloo processes, each a band of rows; the mask rank 0
    writes equals the one-process tool's (the same random weights, saved to a file)."""
    import os
    import socket

    import cv2
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    weights = tmp_path / 'random.pth'
    torch.save(seeded_model(SEG_CFG).state_dict(), weights)
    common = ['--synthetic', '300', '200', '--tile', '128', '--halo', '128']
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(port), PYTHON=sys.executable,
               MMLINATTN_COLLECTIVE_TIMEOUT_S='120')
    two = subprocess.run(['bash', str(REPO / 'tools/dist_infer_large.sh'), str(SEG_CFG),
                          str(weights), '', '2', *common, '--out', str(tmp_path / 'two.png')],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'rank 1 of 2 (rows split)' in two.stdout
    one = subprocess.run([sys.executable, str(REPO / 'tools/infer_large.py'), str(SEG_CFG),
                          str(weights), *common, '--out', str(tmp_path / 'one.png')],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = cv2.imread(str(tmp_path / 'one.png'), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(tmp_path / 'two.png'), cv2.IMREAD_UNCHANGED)
    assert a.shape == b.shape == (300, 200) and (a != b).mean() < 1e-3
