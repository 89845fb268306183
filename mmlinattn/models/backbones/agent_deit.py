"""Agent-DeiT: DeiT whose first blocks use agent attention over the class token and the
patch map (Agent Attention, Han et al., ECCV 2024), with the released layouts.

Released: ``tiny`` (192 wide, 3 heads), ``small`` (384, 6), ``base`` (768, 12), depth
12, patch 16, at 224 px (``small`` also fine-tuned at 448). Blocks take their agent
count from pairs of blocks (blocks 0-1, 2-3, 4-9, 10-11: ``agent_num`` per "stage",
49 each for tiny and small, 81 for base); ``base`` has agent attention in its first
4 blocks only (``agent_layers``) and ViT's global softmax attention after.

The class token attends the agents and is a key of every agent, with its own biases
(``ac_bias``, ``ca_bias``); the agents are pooled from the patch queries, and the
depthwise convolution adds to the patch tokens only. For dense prediction the patch
maps of four blocks go through the same simple feature pyramid as InLine-DeiT.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import AgentAttention, GlobalSoftmaxAttention
from .inline_deit import DeiTBackbone, DeiTClassifierHead

__all__ = ['AgentDeiT', 'AgentDeiTClassifier', 'AGENT_DEIT_ARCHS', 'deit_block_agents']

AGENT_DEIT_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=192, depth=12, num_heads=3, pretrain_img_size=224,
                 agent_num=(49, 49, 49, 49), agent_layers=12),
    'small': dict(embed_dims=384, depth=12, num_heads=6, pretrain_img_size=224,
                  agent_num=(49, 49, 49, 49), agent_layers=12),
    'base': dict(embed_dims=768, depth=12, num_heads=12, pretrain_img_size=224,
                 agent_num=(81, 81, 81, 81), agent_layers=4),
}

#: The released rule: block ``i`` takes the agent count of "stage" ``_PAIR_STAGE[i // 2]``.
_PAIR_STAGE = (0, 1, 2, 2, 2, 3)


def deit_block_agents(agent_num: Sequence[int], depth: int) -> list[int]:
    """Agents of each block from the four per-"stage" counts (blocks 0-1, 2-3, 4-9,
    10-11 for depth 12; deeper stacks keep the last count)."""
    if len(agent_num) != 4:
        raise ValueError(f'agent_num must have four counts (blocks 0-1, 2-3, 4-9, 10-11), '
                         f'got {list(agent_num)}')
    return [int(agent_num[_PAIR_STAGE[min(i // 2, len(_PAIR_STAGE) - 1)]]) for i in range(depth)]


class AgentDeiT(DeiTBackbone):
    """Agent-DeiT as a dense-prediction backbone.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict (``embed_dims``, ``depth``,
            ``num_heads``, ``pretrain_img_size``, ``agent_num``, ``agent_layers``).
        agent_num: four agent counts (squares), overriding the arch's.
        agent_layers: how many leading blocks use agent attention (the rest: global
            softmax), overriding the arch's.
        agent_shape: the agent grid at run time (None: the square of each block's count).
        pretrain_img_size: the classification size (224; 448 for the fine-tuned small);
            the bias tables and the position embedding are stored for its patch grid.
        kernel_size: of the depthwise convolution on v (3).
        Other arguments as :class:`~mmlinattn.models.backbones.InLineDeiT`.

    Input ``(B, in_channels, H, W)`` of any size; with ``pyramid``, maps at strides
    4, 8, 16, 32 of ``embed_dims`` channels.
    """

    arch_settings = AGENT_DEIT_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_layers: Optional[int] = None,
                 agent_shape: Optional[Sequence[int]] = None,
                 pretrain_img_size: Optional[int] = None,
                 kernel_size: int = 3,
                 patch_size: int = 16,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 **layout: Any) -> None:
        setting = self.resolve_arch(arch, agent_num=agent_num, agent_layers=agent_layers,
                                    pretrain_img_size=pretrain_img_size)
        agents = deit_block_agents(setting['agent_num'], setting['depth'])
        side = setting['pretrain_img_size'] // patch_size
        shape = tuple(agent_shape) if agent_shape is not None else None

        def make_attention(i: int, dim: int, heads: int) -> nn.Module:
            if i < setting['agent_layers']:
                return AgentAttention(dim, heads, agents[i], (side, side), shape, kernel_size,
                                      qkv_bias, drop_rate, prefix_tokens=True)
            return GlobalSoftmaxAttention(dim, heads, qkv_bias, drop_rate)

        super().__init__(make_attention=make_attention, setting=setting, patch_size=patch_size,
                         drop_rate=drop_rate, **layout)


class AgentDeiTClassifier(DeiTClassifierHead, AgentDeiT):
    """Agent-DeiT with the released head: final ``norm`` (eps 1e-6), class token, ``head``."""


register_family(BackboneFamily(
    name='agent_deit', backbone=AgentDeiT, classifier=AgentDeiTClassifier,
    key_prefixes=('cls_token', ), key_markers=('.attn.an_bias', ),
    first_conv='patch_embed.proj', feature_stride=16,
    released=(
        ReleasedModel('agent_deit_tiny', 'agent_deit_t', 'tiny', 0.0),
        ReleasedModel('agent_deit_small', 'agent_deit_s', 'small', 0.1),
        ReleasedModel('agent_deit_small_448', 'agent_deit_s_448', 'small', 0.1, 448, 1.0,
                      (('pretrain_img_size', 448), )),
        ReleasedModel('agent_deit_base', 'agent_deit_b', 'base', 0.3),
    ),
    benchmark=(
        BenchmarkVariant('agent-deit-s', 'Agent-DeiT-S, global agent attention (49 agents), '
                         'simple pyramid', (('arch', 'small'), )),
    ),
))
