"""InLine backbones with the OpenMMLab backbone contract."""
from .base import InLineBackbone
from .inline_cswin import CSWIN_ARCHS, InLineCSwin, convert_cswin_checkpoint
from .inline_pvt import PVT_ARCHS, InLinePVT, convert_pvt_checkpoint
from .inline_swin import SWIN_ARCHS, InLineSwin, convert_swin_checkpoint
from .inline_vit import VIT_ARCHS, InLineViT, convert_vit_checkpoint

__all__ = [
    'InLineBackbone', 'InLineSwin', 'InLinePVT', 'InLineCSwin', 'InLineViT', 'SWIN_ARCHS',
    'PVT_ARCHS', 'CSWIN_ARCHS', 'VIT_ARCHS', 'convert_swin_checkpoint', 'convert_pvt_checkpoint',
    'convert_cswin_checkpoint', 'convert_vit_checkpoint'
]
