"""Agent-PVT: PVT with agent attention in every block (Agent Attention, Han et al.,
ECCV 2024), with the released layouts.

Every released model is ``AAAA`` with 9, 16, 49, 49 agents and no spatial reduction:
global agent attention over each whole map, ``q`` and ``kv`` projections, position
tables learned on the 224 px grid (256 px for the M-256 model) and resized to each map.
Dense prediction follows the authors' detectors and segmenters: more agents
(``agent_shapes``; their configs use ``(12, 12), (16, 16), (28, 28), (28, 28)``) with
the biases resized to the map and to the agent grid.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import AgentAttention, ClassifierHead, stage_agent_shapes
from .inline_pvt import PVTBackbone

__all__ = ['AgentPVT', 'AgentPVTClassifier', 'AGENT_PVT_ARCHS']

_COMMON = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               agent_num=(9, 16, 49, 49))
AGENT_PVT_ARCHS: dict[str, dict] = {
    'tiny': dict(_COMMON, depths=(2, 2, 2, 2)),
    'small': dict(_COMMON, depths=(3, 4, 6, 3)),
    'medium': dict(_COMMON, depths=(3, 4, 18, 3)),
    'large': dict(_COMMON, depths=(3, 8, 27, 3)),
}


class AgentPVT(PVTBackbone):
    """Agent-PVT backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'medium'``, ``'large'`` or a dict with
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``agent_num``.
        agent_num: agents per stage (squares) of the released model.
        agent_shapes: per stage, the agent grid at run time (None: the square of
            ``agent_num``, as the classifiers).
        pretrain_img_size: the classification size; position tables and biases are
            stored for the stage maps at it.
        kernel_size: of the depthwise convolution on v (3).
        Other arguments as :class:`~mmlinattn.models.backbones.InLinePVT`.

    Input ``(B, in_channels, H, W)`` of any size; output ``(B, C_i, H_i, W_i)`` maps at
    strides 4, 8, 16, 32.
    """

    arch_settings = AGENT_PVT_ARCHS
    # The authors' detection and segmentation backbones embed with unpadded strided
    # convolutions: an input side that is not a multiple of a stride loses its last
    # rows and columns (a 333 x 517 image gives 83 x 129 stage-1 maps, not 84 x 130).
    patch_remainder = 'drop'

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Optional[Sequence[int]]]] = None,
                 kernel_size: int = 3,
                 pretrain_img_size: int = 224,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 **layout: Any) -> None:
        agents = tuple(self.resolve_arch(arch, agent_num=agent_num)['agent_num'])
        shapes = stage_agent_shapes(len(agents), agent_shapes)

        def make_attention(i: int, j: int, dim: int, heads: int) -> nn.Module:
            side = pretrain_img_size // (4 * 2**i)
            return AgentAttention(dim, heads, agents[i], (side, side), shapes[i], kernel_size,
                                  qkv_bias, drop_rate, qkv_layout='q_kv')

        super().__init__(make_attention=make_attention, arch=arch,
                         pretrain_img_size=pretrain_img_size, drop_rate=drop_rate, **layout)


class AgentPVTClassifier(ClassifierHead, AgentPVT):
    """Agent-PVT with the released head: token mean of the last stage, ``head`` (no norm)."""

    head_norm_eps = None


register_family(BackboneFamily(
    name='agent_pvt', backbone=AgentPVT, classifier=AgentPVTClassifier,
    key_prefixes=('block1.', ), key_markers=('.attn.an_bias', ),
    first_conv='patch_embed1.proj',
    released=(
        ReleasedModel('agent_pvt_tiny', 'agent_pvt_t', 'tiny', 0.1),
        ReleasedModel('agent_pvt_small', 'agent_pvt_s', 'small', 0.1),
        ReleasedModel('agent_pvt_medium', 'agent_pvt_m', 'medium', 0.3),
        ReleasedModel('agent_pvt_medium_256', 'agent_pvt_m_256', 'medium', 0.3, 256, 0.9,
                      (('pretrain_img_size', 256), )),
        ReleasedModel('agent_pvt_large', 'agent_pvt_l', 'large', 0.3),
    ),
    benchmark=(
        BenchmarkVariant('agent-pvt-s', 'Agent-PVT-S, global agent attention (9, 16, 49, 49 '
                         'agents)', (('arch', 'small'), )),
        BenchmarkVariant('agent-pvt-s-chunked', 'Agent-PVT-S, token-chunked inference '
                         '(2^16 tokens a band)',
                         (('arch', 'small'), ('chunk_tokens', 65536))),
    ),
))
