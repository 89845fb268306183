"""What the benchmark can measure: attention operators, backbones and whole models.

Each contender is a name and a builder returning ``(callable, make_input)``:
``make_input(size, batch, device)`` gives the argument tuple for one call at an
input side of ``size`` pixels (attention level: ``size`` is the token-map side).
MMDetection's own backbones are offered when mmdet imports.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ['Contender', 'ATTENTION_CONTENDERS', 'BACKBONE_CONTENDERS', 'DEFAULT_BACKBONES',
           'get_contender', 'mmdet_available', 'model_contender']

Builder = Callable[[], Any]


@dataclass(frozen=True)
class Contender:
    """One thing to time. ``build()`` returns a module or function; ``kind`` is its family."""

    name: str
    level: str
    build: Builder
    description: str
    needs: tuple[str, ...] = field(default=())


def mmdet_available() -> bool:
    if importlib.util.find_spec('mmdet') is None:
        return False
    try:
        import mmdet.models  # noqa: F401
    except Exception:  # noqa: BLE001 - mmdet without a compiled mmcv is unusable here
        return False
    return True


# -- attention level: (batch, heads, tokens, head_dim) operators ---------------------------
ATTN_HEADS, ATTN_HEAD_DIM = 3, 32  # InLine-Swin-T stage 1


def _attention(name: str) -> Callable[[], Callable]:
    def build() -> Callable:
        from ..ops import ATTENTION_FUNCTIONS
        return ATTENTION_FUNCTIONS[name]
    return build


ATTENTION_CONTENDERS = {
    'inline': Contender('inline', 'attention', _attention('inline'),
                        'InLine attention, O(N d^2)'),
    'linear': Contender('linear', 'attention', _attention('linear'),
                        'plain linear attention (ReLU kernel), O(N d^2)'),
    'softmax': Contender('softmax', 'attention', _attention('softmax'),
                         'softmax attention through SDPA, O(N^2 d)'),
}


def attention_input(side: int, batch: int, device: str, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (batch, ATTN_HEADS, side * side, ATTN_HEAD_DIM)
    return tuple(torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                 for _ in range(3))


# -- backbone level --------------------------------------------------------------------------
def _ours(cls_name: str, **kwargs: Any) -> Builder:
    def build() -> nn.Module:
        from .. import models
        return getattr(models, cls_name)(**kwargs)
    return build


def _mmdet(cls_name: str, **kwargs: Any) -> Builder:
    def build() -> nn.Module:
        from mmdet.models import backbones
        return getattr(backbones, cls_name)(**kwargs)
    return build


_SWIN_T = dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
               drop_path_rate=0.)
_PVTV2 = dict(embed_dims=64, num_heads=[1, 2, 5, 8])

BACKBONE_CONTENDERS = {c.name: c for c in [
    Contender('inline-swin-t', 'backbone', _ours('InLineSwin', arch='tiny', drop_path_rate=0.),
              'InLine-Swin-T, global InLine stages 1-3'),
    Contender('inline-swin-t-w56', 'backbone',
              _ours('InLineSwin', arch='tiny', inline_window=56, drop_path_rate=0.),
              'InLine-Swin-T, InLine in 56x56 windows'),
    Contender('swin-t-global-softmax', 'backbone',
              _ours('InLineSwin', arch='tiny', inline_operator='softmax', drop_path_rate=0.),
              'the same layout, global softmax attention in stages 1-3'),
    Contender('swin-t-global-linear', 'backbone',
              _ours('InLineSwin', arch='tiny', inline_operator='linear', drop_path_rate=0.),
              'the same layout, plain linear attention in stages 1-3'),
    Contender('swin-t (mmdet)', 'backbone', _mmdet('SwinTransformer', **_SWIN_T),
              "MMDetection's Swin-T, 7x7 shifted windows", needs=('mmdet', )),
    Contender('inline-pvt-t', 'backbone', _ours('InLinePVT', arch='tiny', drop_path_rate=0.),
              'InLine-PVT-T, global InLine, no spatial reduction'),
    Contender('inline-pvt-s', 'backbone', _ours('InLinePVT', arch='small', drop_path_rate=0.),
              'InLine-PVT-S, global InLine, no spatial reduction'),
    Contender('pvt-t (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformer', num_layers=[2, 2, 2, 2], drop_path_rate=0.),
              "MMDetection's PVT-T, softmax with spatial reduction", needs=('mmdet', )),
    Contender('pvt-s (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformer', num_layers=[3, 4, 6, 3], drop_path_rate=0.),
              "MMDetection's PVT-S, softmax with spatial reduction", needs=('mmdet', )),
    Contender('pvtv2-b1 (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformerV2', num_layers=[2, 2, 2, 2], drop_path_rate=0.,
                     **_PVTV2), "MMDetection's PVTv2-b1", needs=('mmdet', )),
    Contender('inline-cswin-t', 'backbone',
              _ours('InLineCSwin', arch='tiny', drop_path_rate=0.),
              'InLine-CSwin-T, global InLine stages 1-2, softmax stripes after'),
    Contender('cswin-t-global-softmax', 'backbone',
              _ours('InLineCSwin', arch='tiny', inline_operator='softmax', drop_path_rate=0.),
              'the same layout, global softmax attention in stages 1-2'),
    Contender('inline-vit-s', 'backbone', _ours('InLineViT', arch='small', drop_path_rate=0.),
              'InLine-ViT-S (InLine-DeiT-S layout), global InLine, simple pyramid'),
    Contender('vit-s-global-softmax', 'backbone',
              _ours('InLineViT', arch='small', inline_operator='softmax', drop_path_rate=0.),
              'the same layout, global softmax attention'),
    Contender('pvtv2-b2 (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformerV2', num_layers=[3, 4, 6, 3], drop_path_rate=0.,
                     **_PVTV2), "MMDetection's PVTv2-b2", needs=('mmdet', )),
]}

#: The no-argument sweep: the comparisons the documented targets are about.
DEFAULT_BACKBONES = ('inline-swin-t', 'swin-t (mmdet)', 'inline-pvt-s', 'pvt-s (mmdet)')


def image_input(size: int, batch: int, device: str, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor]:
    g = torch.Generator(device='cpu').manual_seed(0)
    return (torch.randn((batch, 3, size, size), generator=g).to(device=device, dtype=dtype), )


# -- model level -----------------------------------------------------------------------------
def model_contender(config: str) -> Contender:
    """A whole detector/segmenter from a config file; timed through ``model._forward``."""
    import os.path as osp

    def build() -> Any:
        from mmengine.config import Config
        from mmengine.registry import DefaultScope

        import mmlinattn  # noqa: F401

        cfg = Config.fromfile(config)
        if cfg.model.get('backbone', {}).get('init_cfg'):
            cfg.model.backbone.init_cfg = None
        scope = cfg.get('default_scope', 'mmdet')
        registry = importlib.import_module(f'{scope}.registry').MODELS
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(cfg.model)
        model.benchmark_scope = scope
        return model

    name = osp.splitext(osp.basename(config))[0]
    return Contender(name, 'model', build, f'{name} (whole model)', needs=('mmdet', ))


def get_contender(level: str, name: str) -> Contender:
    table = {'attention': ATTENTION_CONTENDERS, 'backbone': BACKBONE_CONTENDERS}.get(level)
    if level == 'model':
        return model_contender(name)
    if table is None:
        raise ValueError(f'unknown level {level!r}; expected attention, backbone or model')
    if name not in table:
        raise ValueError(f'unknown {level} contender {name!r}; expected one of {sorted(table)}')
    return table[name]


def unavailable_reason(contender: Contender) -> Optional[str]:
    if 'mmdet' in contender.needs and not mmdet_available():
        return 'mmdet (with a compiled mmcv) is not installed'
    return None
