"""Backbones with the OpenMMLab backbone contract (InLine, and the sibling linear
attentions on the same base models); each module registers its family."""
from .agent_cswin import AGENT_CSWIN_ARCHS, AgentCSwin, AgentCSwinClassifier
from .agent_deit import AGENT_DEIT_ARCHS, AgentDeiT, AgentDeiTClassifier
from .agent_pvt import AGENT_PVT_ARCHS, AgentPVT, AgentPVTClassifier
from .agent_swin import AGENT_SWIN_ARCHS, AgentSwin, AgentSwinClassifier
from .base import InLineBackbone, chunked_inference
from .flatten_cswin import FLATTEN_CSWIN_ARCHS, FLattenCSwin, FLattenCSwinClassifier
from .flatten_pvt import FLATTEN_PVT_ARCHS, FLattenPVT, FLattenPVTClassifier
from .flatten_pvt_v2 import FLATTEN_PVTV2_ARCHS, FLattenPVTv2, FLattenPVTv2Classifier
from .flatten_swin import FLATTEN_SWIN_ARCHS, FLattenSwin, FLattenSwinClassifier
from .inline_cswin import (
    CSWIN_ARCHS,
    CSwinBackbone,
    InLineCSwin,
    InLineCSwinClassifier,
    convert_cswin_checkpoint,
)
from .inline_deit import (
    DEIT_ARCHS,
    VIT_ARCHS,
    DeiTBackbone,
    InLineDeiT,
    InLineDeiTClassifier,
    InLineViT,
    convert_deit_checkpoint,
    convert_vit_checkpoint,
)
from .inline_pvt import (
    PVT_ARCHS,
    InLinePVT,
    InLinePVTClassifier,
    PVTBackbone,
    convert_pvt_checkpoint,
)
from .inline_swin import (
    SWIN_ARCHS,
    InLineSwin,
    InLineSwinClassifier,
    SwinBackbone,
    convert_swin_checkpoint,
)
from .mlla import MLLA, MLLA_ARCHS, MLLAClassifier

__all__ = [
    'InLineBackbone', 'chunked_inference', 'InLineSwin', 'InLinePVT', 'InLineCSwin',
    'InLineDeiT', 'SWIN_ARCHS',
    'PVT_ARCHS', 'CSWIN_ARCHS', 'DEIT_ARCHS', 'convert_swin_checkpoint', 'convert_pvt_checkpoint',
    'convert_cswin_checkpoint', 'convert_deit_checkpoint', 'InLineSwinClassifier',
    'InLinePVTClassifier', 'InLineCSwinClassifier', 'InLineDeiTClassifier', 'InLineViT',
    'VIT_ARCHS', 'convert_vit_checkpoint', 'SwinBackbone', 'AgentSwin', 'AgentSwinClassifier',
    'AGENT_SWIN_ARCHS', 'FLattenSwin', 'FLattenSwinClassifier', 'FLATTEN_SWIN_ARCHS', 'MLLA',
    'MLLAClassifier', 'MLLA_ARCHS', 'AgentPVT', 'AgentPVTClassifier', 'AGENT_PVT_ARCHS',
    'FLattenPVT', 'FLattenPVTClassifier', 'FLATTEN_PVT_ARCHS', 'PVTBackbone', 'CSwinBackbone',
    'AgentCSwin', 'AgentCSwinClassifier', 'AGENT_CSWIN_ARCHS', 'FLattenCSwin',
    'FLattenCSwinClassifier', 'FLATTEN_CSWIN_ARCHS', 'DeiTBackbone', 'AgentDeiT',
    'AgentDeiTClassifier', 'AGENT_DEIT_ARCHS', 'FLattenPVTv2', 'FLattenPVTv2Classifier',
    'FLATTEN_PVTV2_ARCHS'
]
