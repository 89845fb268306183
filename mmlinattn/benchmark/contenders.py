"""What the benchmark can measure: attention operators, backbones and whole models.

A :class:`Contender` is a name, a level and ``build()``, which returns what one
timed call runs: an attention function (attention level, called with
:func:`attention_input`), a backbone module (called with :func:`image_input`) or
a whole detector/segmenter (model level). Our backbones' contenders are the
``benchmark`` variants their families declare
(:class:`~mmlinattn.models.family.BackboneFamily`); MMDetection's own backbones
are the comparisons, offered when mmdet imports.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ['Contender', 'ATTENTION_CONTENDERS', 'MMDET_CONTENDERS',
           'DEFAULT_BACKBONES', 'OnnxRuntimeBackbone', 'backbone_contenders', 'get_contender',
           'mmdet_available', 'model_contender']

Builder = Callable[..., Any]


@dataclass(frozen=True)
class Contender:
    """One thing to time at one ``level`` (``attention``, ``backbone`` or ``model``).

    ``build(**overrides)`` returns the function or module a timed call runs
    (``with_cp=True``: with activation checkpointing, where ``supports_cp``);
    ``ours`` marks mmlinattn's own contenders (solid lines in plots) against the
    comparisons; ``needs`` names optional packages it cannot run without.
    """

    name: str
    level: str
    build: Builder
    description: str
    needs: tuple[str, ...] = field(default=())
    ours: bool = True
    supports_cp: bool = True
    #: ``build`` takes ``img_size`` (models whose position embeddings are built for a size).
    sized: bool = False
    #: Seconds ``build`` may take beyond the usual start-up grace (an ONNX export).
    build_s: float = 0.0


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


def _attention(name: str) -> Builder:
    def build(**overrides: Any) -> Callable:
        if overrides:
            raise ValueError(f'an attention operator takes no options, got {overrides}')
        from functools import partial

        from ..ops import attention
        return partial(attention, name)
    return build


ATTENTION_CONTENDERS = {
    'inline': Contender('inline', 'attention', _attention('inline'),
                        'InLine attention, O(N d^2)', supports_cp=False),
    'linear': Contender('linear', 'attention', _attention('linear'),
                        'plain linear attention (ReLU kernel), O(N d^2)', ours=False,
                        supports_cp=False),
    'softmax': Contender('softmax', 'attention', _attention('softmax'),
                         'softmax attention through SDPA, O(N^2 d)', ours=False,
                         supports_cp=False),
}


def attention_input(side: int, batch: int, device: str, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (batch, ATTN_HEADS, side * side, ATTN_HEAD_DIM)
    return tuple(torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                 for _ in range(3))


# -- backbone level --------------------------------------------------------------------------
def _ours(cls: type, kwargs: dict) -> Builder:
    def build(**overrides: Any) -> nn.Module:
        return cls(**{'drop_path_rate': 0., **kwargs, **overrides})
    return build


def _mmdet(cls_name: str, **kwargs: Any) -> Builder:
    def build(**overrides: Any) -> nn.Module:
        from mmdet.models import backbones
        return getattr(backbones, cls_name)(**kwargs, **overrides)
    return build


_SWIN_T = dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
               drop_path_rate=0.)
_PVTV2 = dict(embed_dims=64, num_heads=[1, 2, 5, 8])

#: MMDetection's backbones that ours are compared with.
MMDET_CONTENDERS = {c.name: c for c in [
    Contender('swin-t (mmdet)', 'backbone', _mmdet('SwinTransformer', **_SWIN_T),
              "MMDetection's Swin-T, 7x7 shifted windows", needs=('mmdet', ), ours=False),
    Contender('pvt-t (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformer', num_layers=[2, 2, 2, 2], drop_path_rate=0.),
              "MMDetection's PVT-T, softmax with spatial reduction", needs=('mmdet', ),
              ours=False, supports_cp=False),
    Contender('pvt-s (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformer', num_layers=[3, 4, 6, 3], drop_path_rate=0.),
              "MMDetection's PVT-S, softmax with spatial reduction", needs=('mmdet', ),
              ours=False, supports_cp=False),
    Contender('pvtv2-b1 (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformerV2', num_layers=[2, 2, 2, 2], drop_path_rate=0.,
                     **_PVTV2), "MMDetection's PVTv2-b1", needs=('mmdet', ), ours=False,
              supports_cp=False),
    Contender('pvtv2-b2 (mmdet)', 'backbone',
              _mmdet('PyramidVisionTransformerV2', num_layers=[3, 4, 6, 3], drop_path_rate=0.,
                     **_PVTV2), "MMDetection's PVTv2-b2", needs=('mmdet', ), ours=False,
              supports_cp=False),
]}


#: A checkout of https://github.com/LeapLabTHU/InLine, for the authors' own models.
REFERENCE_ENV = 'MMLINATTN_INLINE_REFERENCE'


class _FeaturesOnly(nn.Module):
    """A classification model's ``forward_features`` as its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model.forward_features(x)


def _reference(module_file: str, entry: str, **options: Any) -> Builder:
    """The authors' ``entry`` of ``models/<module_file>``, with their released build's
    ``options`` (what their ``models/build.py`` passes from the default config)."""

    def build(img_size: int = 224, **overrides: Any) -> nn.Module:
        import importlib.util
        import os
        import os.path as osp

        root = os.environ.get(REFERENCE_ENV)
        path = osp.join(root or '', 'models', module_file)
        if not root or not osp.isfile(path):
            raise FileNotFoundError(
                f"the authors' models are read from a checkout of "
                f'https://github.com/LeapLabTHU/InLine: set {REFERENCE_ENV} to it (no '
                f'{path or module_file} here)')
        if overrides:
            raise ValueError(f"the authors' models take no options here, got {overrides}")
        spec = importlib.util.spec_from_file_location(f'inline_reference_{entry}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return _FeaturesOnly(getattr(module, entry)(img_size=img_size, **options))
    return build


REFERENCE_CONTENDERS = {c.name: c for c in [
    # Released build: every stage InLine, no spatial reduction ('1111').
    Contender('inline-pvt-s (authors)', 'backbone',
              _reference('inline_pvt.py', 'inline_pvt_small', attn_type='IIII',
                         la_sr_ratios='1111'),
              "the authors' InLine-PVT-S, built at the input size (set "
              f'{REFERENCE_ENV})', ours=False, supports_cp=False, sized=True),
]}


def backbone_contenders() -> dict[str, Contender]:
    """Every backbone contender: each registered family's variants, mmdet's, the authors'."""
    from ..models import FAMILIES

    ours = {}
    for spec in FAMILIES.values():
        for variant in spec.benchmark:
            kwargs = dict(variant.kwargs)
            # An ablation (another attention in the InLine stages) is a comparison.
            ablation = kwargs.get('inline_operator', 'inline') != 'inline'
            ours[variant.name] = Contender(variant.name, 'backbone',
                                           _ours(spec.backbone, kwargs), variant.description,
                                           ours=not ablation)
            if variant.name in ONNXRUNTIME_VARIANTS:
                name = f'{variant.name} (onnxruntime)'
                ours[name] = Contender(
                    name, 'backbone', _onnxruntime(variant.name),
                    f'{variant.description}; exported to ONNX at the measured size, run by '
                    'ONNX Runtime on the CPU', needs=('onnxruntime', ), supports_cp=False,
                    sized=True, build_s=EXPORT_GRACE_S)
    return {**ours, **MMDET_CONTENDERS, **REFERENCE_CONTENDERS}


class OnnxRuntimeBackbone(nn.Module):
    """A benchmark backbone exported to ONNX at one input size, run by ONNX Runtime (CPU).

    The export runs in a child process (:func:`export_backbone`, seconds to minutes), so
    neither its time nor its memory counts in the worker's measurement; the session
    gets as many threads as torch uses in the worker. ``forward`` takes and returns CPU
    tensors like the eager backbone. :attr:`flops_reference` is the eager backbone on
    the meta device, whose operator FLOPs the exported graph computes.
    """

    def __init__(self, variant: str, img_size: int) -> None:
        super().__init__()
        import subprocess
        import sys
        import tempfile

        from ..engine.deploy import ort_session

        self.variant = variant
        with tempfile.TemporaryDirectory() as tmp:
            path = f'{tmp}/backbone.onnx'
            code = ('from mmlinattn.benchmark.contenders import export_backbone; '
                    f'export_backbone({variant!r}, {img_size}, {path!r})')
            proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f'exporting {variant} at {img_size} px failed: '
                                   f'{proc.stderr.strip()[-1500:]}')
            self.session = ort_session(path, threads=torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name

    @property
    def flops_reference(self) -> nn.Module:
        """Built when FLOPs are counted (after the timed calls), as eager contenders copy
        themselves to the meta device then."""
        from ..engine.deploy import BackboneGraph

        return BackboneGraph(backbone_contenders()[self.variant].build()).to('meta')

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.device.type != 'cpu':
            raise ValueError('the onnxruntime contender runs on the CPU only')
        outs = self.session.run(None, {self.input_name: x.contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def export_backbone(variant: str, img_size: int, path: str) -> None:
    """Export benchmark backbone ``variant`` (random weights, seed 0) at ``img_size`` px
    (static) to the ONNX file ``path``."""
    from ..engine.deploy import BackboneGraph, export_onnx

    torch.manual_seed(0)
    backbone = backbone_contenders()[variant].build()
    export_onnx(BackboneGraph(backbone.eval()), torch.randn(1, 3, img_size, img_size), path)


def _onnxruntime(variant: str) -> Builder:
    def build(img_size: int = 224, **overrides: Any) -> nn.Module:
        if overrides.get('with_cp'):
            raise ValueError('an ONNX Runtime session has no activation checkpointing')
        return OnnxRuntimeBackbone(variant, img_size)
    return build


#: Our backbones exported to ONNX and run in ONNX Runtime, next to their eager runs.
ONNXRUNTIME_VARIANTS = ('inline-pvt-t', 'inline-pvt-s', 'inline-swin-t')
#: Time allowed for the export before the timed calls (InLine-Swin-T: about 3 min here).
EXPORT_GRACE_S = 600.0


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

    def build(with_cp: bool = False) -> Any:
        from ..engine.build import build_from_config

        model, scope = build_from_config(
            config, {'model.backbone.with_cp': True} if with_cp else None)
        model.benchmark_scope = scope
        return model

    name = osp.splitext(osp.basename(config))[0]
    return Contender(name, 'model', build, f'{name} (whole model)', needs=('mmdet', ),
                     ours='inline' in name)


def get_contender(level: str, name: str) -> Contender:
    table = {'attention': ATTENTION_CONTENDERS,
             'backbone': backbone_contenders() if level == 'backbone' else None}.get(level)
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
    if 'onnxruntime' in contender.needs and importlib.util.find_spec('onnxruntime') is None:
        return 'onnxruntime is not installed (pip install -e .[deploy])'
    return None
