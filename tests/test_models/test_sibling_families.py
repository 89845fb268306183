"""Agent-Swin/PVT/CSwin/DeiT, FLatten-Swin/PVT/PVTv2/CSwin and MLLA: the authors' released
layouts and modules.

The truth is recorded from the authors' own code by ``tests/reference_parity.py``
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
    AgentCSwin,
    AgentDeiT,
    AgentPVT,
    AgentSwin,
    AgentSwinClassifier,
    FLattenCSwin,
    FLattenPVT,
    FLattenPVTv2,
    FLattenSwin,
)
from mmlinattn.models.backbones.agent_cswin import AgentCSwinBranch
from mmlinattn.models.backbones.flatten_cswin import FocusedCSwinBranch
from mmlinattn.models.layers import AgentAttention, FocusedLinearAttention, MLLABlock

DATA = Path(__file__).resolve().parents[1] / 'data'
DERIVED = DERIVED_BUFFER_SUFFIXES
SIBLINGS = ('agent_swin', 'flatten_swin', 'agent_pvt', 'flatten_pvt', 'mlla', 'agent_cswin',
            'flatten_cswin', 'agent_deit', 'flatten_pvt_v2')


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


def test_agent_deit_attention_with_a_class_token_equals_the_authors(modules):
    """Their DeiT agent attention: the class token is a key of every agent and a query
    of the agents, with its own biases; 4 agents over a 3 x 3 patch map."""
    ref = modules['agent_deit']
    cfg = ref['config']
    hw = tuple(cfg['hw'])
    attn = AgentAttention(cfg['dim'], cfg['num_heads'], cfg['agent_num'], hw,
                          prefix_tokens=True).eval()
    attn.load_state_dict({k: _tensor(v) for k, v in ref['state_dict'].items()})
    with torch.no_grad():
        out = attn.forward_tokens(_tensor(ref['input']), hw, num_prefix=1)
    torch.testing.assert_close(out, _tensor(ref['output']), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('key,make', [
    ('agent_cswin', lambda cfg: AgentCSwinBranch(cfg['dim'], cfg['num_heads'], cfg['agent_num'],
                                                 tuple(cfg['hw']))),
    ('focused_cswin', lambda cfg: FocusedCSwinBranch(cfg['dim'], cfg['num_heads'],
                                                     tuple(cfg['hw']))),
])
def test_cswin_branches_equal_the_authors(modules, key, make):
    """Their CSwin branches on a block's q, k, v over a whole 4 x 4 map (LePE included)."""
    ref = modules[key]
    cfg = ref['config']
    branch = make(cfg).eval()
    branch.load_state_dict({k: _tensor(v) for k, v in ref['state_dict'].items()})
    q, k, v = (t.view(t.shape[0], *cfg['hw'], -1) for t in _tensor(ref['input']).unbind(0))
    with torch.no_grad():
        out = branch(q, k, v).flatten(1, 2)
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
    (FLattenPVTv2, dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2))),
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
    # Agent-PVT's released detection backbone drops a stride's remainder (floor);
    # the others pad it (ceil).
    expected = [(1, 16, 18, 25), (1, 32, 9, 12), (1, 64, 4, 6), (1, 128, 2, 3)] \
        if cls is AgentPVT else [(1, 16, 19, 26), (1, 32, 10, 13), (1, 64, 5, 7), (1, 128, 3, 4)]
    assert [tuple(o.shape) for o in outs] == expected
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('cls,arch', [
    (AgentCSwin, dict(SMALL, attn_types='AABB', agent_num=(4, 4, 9, 9))),
    (FLattenCSwin, dict(SMALL, attn_types='LLSS')),
])
def test_cswin_siblings_any_input_size(cls, arch):
    """CSwin's 7x7 stride-4 stem (padding 2) and stripes at a size the release cannot run."""
    kwargs = dict(agent_shapes=[(3, 3), (2, 3), None, None]) if cls is AgentCSwin else {}
    model = cls(arch, pretrain_img_size=64, **kwargs).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 75, 101))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 19, 25), (1, 32, 10, 13), (1, 64, 5, 7),
                                              (1, 128, 3, 4)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_agent_deit_any_input_size_and_softmax_blocks():
    """Agent blocks first, ViT softmax after (Agent-DeiT-B's layout), through the pyramid."""
    arch = dict(embed_dims=24, depth=4, num_heads=2, pretrain_img_size=64,
                agent_num=(4, 4, 9, 9), agent_layers=2)
    model = AgentDeiT(arch, out_indices=(0, 1, 2, 3), agent_shape=(3, 2)).eval()
    kinds = [type(b.attn).__name__ for b in model.blocks]
    assert kinds == ['AgentAttention', 'AgentAttention', 'GlobalSoftmaxAttention',
                     'GlobalSoftmaxAttention']
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 75, 101))
    assert [tuple(o.shape) for o in outs] == [(1, 24, 20, 28), (1, 24, 10, 14), (1, 24, 5, 7),
                                              (1, 24, 3, 4)]


@pytest.mark.parametrize('chunk_tokens', [30, 200])
def test_mlla_chunked_equals_whole(chunk_tokens):
    """MLLA token-chunked: the stem and merges by rows from a few rows around each band,
    each block in two passes (its attention's sums, then each band from 4 rows around
    it). 30 tokens: bands of one row at every stage."""
    model = MLLA(dict(SMALL, num_heads=(2, 2, 4, 8))).eval()
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        whole = model(x)
        model.chunk_tokens = chunk_tokens
        chunked = model(x)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)


def test_mlla_halo_is_needed():
    """Dropping the rows around each band changes the result (the test can fail)."""
    from mmlinattn.models.layers import MLLABlock
    block = MLLABlock(16, 2).eval()
    x = torch.randn(1, 9, 7, 16)
    with torch.no_grad():
        whole = block(x)
        block.halo = 0
        banded = block.forward_bands(x, 2)
    assert not torch.allclose(banded, whole, atol=1e-3)


@pytest.mark.parametrize('chunk_tokens', [30, 200])
def test_pvtv2_chunked_equals_whole(chunk_tokens):
    """FLatten-PVTv2 token-chunked: overlapping embeddings by rows; each block's focused
    passes, then each band from one row of attention output around it (the MLP's
    depthwise convolution)."""
    model = FLattenPVTv2(dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2)),
                         pretrain_img_size=64).eval()
    x = torch.randn(1, 3, 75, 101)
    banded = []
    for block in model.block1:
        block.forward_bands = (lambda f: lambda *a: banded.append(1) or f(*a))(
            block.forward_bands)
    with torch.no_grad():
        whole = model(x)
        model.chunk_tokens = chunk_tokens
        chunked = model(x)
    assert len(banded) == 2  # the blocks ran their own bands, not whole
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)


def test_released_file_loads_through_init_cfg(tmp_path):
    """A released-layout checkpoint (head and a derived buffer included) through
    ``init_cfg=dict(type='Pretrained')``, read by the safe reader."""
    arch = dict(SMALL, attn_types='AAMB1', agent_num=(4, 4, 9, 9))
    src = AgentSwinClassifier(arch, pretrain_img_size=64).eval()
    state = dict(src.state_dict(), **{'layers.3.blocks.1.attn.relative_position_index':
                                      torch.zeros(49, 49, dtype=torch.long)})
    path = tmp_path / 'agent_swin_released.pth'
    torch.save({'model': state, 'epoch': 299}, path)
    # The classifier's padding rule (its stage-4 map fits one window: unshifted).
    backbone = AgentSwin(arch, pretrain_img_size=64, pad_mask=True,
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


@pytest.mark.parametrize('make', [
    lambda: AgentCSwin(dict(SMALL, attn_types='AABB', agent_num=(4, 4, 9, 9)),
                       pretrain_img_size=64),
    lambda: FLattenCSwin(dict(SMALL, attn_types='LLSS'), pretrain_img_size=64),
    lambda: AgentDeiT(dict(embed_dims=24, depth=4, num_heads=2, pretrain_img_size=64,
                           agent_num=(4, 4, 9, 9), agent_layers=2), out_indices=(0, 1, 2, 3)),
], ids=['agent_cswin', 'flatten_cswin', 'agent_deit'])
def test_chunked_forward_on_the_cswin_and_deit_bases(make):
    """Chunked inference on the CSwin and DeiT bases: stems, merges and stripes in
    bands; the CSwin agent and focused branches in passes over bands with the block's
    projections (one-row bands at 40 tokens); Agent-DeiT's blocks whole. The result is
    the ordinary forward's."""
    from mmlinattn.models.layers import SummedAttentionPlan
    model = make().eval()
    if hasattr(model, 'stage1'):
        block = model.stage1[0]
        assert isinstance(block.chunk_plan(torch.zeros(1, 5, 6, 16)), SummedAttentionPlan)
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        whole = model(x)
        model.chunk_tokens = 40
        chunked = model(x)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', ['agent_cswin', 'flatten_cswin', 'agent_deit',
                                    'flatten_pvt_v2'])
def test_released_layout_converts_and_loads_into_the_backbone(family, tmp_path):
    """A classifier file in the released layout (head included) through
    ``init_cfg=dict(type='Pretrained')``: the family is found by its keys, the
    converter maps its final norm, and the backbone's last map is the classifier's."""
    spec = FAMILIES[family]
    arch, kwargs = {
        'agent_cswin': (dict(SMALL, attn_types='AABB', agent_num=(4, 4, 9, 9)),
                        dict(pretrain_img_size=64)),
        'flatten_cswin': (dict(SMALL, attn_types='LLSS'), dict(pretrain_img_size=64)),
        'agent_deit': (dict(embed_dims=24, depth=4, num_heads=2, pretrain_img_size=64,
                            agent_num=(4, 4, 9, 9), agent_layers=3), {}),
        'flatten_pvt_v2': (dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2)),
                           dict(pretrain_img_size=64)),
    }[family]
    src = spec.classifier(arch, **kwargs).eval()
    assert detect_family(list(src.state_dict())) is spec
    path = tmp_path / f'{family}.pth'
    torch.save({'model': src.state_dict()}, path)
    extra = dict(out_indices=(3, ), pyramid=False) if family == 'agent_deit' else {}
    backbone = spec.backbone(arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)),
                             **kwargs, **extra)
    backbone.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone.eval()(x)[-1].permute(0, 2, 3, 1)
        want = src.forward_features(x)
    if family == 'agent_deit':
        want = want[:, 1:].reshape(out.shape)
    torch.testing.assert_close(out, want)
