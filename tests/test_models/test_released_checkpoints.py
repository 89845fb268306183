"""Released-model layout, safe loading of released checkpoints, and conversion."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mmlinattn  # noqa: F401  (registers the timm models)
from mmlinattn.checkpoint import CheckpointMismatchError, UntrustedObject, safe_load
from mmlinattn.models import (
    CLASSIFIERS,
    InLineCSwin,
    InLinePVT,
    InLineSwin,
    InLineViT,
    load_released,
)

REPO = Path(__file__).resolve().parents[2]
# The layout of the released checkpoints (every key and shape); shared/ is the source,
# tests/data holds a copy so that the test runs wherever the repository is cloned.
_LAYOUT = 'inline_official_state_dicts.json'
REFERENCE = next((p for p in (REPO.parent / 'shared' / 'reference' / _LAYOUT,
                              REPO / 'tests' / 'data' / _LAYOUT) if p.is_file()),
                 REPO / 'tests' / 'data' / _LAYOUT)
REF_NAMES = {
    'inline_swin_tiny': 'inline_swin_t', 'inline_swin_small': 'inline_swin_s',
    'inline_swin_base': 'inline_swin_b', 'inline_pvt_tiny': 'inline_pvt_t',
    'inline_pvt_small': 'inline_pvt_s', 'inline_pvt_medium': 'inline_pvt_m',
    'inline_pvt_large': 'inline_pvt_l', 'inline_cswin_tiny': 'inline_cswin_t',
    'inline_cswin_small': 'inline_cswin_s', 'inline_cswin_base': 'inline_cswin_b',
    'inline_deit_tiny': 'inline_deit_t', 'inline_deit_small': 'inline_deit_s',
    'inline_deit_base': 'inline_deit_b'
}
DERIVED = ('relative_position_index', 'attn_mask')


@pytest.fixture(scope='module')
def reference():
    return json.loads(REFERENCE.read_text())


def test_every_registered_model_has_a_reference_layout():
    # The 384 px fine-tuned layouts are the 224 px ones with larger softmax windows
    # (tests/test_checkpoint/test_pretrained_adaptation.py); every other has its reference.
    # (The sibling attentions' layouts: tests/test_models/test_sibling_families.py.)
    inline = {name for name in CLASSIFIERS if name.startswith('inline_')}
    assert inline == set(REF_NAMES) | {'inline_swin_base_384', 'inline_cswin_base_384'}


@pytest.mark.parametrize('name', sorted(REF_NAMES))
def test_timm_models_equal_reference_layout(name, reference):
    ref = reference[REF_NAMES[name]]
    model = timm.create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    learnable = {k: v for k, v in ref['state_dict'].items() if not k.endswith(DERIVED)}
    assert ours == learnable
    assert sum(p.numel() for p in model.parameters()) == ref['params']


class SideEffect:
    """Unpickling this would create a marker file (stands in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}', ))


class ConfigLike:
    """Stands in for the yacs CfgNode the released checkpoints pickle."""

    def __init__(self):
        self.MODEL = {'NAME': 'inline_swin_tiny'}


def _released_file(tmp_path, model, with_buffers=True):
    state = model.state_dict()
    if with_buffers:  # the reference saves its derived buffers
        state = dict(state, **{'layers.3.blocks.0.attn.relative_position_index':
                               torch.zeros(49, 49, dtype=torch.long)})
    marker = tmp_path / 'pwned'
    ckpt = {'model': state, 'optimizer': {'state': {}}, 'epoch': 299, 'config': ConfigLike(),
            'payload': SideEffect(marker)}
    path = tmp_path / 'released.pth'
    torch.save(ckpt, path)
    return path, marker


def test_safe_load_keeps_tensors_and_runs_nothing(tmp_path):
    model = timm.create_model('inline_swin_tiny')
    path, marker = _released_file(tmp_path, model)
    with pytest.raises(pickle.UnpicklingError):  # torch's own default refuses the file
        torch.load(path)
    assert not marker.exists()
    ckpt = safe_load(path)
    assert not marker.exists(), 'a pickled callable was executed'
    assert isinstance(ckpt['payload'], UntrustedObject)
    assert 'os.system' in ckpt['payload'].qualname or 'posix.system' in ckpt['payload'].qualname
    assert isinstance(ckpt['config'], UntrustedObject)
    assert ckpt['epoch'] == 299
    torch.testing.assert_close(ckpt['model']['head.weight'], model.head.weight)


def test_released_checkpoint_loads_and_computes_the_same(tmp_path):
    src = timm.create_model('inline_swin_tiny').eval()
    path, _ = _released_file(tmp_path, src)
    dst = load_released(timm.create_model('inline_swin_tiny'), str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    src = timm.create_model('inline_swin_tiny')
    path, _ = _released_file(tmp_path, src)
    match = r'patch_embed\.proj\.weight.*\(96, 3, 4, 4\)'
    with pytest.raises(CheckpointMismatchError, match=match):
        load_released(timm.create_model('inline_swin_base'), str(path))
    with pytest.raises(CheckpointMismatchError, match='missing'):
        load_released(timm.create_model('inline_pvt_tiny'), str(path))


def test_backbone_pretrained_init_from_released_file(tmp_path):
    src = timm.create_model('inline_swin_tiny').eval()
    path, _ = _released_file(tmp_path, src)
    backbone = InLineSwin('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm3.weight, src.norm.weight)
    torch.testing.assert_close(backbone.layers[1].blocks[0].attn.residual[2].weight,
                               src.layers[1].blocks[0].attn.residual[2].weight)
    # The last stage output of the backbone equals the classifier's features.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x)[3].permute(0, 2, 3, 1),
                                   src.forward_features(x))
    # mmseg passes pretrained=...; accepted as the same thing.
    with pytest.warns(DeprecationWarning):
        alias = InLinePVT('tiny', pretrained=str(path))
    assert alias.init_cfg == dict(type='Pretrained', checkpoint=str(path))


def test_missing_pretrained_file_says_how_to_get_it():
    model = InLinePVT('tiny', init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nope.pth'))
    with pytest.raises(FileNotFoundError, match='convert_checkpoint.py'):
        model.init_weights()


def test_convert_checkpoint_tool(tmp_path):
    src = timm.create_model('inline_pvt_tiny')
    path, marker = _released_file(tmp_path, src, with_buffers=False)
    out = tmp_path / 'converted.pth'
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'),
                           str(path), str(out)], capture_output=True, text=True, check=True)
    assert 'head.weight' in proc.stdout  # it says what it dropped
    assert not marker.exists()
    state = torch.load(out, weights_only=True)  # a plain tensor dict
    assert 'head.weight' not in state and 'block1.0.attn.q.weight' in state
    backbone = InLinePVT('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(out)))
    backbone.init_weights()
    torch.testing.assert_close(backbone.pos_embed2, src.pos_embed2)
    kept = tmp_path / 'kept.pth'
    subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'), str(path),
                    str(kept), '--keep-head'], capture_output=True, text=True, check=True)
    assert 'head.weight' in torch.load(kept, weights_only=True)


def test_plain_pickle_of_untrusted_object_is_refused_by_torch_default(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'x': SideEffect(tmp_path / 'marker')}, f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not (tmp_path / 'marker').exists()


@pytest.mark.parametrize('name,cls,norm', [('inline_cswin_tiny', InLineCSwin, 'norm3'),
                                           ('inline_deit_tiny', InLineViT, 'norm11')])
def test_released_cswin_and_deit_load_into_backbones(tmp_path, name, cls, norm):
    src = timm.create_model(name).eval()
    path, _ = _released_file(tmp_path, src, with_buffers=False)
    out = tmp_path / 'converted.pth'
    subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'), str(path),
                    str(out)], capture_output=True, text=True, check=True)
    backbone = cls('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(out)))
    backbone.init_weights()
    torch.testing.assert_close(getattr(backbone, norm).weight, src.norm.weight)
    size = src.pretrained_cfg['input_size'][-1]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        if cls is InLineCSwin:
            torch.testing.assert_close(backbone.eval()(x)[3].permute(0, 2, 3, 1),
                                       src.forward_features(x))
        else:
            backbone.pyramid = None
            last = backbone.eval()(x)[3]  # normed patch map of the last block
            torch.testing.assert_close(last.flatten(2).transpose(1, 2),
                                       src.forward_features(x)[:, 1:])


def test_timm_entry_points_refuse_features_only_and_accept_custom_depths():
    with pytest.raises(ValueError, match=r'features_only.*InLineSwin\(arch'):
        timm.create_model('inline_swin_tiny', features_only=True)
    # Three stages: the head reads the last one, whatever the depth.
    model = timm.create_model('inline_swin_tiny', depths=(1, 1, 1), num_heads=(1, 2, 4),
                              attn_types='IIS', embed_dims=16)
    assert model.out_indices == (2, )
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    vit = timm.create_model('inline_deit_tiny', arch=dict(embed_dims=32, depth=3, num_heads=2,
                                                          pretrain_img_size=64))
    assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
