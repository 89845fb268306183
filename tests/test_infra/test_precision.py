"""``--dtype fp32 | bf16 | auto``: what each resolves to, the refusal where bf16 is
emulated, mmcv's float32-only CPU operators under bf16 autocast, and the labels of a
segmenter run by regions in bf16 against fp32."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmlinattn.utils import precision
from mmlinattn.utils.precision import autocast_for, resolve_dtype

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test_tools'))


@pytest.mark.parametrize('native', [True, False])
def test_dtype_names_resolve_by_what_the_cpu_computes(monkeypatch, native) -> None:
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: native)
    assert resolve_dtype('fp32') == 'fp32'
    assert resolve_dtype('auto') == ('bf16' if native else 'fp32')
    if native:
        assert resolve_dtype('bf16') == 'bf16'
    else:
        with pytest.raises(ValueError, match='--dtype bf16 refused on this CPU.*emulated.*'
                                             '--force-bf16'):
            resolve_dtype('bf16')
        assert resolve_dtype('bf16', force=True) == 'bf16'
    with pytest.raises(ValueError, match='--dtype must be one of'):
        resolve_dtype('fp8')


def test_autocast_for_runs_matrix_products_in_bf16_and_nothing_in_fp32() -> None:
    a = torch.randn(8, 8)
    with autocast_for('bf16'):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for('fp32'):
        assert (a @ a).dtype == torch.float32


def test_mmcv_nms_and_roi_align_run_under_bf16_autocast() -> None:
    """mmcv's CPU kernels take float32 only: under autocast they failed on bf16 inputs
    ("expected scalar type Float"); with float32_mmcv_ops they compute in float32 on the
    same (bf16-rounded) values, pooled features back in the features' dtype."""
    import importlib

    from mmlinattn.ops.mmcv_autocast import float32_mmcv_ops
    # The modules (``mmcv.ops.nms`` as an attribute is the function of that name).
    nms_module = importlib.import_module('mmcv.ops.nms')
    roi_module = importlib.import_module('mmcv.ops.roi_align')
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=g) * 20], 1).bfloat16()
    scores = torch.rand(40, generator=g).bfloat16()
    feats = torch.randn(1, 4, 16, 16, generator=g).bfloat16()
    rois = torch.tensor([[0, 1.5, 2.0, 9.0, 12.5], [0, 0.0, 0.0, 15.0, 15.0]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        float32_mmcv_ops()
        with pytest.raises(RuntimeError, match='Float'):  # mmcv's own function, as it is
            nms_module.nms.__wrapped__(boxes, scores, 0.5)
        dets, keep = nms_module.nms(boxes, scores, 0.5)
        pooled = roi_module.RoIAlign((4, 4), 1.0, 2)(feats, rois)
    ref_dets, ref_keep = nms_module.nms(boxes.float(), scores.float(), 0.5)
    assert torch.equal(keep, ref_keep) and dets.dtype == torch.float32
    assert torch.equal(dets, ref_dets)
    ref = roi_module.RoIAlign((4, 4), 1.0, 2)(feats.float(), rois)
    assert pooled.dtype == torch.bfloat16 and torch.equal(pooled, ref.bfloat16())


def test_a_segmenter_by_regions_in_bf16_agrees_with_fp32() -> None:
    from seeded import seeded_model
    from test_infer_large import SEG_CFG, _image

    from mmlinattn.engine.large_image import segment_large
    model = seeded_model(SEG_CFG)
    image = _image(160, 224)
    labels, info = segment_large(model, image, chunk_tokens=64, tile=64, halo=128,
                                 keep_logits=True)
    with autocast_for('bf16'):
        labels16, info16 = segment_large(model, image, chunk_tokens=64, tile=64, halo=128,
                                         keep_logits=True)
    assert info16['logits'].dtype != torch.float64
    err = (info16['logits'].float() - info['logits']).abs().max()
    spread = info['logits'].std()
    agree = (labels16 == labels).float().mean()
    # Random weights on a random image: the closest call among the classes is close;
    # 2.4% of the pixels flipped at 512 x 768 with the full-size model.
    assert err < 0.1 * spread and agree >= 0.95, (float(err), float(spread), float(agree))
    assert err > 0  # it did compute in bf16
