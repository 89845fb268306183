"""mmlinattn, its backbones and operators import with torch, timm and mmengine only."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ModuleNotFoundError(f'blocked for this test: {name}')
            return None

    BLOCKED = sys.argv[1].split(',')
    sys.meta_path.insert(0, Block())
    import torch, timm
    import mmlinattn
    from mmlinattn.models import InLineSwin, InLinePVT
    from mmlinattn.ops import inline_attention
    from mmlinattn.registry import MODELS
    assert mmlinattn.models.REGISTERED_SCOPES == [], mmlinattn.models.REGISTERED_SCOPES
    assert not any(m.split('.')[0] in ('mmcv', ) for m in sys.modules)
    model = MODELS.build(dict(type='InLinePVT', arch='tiny'))
    outs = model(torch.randn(1, 3, 64, 64))
    assert len(outs) == 4
    assert timm.create_model('inline_swin_tiny') is not None
    print('ok')
''')


@pytest.mark.parametrize('blocked', ['mmcv,mmdet,mmseg', 'mmcv'])
def test_import_without_mmcv_mmdet_mmseg(blocked):
    # 'mmcv' alone: mmdet/mmseg installed but unusable, as where mmcv is not compiled.
    proc = subprocess.run([sys.executable, '-c', SCRIPT, blocked], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith('ok')
