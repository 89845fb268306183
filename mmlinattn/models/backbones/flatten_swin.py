"""FLatten-Swin: Swin Transformer whose linear stages use focused linear attention
(FLatten Transformer, Han et al., ICCV 2023), with the released layouts.

Every released model is ``LLSS``: global focused linear attention in stages 1-2
(window 56 at 224 px covers each map) and Swin's shifted 7x7 window softmax in
stages 3-4 (12 at 384 px). The positional encoding of k is stored for the stage map
at the classification size and resized bilinearly for other maps
(:func:`~mmlinattn.models.layers.resize_positional_encoding` says why); the release
has no detection or segmentation code to follow.
"""
from __future__ import annotations

from typing import Any, Union

from torch import nn

from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import ClassifierHead, FocusedLinearAttention
from .inline_swin import SwinBackbone, swin_softmax_attention

__all__ = ['FLattenSwin', 'FLattenSwinClassifier', 'FLATTEN_SWIN_ARCHS']

FLATTEN_SWIN_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 attn_types='LLSS'),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                  attn_types='LLSS'),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 attn_types='LLSS'),
}


class FLattenSwin(SwinBackbone):
    """FLatten-Swin backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``,
            ``depths``, ``num_heads``, ``attn_types`` (``L`` focused linear, ``S``
            window softmax, ``M`` mixed).
        pretrain_img_size: the classification size; the positional encodings are
            stored for the stage maps at it (56, 28 at 224).
        focusing_factor: ``p`` of the focusing map (3).
        kernel_size: of the depthwise convolution on v (5).
        softmax_window: window of the ``S`` blocks (7).
        pad_mask: the padding of those windows masked (True) or attended (False; see
            :class:`~mmlinattn.models.layers.WindowSoftmaxAttention`); no FLatten detector
            was released, so the padding-invariant rule is the default.
        Other arguments as :class:`~mmlinattn.models.backbones.InLineSwin`.

    Input ``(B, in_channels, H, W)`` of any size; output ``(B, C_i, H_i, W_i)`` maps
    at strides 4, 8, 16, 32 for i in out_indices.
    """

    arch_settings = FLATTEN_SWIN_ARCHS
    attn_letters = 'LS'

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 pretrain_img_size: int = 224,
                 focusing_factor: float = 3.,
                 kernel_size: int = 5,
                 patch_size: int = 4,
                 qkv_bias: bool = True,
                 softmax_window: int = 7,
                 pad_mask: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 **layout: Any) -> None:

        def make_attention(letter: str, i: int, j: int, dim: int, heads: int) -> nn.Module:
            if letter == 'L':
                side = pretrain_img_size // (patch_size * 2**i)
                return FocusedLinearAttention(dim, heads, (side, side), focusing_factor,
                                              kernel_size, qkv_bias, drop_rate)
            return swin_softmax_attention(dim, heads, softmax_window, j, qkv_bias,
                                          attn_drop_rate, drop_rate, pad_mask)

        super().__init__(make_attention=make_attention, arch=arch, patch_size=patch_size,
                         drop_rate=drop_rate, **layout)


class FLattenSwinClassifier(ClassifierHead, FLattenSwin):
    """FLatten-Swin with the released head: final ``norm``, token mean, ``head``."""


register_family(BackboneFamily(
    name='flatten_swin', backbone=FLattenSwin, classifier=FLattenSwinClassifier,
    key_prefixes=('layers.', ), key_markers=('.attn.positional_encoding', ),
    first_conv='patch_embed.proj',
    released=(
        ReleasedModel('flatten_swin_tiny', 'flatten_swin_t', 'tiny', 0.2),
        ReleasedModel('flatten_swin_small', 'flatten_swin_s', 'small', 0.3),
        ReleasedModel('flatten_swin_base', 'flatten_swin_b', 'base', 0.5),
        ReleasedModel('flatten_swin_base_384', 'flatten_swin_b_384', 'base', 0.5, 384, 1.0,
                      (('pretrain_img_size', 384), ('softmax_window', 12))),
    ),
    benchmark=(
        BenchmarkVariant('flatten-swin-t', 'FLatten-Swin-T, global focused linear attention '
                         'in stages 1-2', (('arch', 'tiny'), )),
        BenchmarkVariant('flatten-swin-t-chunked', 'FLatten-Swin-T, token-chunked inference '
                         '(2^16 tokens a band)',
                         (('arch', 'tiny'), ('chunk_tokens', 65536))),
    ),
))
