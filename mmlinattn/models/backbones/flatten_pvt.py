"""FLatten-PVT: PVT with focused linear attention in every block (FLatten Transformer,
Han et al., ICCV 2023), with the released layouts.

The authors released the T model's weights (and configs for S, M, L, here as archs).
Every one is ``LLLL`` without spatial reduction: global focused linear
attention over each whole map with ``q`` and ``kv`` projections; the positional
encoding of k and the position tables are learned on the 224 px grid and resized
bilinearly to each map (docs/sibling_attentions.md). The release has no detection or
segmentation code to follow.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

from torch import Tensor, nn

from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import ClassifierHead, FocusedLinearAttention
from .agent_pvt import AGENT_PVT_ARCHS
from .inline_pvt import PVTBackbone

__all__ = ['FLattenPVT', 'FLattenPVTClassifier', 'FLATTEN_PVT_ARCHS',
           'convert_flatten_pvt_checkpoint']

#: The released FLatten-PVT shapes are Agent-PVT's (PVT v1 with 1, 2, 5, 8 heads).
FLATTEN_PVT_ARCHS: dict[str, dict] = {
    name: {k: v for k, v in arch.items() if k != 'agent_num'}
    for name, arch in AGENT_PVT_ARCHS.items()
}


def convert_flatten_pvt_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released FLatten-PVT classification keys -> :class:`FLattenPVT` keys: the head
    and the final ``norm`` (never applied by the release) are dropped."""
    return {k: v for k, v in state_dict.items() if not k.startswith(('head.', 'norm.'))}


class FLattenPVT(PVTBackbone):
    """FLatten-PVT backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'medium'``, ``'large'`` or a dict with
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``.
        focusing_factor: ``p`` of the focusing map (3).
        kernel_size: of the depthwise convolution on v (5).
        Other arguments as :class:`~mmlinattn.models.backbones.InLinePVT`.

    Input ``(B, in_channels, H, W)`` of any size; output ``(B, C_i, H_i, W_i)`` maps at
    strides 4, 8, 16, 32.
    """

    arch_settings = FLATTEN_PVT_ARCHS
    convert_checkpoint = staticmethod(convert_flatten_pvt_checkpoint)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
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

        super().__init__(make_attention=make_attention, arch=arch,
                         pretrain_img_size=pretrain_img_size, drop_rate=drop_rate, **layout)


class FLattenPVTClassifier(ClassifierHead, FLattenPVT):
    """FLatten-PVT with the released head: token mean of the last stage, ``head``.

    The release builds a final ``norm`` (eps 1e-6) but never applies it (its call is
    commented out): the parameters are kept, for the layout, and unused as there.
    """

    head_norm_eps = 1e-6

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[-1]


register_family(BackboneFamily(
    name='flatten_pvt', backbone=FLattenPVT, classifier=FLattenPVTClassifier,
    key_prefixes=('pos_embed1', ), key_markers=('.attn.positional_encoding', ),
    first_conv='patch_embed1.proj',
    # Only the T model's weights were released; S/M/L are the authors' configs (archs
    # here), without checkpoints.
    released=(ReleasedModel('flatten_pvt_tiny', 'flatten_pvt_t', 'tiny', 0.1), ),
    benchmark=(
        BenchmarkVariant('flatten-pvt-s', 'FLatten-PVT-S, global focused linear attention',
                         (('arch', 'small'), )),
        BenchmarkVariant('flatten-pvt-s-chunked', 'FLatten-PVT-S, token-chunked inference '
                         '(2^16 tokens a band)',
                         (('arch', 'small'), ('chunk_tokens', 65536))),
    ),
))
