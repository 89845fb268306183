"""Backbones (registered in the mmlinattn, mmdet and mmseg registries) and timm models."""
from ..registry import register_into_openmmlab
from .backbones import (
                        PVT_ARCHS,
                        SWIN_ARCHS,
                        InLineBackbone,
                        InLinePVT,
                        InLineSwin,
                        convert_pvt_checkpoint,
                        convert_swin_checkpoint,
)
from .classification import CLASSIFIERS, InLinePVTClassifier, InLineSwinClassifier, load_released

BACKBONES = (InLineSwin, InLinePVT)

#: mmdet/mmseg scopes that received the backbones on import.
REGISTERED_SCOPES = register_into_openmmlab(BACKBONES)

__all__ = [
    'InLineBackbone', 'InLineSwin', 'InLinePVT', 'SWIN_ARCHS', 'PVT_ARCHS',
    'convert_swin_checkpoint', 'convert_pvt_checkpoint', 'CLASSIFIERS', 'InLineSwinClassifier',
    'InLinePVTClassifier', 'load_released', 'BACKBONES', 'REGISTERED_SCOPES'
]
