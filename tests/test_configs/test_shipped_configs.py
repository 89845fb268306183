"""Every shipped config loads, builds, trains one step and predicts on an odd-sized image."""
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet.models', reason='mmdet with a compiled mmcv is needed')
pytest.importorskip('mmseg.models', reason='mmseg is needed')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import mmlinattn  # noqa: E402,F401
from mmlinattn.engine import check_feature_channels  # noqa: E402
from mmlinattn.models import FAMILIES  # noqa: E402

BACKBONE_NAMES = {name for spec in FAMILIES.values()
                  for name in (spec.backbone.__name__, ) + spec.aliases}

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / 'configs').rglob('*.py'))
DET = [c for c in CONFIGS if '/detection/' in c or 'coco' in Path(c).name]
SEG = [c for c in CONFIGS if c not in DET]


def test_every_config_is_covered():
    assert len(CONFIGS) >= 25
    assert set(DET) | set(SEG) == set(CONFIGS)


def _load(path):
    cfg = Config.fromfile(str(REPO / path))
    assert cfg.custom_imports == dict(imports=['mmlinattn'], allow_failed_imports=False)
    assert cfg.model.backbone.type in BACKBONE_NAMES
    if cfg.model.backbone.get('init_cfg'):
        assert cfg.model.backbone.init_cfg.checkpoint.startswith('checkpoints/')
        cfg.model.backbone.init_cfg = None  # no pretrained loading in tests
    return cfg


def _build(cfg, registry):
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = registry.build(cfg.model)
    check_feature_channels(model)
    return model


def _assert_backbone_gets_gradients(model):
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])
    assert any(g.abs().sum() > 0 for g in grads[:5])


@pytest.mark.parametrize('path', DET)
def test_detection_config_trains_and_predicts(path):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs

    cfg = _load(path)
    assert cfg.default_scope == 'mmdet'
    model = _build(cfg, MODELS)
    model.train()
    with_mask = cfg.model.get('roi_head', {}).get('mask_head') is not None
    torch.manual_seed(0)
    packed = demo_mm_inputs(batch_size=1, image_shapes=[(3, 97, 131)], num_items=[3],
                            num_classes=80, with_mask=with_mask)
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    _assert_backbone_gets_gradients(model)
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(packed, False), mode='predict')
    assert len(preds) == 1 and hasattr(preds[0], 'pred_instances')
    if with_mask:
        assert 'masks' in preds[0].pred_instances


def _seg_inputs(h, w, num_classes, batch=2):
    """A batch of 2: UperNet's pyramid pooling has BatchNorm over 1x1 maps."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(batch):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w)))
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
                        for _ in range(batch)], data_samples=samples)


@pytest.mark.parametrize('path', SEG)
def test_segmentation_config_trains_and_predicts(path):
    from mmseg.registry import MODELS

    cfg = _load(path)
    assert cfg.default_scope == 'mmseg'
    assert cfg.model.get('pretrained') is None
    # Smallest training crop the test affords; the config's own is 512 wide.
    cfg.model.data_preprocessor.size = (96, 128)
    model = _build(cfg, MODELS)
    model.train()
    torch.manual_seed(0)
    num_classes = cfg.model.decode_head.num_classes
    data = model.data_preprocessor(_seg_inputs(97, 131, num_classes), True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    _assert_backbone_gets_gradients(model)
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(_seg_inputs(97, 131, num_classes, batch=1),
                                                False), mode='predict')
    assert preds[0].pred_sem_seg.data.shape[-2:] == (97, 131)


def test_wrong_neck_channels_are_named():
    from mmdet.registry import MODELS

    cfg = _load('configs/detection/inline_swin/mask-rcnn_inline-swin-t_fpn_1x_coco.py')
    cfg.model.neck.in_channels = [64, 128, 320, 512]
    with pytest.raises(ValueError, match=r'neck.in_channels=\[64, 128, 320, 512\].*'
                       r'\[96, 192, 384, 768\]'):
        _build(cfg, MODELS)


def test_missing_checkpoint_says_how_to_convert():
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(REPO / 'configs/detection/inline_pvt/'
                              'mask-rcnn_inline-pvt-t_fpn_1x_coco.py'))
    cfg.model.backbone.init_cfg.checkpoint = 'checkpoints/does_not_exist.pth'
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    with pytest.raises(FileNotFoundError, match='tools/convert_checkpoint.py'):
        model.init_weights()
