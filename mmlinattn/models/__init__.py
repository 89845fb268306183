"""Backbones (registered in the mmlinattn, mmdet and mmseg registries) and timm models:
InLine's four families and the sibling attentions' (Agent, FLatten, MLLA).

Every backbone family is declared once (:mod:`.family`); :data:`FAMILIES` lists them.
"""
from ..registry import register_into_openmmlab
from .backbones import (
    CSWIN_ARCHS,
    DEIT_ARCHS,
    MLLA,
    PVT_ARCHS,
    SWIN_ARCHS,
    VIT_ARCHS,
    AgentCSwin,
    AgentDeiT,
    AgentPVT,
    AgentSwin,
    FLattenCSwin,
    FLattenPVT,
    FLattenPVTv2,
    FLattenSwin,
    InLineBackbone,
    InLineCSwin,
    InLineCSwinClassifier,
    InLineDeiT,
    InLineDeiTClassifier,
    InLinePVT,
    InLinePVTClassifier,
    InLineSwin,
    InLineSwinClassifier,
    InLineViT,
    chunked_inference,
    convert_cswin_checkpoint,
    convert_deit_checkpoint,
    convert_pvt_checkpoint,
    convert_swin_checkpoint,
    convert_vit_checkpoint,
)
from .classification import CLASSIFIERS, load_released
from .family import (
    FAMILIES,
    BackboneFamily,
    BenchmarkVariant,
    ReleasedModel,
    detect_family,
    find_family,
    register_family,
)

#: Older name of InLineDeiTClassifier.
InLineViTClassifier = InLineDeiTClassifier

#: The backbone classes, one per family.
BACKBONES = tuple(spec.backbone for spec in FAMILIES.values())

#: mmdet/mmseg scopes that received the backbones on import.
REGISTERED_SCOPES = register_into_openmmlab(())

__all__ = [
    'InLineBackbone', 'InLineSwin', 'InLinePVT', 'InLineCSwin', 'InLineDeiT', 'SWIN_ARCHS',
    'PVT_ARCHS', 'CSWIN_ARCHS', 'DEIT_ARCHS', 'convert_swin_checkpoint', 'convert_pvt_checkpoint',
    'convert_cswin_checkpoint', 'convert_deit_checkpoint', 'CLASSIFIERS', 'InLineSwinClassifier',
    'InLinePVTClassifier', 'InLineCSwinClassifier', 'InLineDeiTClassifier', 'load_released',
    'BACKBONES', 'REGISTERED_SCOPES', 'FAMILIES', 'BackboneFamily', 'BenchmarkVariant',
    'ReleasedModel', 'detect_family', 'find_family', 'register_family', 'InLineViT',
    'InLineViTClassifier', 'VIT_ARCHS', 'convert_vit_checkpoint', 'chunked_inference',
    'AgentSwin', 'FLattenSwin', 'AgentPVT', 'FLattenPVT', 'MLLA', 'AgentCSwin', 'FLattenCSwin',
    'AgentDeiT', 'FLattenPVTv2'
]
