"""Agent-Swin: Swin Transformer whose agent stages use agent attention (Agent Attention,
Han et al., ECCV 2024), with the released layouts.

Released strings: ``tiny`` AAAB, ``small`` AABB, ``base`` AAMB2 (2 agent blocks in
stage 3), with 9, 16, 49, 49 agents a stage. At their classification size the agent
stages attend globally (window 56 at 224 px covers each map), as they do here at any
size; the ``B`` blocks are Swin's shifted 7x7 window softmax (12 at 384 px, 9 at 288).

Dense prediction follows the released detectors and segmenters: global agent stages
over the whole map, more agents (``agent_shapes``, ``(9, 9), (12, 12), (14, 14), (7, 7)``
in their configs), and the biases resized to the map and to the agent grid.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import AgentAttention, ClassifierHead, stage_agent_shapes
from .inline_swin import SwinBackbone, swin_softmax_attention

__all__ = ['AgentSwin', 'AgentSwinClassifier', 'AGENT_SWIN_ARCHS']

_AGENTS = (9, 16, 49, 49)
AGENT_SWIN_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 attn_types='AAAB', agent_num=_AGENTS),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                  attn_types='AABB', agent_num=_AGENTS),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 attn_types='AAMB2', agent_num=_AGENTS),
}


class AgentSwin(SwinBackbone):
    """Agent-Swin backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``,
            ``depths``, ``num_heads``, ``attn_types`` (``A`` agent, ``B`` window
            softmax, ``M`` mixed) and ``agent_num`` (per stage, squares).
        agent_shapes: per stage, the agent grid at run time (None: the square of
            ``agent_num``, as the classifiers).
        pretrain_img_size: the classification size; the biases are stored for the
            stage maps at it (56, 28, 14, 7 at 224).
        kernel_size: of the depthwise convolution on v (3).
        softmax_window: window of the ``B`` blocks (7).
        pad_mask: False (default) as the authors' detection and segmentation backbones
            compute the ``B`` blocks: the windows' zero padding is attended and every
            other block shifted at every map size, so their released detectors give
            their features; True masks the padding (see
            :class:`~mmlinattn.models.layers.WindowSoftmaxAttention`).
        Other arguments as :class:`~mmlinattn.models.backbones.InLineSwin`.

    Input ``(B, in_channels, H, W)`` of any size; output ``(B, C_i, H_i, W_i)`` maps
    at strides 4, 8, 16, 32 for i in out_indices.
    """

    arch_settings = AGENT_SWIN_ARCHS
    attn_letters = 'AB'

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Optional[Sequence[int]]]] = None,
                 pretrain_img_size: int = 224,
                 kernel_size: int = 3,
                 patch_size: int = 4,
                 qkv_bias: bool = True,
                 softmax_window: int = 7,
                 pad_mask: bool = False,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 **layout: Any) -> None:
        agents = tuple(self.resolve_arch(arch, agent_num=agent_num)['agent_num'])
        shapes = stage_agent_shapes(len(agents), agent_shapes)

        def make_attention(letter: str, i: int, j: int, dim: int, heads: int) -> nn.Module:
            if letter == 'A':
                side = pretrain_img_size // (patch_size * 2**i)
                return AgentAttention(dim, heads, agents[i], (side, side), shapes[i], kernel_size,
                                      qkv_bias, drop_rate)
            return swin_softmax_attention(dim, heads, softmax_window, j, qkv_bias,
                                          attn_drop_rate, drop_rate, pad_mask)

        super().__init__(make_attention=make_attention, arch=arch, patch_size=patch_size,
                         drop_rate=drop_rate, **layout)


class AgentSwinClassifier(ClassifierHead, AgentSwin):
    """Agent-Swin with the released head: final ``norm``, token mean, ``head``. Its
    ``B`` blocks follow the released classifiers (``pad_mask=True``: a map within one
    window, as stage 4 at 224 px, is attended unshifted)."""

    def __init__(self, arch: Union[str, dict] = 'tiny', num_classes: int = 1000,
                 pad_mask: bool = True, **kwargs: Any) -> None:
        super().__init__(arch, num_classes, pad_mask=pad_mask, **kwargs)


register_family(BackboneFamily(
    name='agent_swin', backbone=AgentSwin, classifier=AgentSwinClassifier,
    key_prefixes=('layers.', ), key_markers=('.attn.an_bias', ), first_conv='patch_embed.proj',
    released=(
        ReleasedModel('agent_swin_tiny', 'agent_swin_t', 'tiny', 0.2),
        ReleasedModel('agent_swin_small', 'agent_swin_s', 'small', 0.3),
        ReleasedModel('agent_swin_base', 'agent_swin_b', 'base', 0.5),
        # Fine-tuned at 288 (window 72) and 384 (window 96): the agent stages stay
        # global, the softmax windows are max(7, window // 8).
        ReleasedModel('agent_swin_small_288', 'agent_swin_s_288', 'small', 0.3, 288, 1.0,
                      (('pretrain_img_size', 288), ('softmax_window', 9))),
        ReleasedModel('agent_swin_base_384', 'agent_swin_b_384', 'base', 0.5, 384, 1.0,
                      (('pretrain_img_size', 384), ('softmax_window', 12))),
    ),
    benchmark=(
        BenchmarkVariant('agent-swin-t', 'Agent-Swin-T, global agent attention in stages 1-3 '
                         '(9, 16, 49 agents)', (('arch', 'tiny'), )),
        BenchmarkVariant('agent-swin-t-chunked', 'Agent-Swin-T, token-chunked inference '
                         '(2^16 tokens a band)',
                         (('arch', 'tiny'), ('chunk_tokens', 65536))),
    ),
))
