"""A backbone family is declared once and every registry and tool finds it there."""
import contextlib
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from mmengine.registry import DefaultScope
from torch import nn

from mmlinattn.benchmark import backbone_contenders
from mmlinattn.models import (
    FAMILIES,
    BackboneFamily,
    BenchmarkVariant,
    InLineBackbone,
    ReleasedModel,
    detect_family,
    register_family,
)
from mmlinattn.models.family import unregister_family
from mmlinattn.models.layers import ClassifierHead, InLineAttention, TransformerBlock
from mmlinattn.registry import MODELS

REPO = Path(__file__).resolve().parents[2]


def _openmmlab_registries():
    found = {}
    for scope in ('mmdet', 'mmseg'):
        # Not installed (or mmcv not compiled): that library is not checked.
        with contextlib.suppress(Exception):
            found[scope] = importlib.import_module(f'{scope}.registry').MODELS
    return found


def test_the_four_released_families_are_declared():
    assert set(FAMILIES) == {'swin', 'pvt', 'cswin', 'deit', 'agent_swin', 'flatten_swin',
                             'agent_pvt', 'flatten_pvt', 'mlla', 'agent_cswin', 'flatten_cswin',
                             'agent_deit', 'flatten_pvt_v2'}
    for spec in FAMILIES.values():
        assert MODELS.get(spec.backbone.__name__) is spec.backbone
        for scope, registry in _openmmlab_registries().items():
            assert registry.get(spec.backbone.__name__) is spec.backbone, scope
        for released in spec.released:
            assert timm.is_model(released.name)
        names = {v.name for v in spec.benchmark}
        assert names and names <= set(backbone_contenders())
    assert MODELS.get('InLineViT') is FAMILIES['deit'].backbone  # the older name


@pytest.mark.parametrize('name', ['inline_swin_tiny', 'inline_pvt_tiny', 'inline_cswin_tiny',
                                  'inline_deit_tiny'])
def test_released_keys_identify_their_family(name):
    keys = list(timm.create_model(name).state_dict())
    assert detect_family(keys).name == name.split('_')[1]


# -- a toy family, declared by its spec alone ------------------------------------------------
class ToyBackbone(InLineBackbone):
    """Stride-4 stem, then ``depth`` InLine blocks at that stride (one stage each)."""

    arch_settings = {'mini': dict(embed_dims=8, depth=2)}
    convert_checkpoint = staticmethod(
        lambda state: {k: v for k, v in state.items() if not k.startswith('head.')})

    def __init__(self, arch='mini', drop_path_rate=0., out_indices=(0, 1), out_norm=True,
                 frozen_stages=-1, with_cp=False, pretrained=None, init_cfg=None):
        setting = self.resolve_arch(arch)
        dim, depth = setting['embed_dims'], setting['depth']
        super().__init__(depth, out_indices, out_norm, frozen_stages, with_cp, pretrained,
                         init_cfg)
        self.num_features = [dim] * depth
        self.toy_stem = nn.Conv2d(3, dim, 4, 4)
        self.toy_blocks = nn.ModuleList(
            TransformerBlock(dim, InLineAttention(dim, 2), drop_path=drop_path_rate)
            for _ in range(depth))
        self._add_out_norms(self.num_features, eps=1e-6)
        self._finish_init()

    def _stem_modules(self):
        return [self.toy_stem]

    def _stage_modules(self, i):
        return [self.toy_blocks[i]]

    def forward_stages(self, x):
        x = self.toy_stem(x).permute(0, 2, 3, 1)
        outs = []
        for block in self.toy_blocks:
            x = block(x)
            outs.append(x)
        return outs


class ToyClassifier(ClassifierHead, ToyBackbone):
    head_norm_eps = 1e-6


TOY = BackboneFamily(
    name='toy', backbone=ToyBackbone, classifier=ToyClassifier, key_prefixes=('toy_stem.', ),
    first_conv='toy_stem', feature_stride=4,
    released=(ReleasedModel('inline_toy_mini', 'inline_toy_m', 'mini', 0.0, 64), ),
    benchmark=(BenchmarkVariant('inline-toy', 'a toy family', (('arch', 'mini'), )), ),
    aliases=('OldToyName', ))


@pytest.fixture
def toy_family():
    register_family(TOY)
    yield TOY
    unregister_family('toy')


def _convert_tool():
    spec = importlib.util.spec_from_file_location('convert_checkpoint',
                                                  REPO / 'tools' / 'convert_checkpoint.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_family_from_its_spec_alone_is_in_every_registry(toy_family, tmp_path, capsys):
    # mmlinattn's registry, under its name and its older one; mmdet's and mmseg's.
    assert MODELS.get('ToyBackbone') is ToyBackbone and MODELS.get('OldToyName') is ToyBackbone
    for scope, registry in _openmmlab_registries().items():
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(dict(type='OldToyName', out_indices=(1, )))
        assert [o.shape for o in model(torch.randn(1, 3, 32, 24))] == [(1, 8, 8, 6)], scope
    # timm: the released model, with its pretrained_cfg from the spec.
    classifier = timm.create_model('inline_toy_mini', num_classes=5)
    assert type(classifier) is ToyClassifier
    assert classifier.pretrained_cfg['first_conv'] == 'toy_stem'
    assert classifier.pretrained_cfg['pool_size'] == (16, 16)
    assert classifier(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    # The converter finds the family from the keys and uses its conversion.
    src, dst = tmp_path / 'released.pth', tmp_path / 'backbone.pth'
    torch.save(timm.create_model('inline_toy_mini').state_dict(), src)
    assert _convert_tool().main([str(src), str(dst)]) == 0
    assert 'family: toy' in capsys.readouterr().out
    converted = torch.load(dst, weights_only=True)
    assert 'head.weight' not in converted and 'toy_stem.weight' in converted
    # The benchmark offers its variant and builds it.
    contender = backbone_contenders()['inline-toy']
    assert type(contender.build()) is ToyBackbone and contender.ours


def test_unregistering_removes_it_everywhere(toy_family):
    unregister_family('toy')
    assert 'ToyBackbone' not in MODELS.module_dict and not timm.is_model('inline_toy_mini')
    for registry in _openmmlab_registries().values():
        assert 'OldToyName' not in registry.module_dict
    assert 'inline-toy' not in backbone_contenders()
    assert detect_family(['toy_stem.weight']) is None
    register_family(TOY)  # for the fixture's own removal


def test_a_spec_that_cannot_work_is_refused_by_name(toy_family):
    from dataclasses import replace

    with pytest.raises(ValueError, match="shares key prefixes.*'swin'"):
        register_family(replace(TOY, name='toy2', key_prefixes=('layers.', )))
    with pytest.raises(ValueError, match="arch 'huge' is not in ToyBackbone.arch_settings"):
        register_family(replace(TOY, released=(ReleasedModel('x', 'x', 'huge', 0.), )))
    with pytest.raises(TypeError, match='must subclass ToyBackbone'):
        register_family(replace(TOY, classifier=nn.Module))
    with pytest.raises(ValueError, match='match several families'):
        detect_family(['layers.0.blocks.0.attn.residual.0.weight', 'toy_stem.weight'])
    # Families on one base model (InLine-, Agent-, FLatten-Swin share 'layers.') are
    # told apart by their markers; a spec sharing a prefix needs markers of its own.
    assert detect_family(['layers.0.blocks.0.attn.qkv.weight']) is None
    assert detect_family(['layers.0.blocks.0.attn.an_bias']).name == 'agent_swin'
    with pytest.raises(ValueError, match="shares key prefixes.*give both distinct key_markers"):
        register_family(replace(TOY, name='toy2', key_prefixes=('layers.', ),
                                key_markers=('.attn.an_bias', )))
