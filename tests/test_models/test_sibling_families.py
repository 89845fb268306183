"""Agent-Swin/PVT, FLatten-Swin/PVT and MLLA: the authors' released layouts and modules.

The truth is recorded from the authors' own code by ``tools/reference_parity.py``
(which also compares whole released models with ours, logits within 1e-6): every key
and shape of each released classifier (``sibling_state_dicts.json``) and tiny attention
modules of theirs with their weights, an input and their output
(``sibling_reference_outputs.json``).
"""
import json
from pathlib import Path

import pytest
import timm
import torch

from mmlinattn.checkpoint import DERIVED_BUFFER_SUFFIXES
from mmlinattn.models import FAMILIES, detect_family
from mmlinattn.models.backbones import (
    MLLA,
    AgentPVT,
    AgentSwin,
    AgentSwinClassifier,
    FLattenPVT,
    FLattenSwin,
)
from mmlinattn.models.layers import AgentAttention, FocusedLinearAttention, MLLABlock

DATA = Path(__file__).resolve().parents[1] / 'data'
DERIVED = DERIVED_BUFFER_SUFFIXES
SIBLINGS = ('agent_swin', 'flatten_swin', 'agent_pvt', 'flatten_pvt', 'mlla')


@pytest.fixture(scope='module')
def layouts():
    return json.loads((DATA / 'sibling_state_dicts.json').read_text())


@pytest.fixture(scope='module')
def modules():
    return json.loads((DATA / 'sibling_reference_outputs.json').read_text())


def _tensor(entry):
    return torch.tensor(entry['values'], dtype=torch.float32).reshape(entry['shape'])


def test_every_released_sibling_model_has_its_recorded_layout(layouts):
    stems = {m.file: m.name for f in SIBLINGS for m in FAMILIES[f].released}
    assert set(stems) == set(layouts)


@pytest.mark.parametrize('family,name,stem', [(f, m.name, m.file) for f in SIBLINGS
                                               for m in FAMILIES[f].released])
def test_released_layout_key_for_key(family, name, stem, layouts):
    spec = FAMILIES[family]
    ref = layouts[stem]
    model = timm.create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in ref['state_dict'].items() if not k.endswith(DERIVED)}
    assert sum(p.numel() for p in model.parameters()) == ref['params']
    assert detect_family(list(ref['state_dict'])) is spec


def test_agent_attention_equals_the_authors_downstream_module(modules):
    """Their detection backbone's module at a 5 x 7 map, biases learned on 4 x 4 and
    4 agents resized to a 3 x 3 grid."""
    ref = modules['agent_downstream']
    cfg = ref['config']
    attn = AgentAttention(cfg['dim'], cfg['num_heads'], cfg['agent_num'],
                          tuple(cfg['bias_size']), tuple(cfg['agent_shape'])).eval()
    attn.load_state_dict({k: _tensor(v) for k, v in ref['state_dict'].items()})
    x = _tensor(ref['input'])
    with torch.no_grad():
        out = attn(x.view(x.shape[0], *cfg['hw'], -1)).flatten(1, 2)
    torch.testing.assert_close(out, _tensor(ref['output']), rtol=1e-5, atol=1e-6)


def test_focused_attention_equals_the_authors_module(modules):
    ref = modules['focused']
    cfg = ref['config']
    attn = FocusedLinearAttention(cfg['dim'], cfg['num_heads'], tuple(cfg['grid'])).eval()
    attn.load_state_dict({k: _tensor(v) for k, v in ref['state_dict'].items()})
    x = _tensor(ref['input'])
    with torch.no_grad():
        out = attn(x.view(x.shape[0], *cfg['hw'], -1)).flatten(1, 2)
    torch.testing.assert_close(out, _tensor(ref['output']), rtol=1e-5, atol=1e-6)


def test_mlla_block_equals_the_authors_downstream_block(modules):
    """Their detection backbone's block at a 3 x 5 map (its RoPE buffer was built for
    4 x 4; the downstream code computes RoPE at run time, as we do)."""
    ref = modules['mlla_block']
    cfg = ref['config']
    block = MLLABlock(cfg['dim'], cfg['num_heads']).eval()
    state = {k: _tensor(v) for k, v in ref['state_dict'].items()}
    state = {k: v for k, v in state.items() if not k.endswith(DERIVED)}
    block.load_state_dict(state)
    x = _tensor(ref['input'])
    with torch.no_grad():
        out = block(x.view(x.shape[0], *cfg['hw'], -1)).flatten(1, 2)
    torch.testing.assert_close(out, _tensor(ref['output']), rtol=1e-5, atol=1e-6)


SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


@pytest.mark.parametrize('cls,arch', [
    (AgentSwin, dict(SMALL, attn_types='AAMB1', agent_num=(4, 4, 9, 9))),
    (FLattenSwin, dict(SMALL, attn_types='LLSS')),
    (MLLA, dict(SMALL, num_heads=(2, 2, 4, 8))),
    (AgentPVT, dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2),
                    agent_num=(4, 4, 9, 9))),
    (FLattenPVT, dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2))),
])
def test_any_input_size(cls, arch):
    """A non-square size that is no multiple of the strides (the release fixes its
    maps to the training size)."""
    kwargs = dict(agent_shapes=[(3, 3), (3, 4), (3, 3), None]) if cls in (AgentSwin, AgentPVT) \
        else {}
    if cls is not MLLA:
        kwargs['pretrain_img_size'] = 64
    model = cls(arch, **kwargs).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 75, 101))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 19, 26), (1, 32, 10, 13), (1, 64, 5, 7),
                                              (1, 128, 3, 4)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_released_file_loads_through_init_cfg(tmp_path):
    """A released-layout checkpoint (head and a derived buffer included) through
    ``init_cfg=dict(type='Pretrained')``, read by the safe reader."""
    arch = dict(SMALL, attn_types='AAMB1', agent_num=(4, 4, 9, 9))
    src = AgentSwinClassifier(arch, pretrain_img_size=64).eval()
    state = dict(src.state_dict(), **{'layers.3.blocks.1.attn.relative_position_index':
                                      torch.zeros(49, 49, dtype=torch.long)})
    path = tmp_path / 'agent_swin_released.pth'
    torch.save({'model': state, 'epoch': 299}, path)
    backbone = AgentSwin(arch, pretrain_img_size=64,
                         init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x)[3].permute(0, 2, 3, 1),
                                   src.forward_features(x))


def test_converter_tells_the_swin_families_apart(tmp_path):
    """A released FLatten-Swin-T file through tools/convert_checkpoint.py: the family
    is found by its keys among the three on the Swin base, and the backbone loads it."""
    import subprocess
    import sys

    from mmlinattn.models.backbones import FLattenSwinClassifier

    src = FLattenSwinClassifier('tiny').eval()
    path, out = tmp_path / 'flatten_swin_t.pth', tmp_path / 'converted.pth'
    torch.save({'model': src.state_dict()}, path)
    proc = subprocess.run([sys.executable, str(DATA.parents[1] / 'tools' / 'convert_checkpoint.py'),
                           str(path), str(out)], capture_output=True, text=True, check=True)
    assert 'flatten_swin' in proc.stdout + proc.stderr
    backbone = FLattenSwin('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(out)))
    backbone.init_weights()
    torch.testing.assert_close(backbone.norm3.weight, src.norm.weight)
    torch.testing.assert_close(backbone.layers[0].blocks[1].attn.positional_encoding,
                               src.layers[0].blocks[1].attn.positional_encoding)
