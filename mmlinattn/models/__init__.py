"""Backbones (registered in the mmlinattn, mmdet and mmseg registries) and timm models."""
from ..registry import register_into_openmmlab
from .backbones import (
    CSWIN_ARCHS,
    PVT_ARCHS,
    SWIN_ARCHS,
    VIT_ARCHS,
    InLineBackbone,
    InLineCSwin,
    InLinePVT,
    InLineSwin,
    InLineViT,
    convert_cswin_checkpoint,
    convert_pvt_checkpoint,
    convert_swin_checkpoint,
    convert_vit_checkpoint,
)
from .classification import (
    CLASSIFIERS,
    InLineCSwinClassifier,
    InLinePVTClassifier,
    InLineSwinClassifier,
    InLineViTClassifier,
    load_released,
)

BACKBONES = (InLineSwin, InLinePVT, InLineCSwin, InLineViT)

#: mmdet/mmseg scopes that received the backbones on import.
REGISTERED_SCOPES = register_into_openmmlab(BACKBONES)

__all__ = [
    'InLineBackbone', 'InLineSwin', 'InLinePVT', 'InLineCSwin', 'InLineViT', 'SWIN_ARCHS',
    'PVT_ARCHS', 'CSWIN_ARCHS', 'VIT_ARCHS', 'convert_swin_checkpoint', 'convert_pvt_checkpoint',
    'convert_cswin_checkpoint', 'convert_vit_checkpoint', 'CLASSIFIERS', 'InLineSwinClassifier',
    'InLinePVTClassifier', 'InLineCSwinClassifier', 'InLineViTClassifier', 'load_released',
    'BACKBONES', 'REGISTERED_SCOPES'
]
