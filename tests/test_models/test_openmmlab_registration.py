"""Building the backbones from mmdet and mmseg config dicts, in either default scope."""
import pytest
import torch

mmdet = pytest.importorskip('mmdet.registry', reason='mmdet (and a compiled mmcv) not installed')
mmseg = pytest.importorskip('mmseg.registry', reason='mmseg not installed')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope, init_default_scope  # noqa: E402

import mmlinattn  # noqa: E402,F401  (registers the backbones)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('cfg', [
    dict(type='InLineSwin', arch='tiny', out_indices=(1, 2, 3), frozen_stages=1),
    dict(type='InLinePVT', arch='small', with_cp=True, pretrained=None),
])
def test_build_from_config_dict(scope, cfg):
    registry = {'mmdet': mmdet.MODELS, 'mmseg': mmseg.MODELS}[scope]
    init_default_scope(scope)
    backbone = registry.build(dict(cfg))
    outs = backbone(torch.randn(1, 3, 96, 64))
    assert len(outs) == len(cfg.get('out_indices', (0, 1, 2, 3)))


def test_custom_imports_config_builds_in_both_libraries(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)\n"
                    "backbone = dict(type='InLineSwin', arch='tiny', inline_window=14)\n")
    cfg = Config.fromfile(str(path))
    for scope, registry in (('mmdet', mmdet.MODELS), ('mmseg', mmseg.MODELS)):
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(cfg.backbone)
        assert type(model).__name__ == 'InLineSwin'
    # The scoped name works from any registry.
    assert type(mmdet.MODELS.build(dict(type='mmlinattn.InLinePVT'))).__name__ == 'InLinePVT'


def test_unknown_backbone_argument_is_named():
    with pytest.raises(TypeError, match='window'):
        mmdet.MODELS.build(dict(type='InLineSwin', window=7))
