"""FLatten-PVTv2: PVT v2 with focused linear attention in every block (FLatten
Transformer, Han et al., ICCV 2023), with the released layouts.

The authors released B0's weights (and configs for B1-B4, here as archs). Every one
is ``LLLL`` without spatial reduction: global focused linear attention over each whole
map with ``q`` and ``kv`` projections; the positional encoding of k is learned on the
224 px grid of each stage and resized bilinearly to each map (docs/sibling_attentions.md).
The release has no detection or segmentation code to follow.
"""
from __future__ import annotations

from typing import Any, Union

from torch import nn

from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import ClassifierHead, FocusedLinearAttention
from .pvtv2 import PVTv2Backbone

__all__ = ['FLattenPVTv2', 'FLattenPVTv2Classifier', 'FLATTEN_PVTV2_ARCHS']

_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
FLATTEN_PVTV2_ARCHS: dict[str, dict] = {
    'b0': dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_heads=_HEADS,
               mlp_ratios=(8, 8, 4, 4)),
    'b1': dict(embed_dims=_WIDE, depths=(2, 2, 2, 2), num_heads=_HEADS, mlp_ratios=(8, 8, 4, 4)),
    'b2': dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), num_heads=_HEADS, mlp_ratios=(8, 8, 4, 4)),
    'b3': dict(embed_dims=_WIDE, depths=(3, 4, 18, 3), num_heads=_HEADS,
               mlp_ratios=(8, 8, 4, 4)),
    'b4': dict(embed_dims=_WIDE, depths=(3, 8, 27, 3), num_heads=_HEADS,
               mlp_ratios=(8, 8, 4, 4)),
}


class FLattenPVTv2(PVTv2Backbone):
    """FLatten-PVTv2 backbone for dense prediction.

    Args:
        arch: ``'b0'`` ... ``'b4'`` or a dict with ``embed_dims``, ``depths``,
            ``num_heads``, ``mlp_ratios``.
        pretrain_img_size: the classification size; the positional encodings are
            stored for the stage maps at it (56, 28, 14, 7 at 224).
        focusing_factor: ``p`` (3); kernel_size: of the depthwise convolution on v (5).
        out_norm: accepted for the backbone contract; the released stage norms are
            always applied (:class:`~.pvtv2.PVTv2Backbone`).
        Other arguments as :class:`~mmlinattn.models.backbones.InLinePVT`.

    Input ``(B, in_channels, H, W)`` of any size; output ``(B, C_i, H_i, W_i)`` maps at
    strides 4, 8, 16, 32.
    """

    arch_settings = FLATTEN_PVTV2_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 'b0',
                 *,
                 focusing_factor: float = 3.,
                 kernel_size: int = 5,
                 pretrain_img_size: int = 224,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 **layout: Any) -> None:

        def make_attention(i: int, j: int, dim: int, heads: int) -> nn.Module:
            side = pretrain_img_size // (4 * 2**i)
            return FocusedLinearAttention(dim, heads, (side, side), focusing_factor,
                                          kernel_size, qkv_bias, drop_rate, qkv_layout='q_kv')

        super().__init__(make_attention=make_attention, arch=arch, drop_rate=drop_rate, **layout)


class FLattenPVTv2Classifier(ClassifierHead, FLattenPVTv2):
    """FLatten-PVTv2 with the released head: the token mean after ``norm4``, ``head``."""

    head_norm_eps = None


register_family(BackboneFamily(
    name='flatten_pvt_v2', backbone=FLattenPVTv2, classifier=FLattenPVTv2Classifier,
    key_prefixes=('block1.', ), key_markers=('.mlp.dwconv.dwconv.', ),
    first_conv='patch_embed1.proj',
    released=(
        ReleasedModel('flatten_pvt_v2_b0', 'flatten_pvt_v2_b0', 'b0', 0.1),
    ),
    benchmark=(
        BenchmarkVariant('flatten-pvtv2-b2', 'FLatten-PVTv2-B2 (the authors\' config), global '
                         'focused linear attention', (('arch', 'b2'), )),
    ),
))
