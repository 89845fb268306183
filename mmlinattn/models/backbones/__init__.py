"""InLine backbones with the OpenMMLab backbone contract."""
from .base import InLineBackbone
from .inline_pvt import PVT_ARCHS, InLinePVT, convert_pvt_checkpoint
from .inline_swin import SWIN_ARCHS, InLineSwin, convert_swin_checkpoint

__all__ = [
    'InLineBackbone', 'InLineSwin', 'InLinePVT', 'SWIN_ARCHS', 'PVT_ARCHS',
    'convert_swin_checkpoint', 'convert_pvt_checkpoint'
]
