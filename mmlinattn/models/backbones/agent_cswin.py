"""Agent-CSwin: CSwin Transformer whose agent stages use agent attention (Agent Attention,
Han et al., ECCV 2024), with the released layouts.

Every released model is ``AABB`` with 9, 16, 49, 49 agents a stage: at 224 px the
agent stages' split sizes (56, 28; 96, 48 at 384 px) equal their maps, so each agent
block is one branch over all channels and the whole map, as it is here at any size.
The ``B`` blocks are CSwin's softmax stripes (7; 12 at 384 px). An agent branch adds
CSwin's LePE (the depthwise 3x3 ``get_v`` on v) where Agent-Swin has its ``dwc``.

The authors released no detection or segmentation code for Agent-CSwin; for other
inputs the biases are resized to the map as their Swin and PVT detectors do
(:func:`~mmlinattn.models.layers.agent_bias_for`), and ``agent_shapes`` sets the
agent grids.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor, nn

from ...parallel import current_group, gathered
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import AgentBiasTables, ClassifierHead, stage_agent_shapes
from ..layers.chunked import SummedAttentionPlan
from ..layers.regions import check_map
from .inline_cswin import CSwinBackbone, stripe_branches

__all__ = ['AgentCSwin', 'AgentCSwinClassifier', 'AgentCSwinBranch', 'AGENT_CSWIN_ARCHS']

_AGENTS = (9, 16, 49, 49)
AGENT_CSWIN_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16),
                 attn_types='AABB', agent_num=_AGENTS),
    'small': dict(embed_dims=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16),
                  attn_types='AABB', agent_num=_AGENTS),
    'base': dict(embed_dims=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                 attn_types='AABB', agent_num=_AGENTS),
}


class AgentCSwinBranch(AgentBiasTables):
    """Agent attention over a whole map inside a CSwin block (which owns ``qkv`` and
    ``proj``), plus LePE.

    Args:
        dim: channels ``c`` of the branch; num_heads: its heads.
        agent_num, bias_size, agent_shape: as :class:`~mmlinattn.models.layers.AgentAttention`.

    ``forward(q, k, v: (B, H, W, c), x_mean) -> (B, H, W, c)`` (``x_mean`` unused: the
    branch interface of :class:`~.inline_cswin.CSwinBlock`). Parameters ``get_v`` and
    the bias tables, as released.
    """

    def __init__(self, dim: int, num_heads: int, agent_num: int, bias_size: tuple[int, int],
                 agent_shape: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = dim
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.add_agent_biases(num_heads, agent_num, bias_size, agent_shape)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, agents={self.agent_num} -> '
                f'{self.agent_shape}')

    def summed_plan(self, h: int, w: int, project_part: Callable[..., Tensor],
                    out: Callable[[Tensor], Tensor]) -> SummedAttentionPlan:
        """Token-chunked inference on an ``h x w`` map with the CSwin block's projections
        (``project_part``) and ``proj`` (``out``), LePE among the local terms."""
        return self.agent_plan(h, w, project_part, self.get_v, out)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x_mean: Optional[Tensor] = None) -> Tensor:
        check_map(self, q, self.dim)
        if current_group() is not None:
            # The agents pool the whole map: each rank attends the gathered map.
            return gathered(lambda q, k, v: self.forward(q, k, v), q, k, v)
        b, h, w, c = q.shape
        out = self.attend_agents(q.reshape(b, h * w, c), k.reshape(b, h * w, c),
                                 v.reshape(b, h * w, c), (h, w)).view(b, h, w, c)
        return out + self.get_v(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class AgentCSwin(CSwinBackbone):
    """Agent-CSwin backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``,
            ``depths``, ``num_heads``, ``attn_types`` (``A`` agent, ``B`` softmax
            stripes, ``M`` mixed) and ``agent_num`` (per stage, squares).
        agent_shapes: per stage, the agent grid at run time (None: the square of
            ``agent_num``, as the classifiers).
        pretrain_img_size: the classification size; the biases are stored for the
            stage maps at it (56, 28 at 224).
        split_size: stripe width of the ``B`` stages (7; 12 at 384 px).
        pad_mask: the padding of stripes masked (True, default: no detector of this
            family was released) or attended (False); see
            :class:`~mmlinattn.models.backbones.inline_cswin.CSwinBranch`.
        Other arguments as :class:`~mmlinattn.models.backbones.InLineCSwin`.

    Input ``(B, in_channels, H, W)`` of any size; outputs at strides 4, 8, 16, 32
    with ``C * 2^i`` channels.
    """

    arch_settings = AGENT_CSWIN_ARCHS
    attn_letters = 'AB'

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Optional[Sequence[int]]]] = None,
                 pretrain_img_size: int = 224,
                 split_size: int = 7,
                 pad_mask: bool = True,
                 attn_impl: str = 'auto',
                 **layout: Any) -> None:
        agents = tuple(self.resolve_arch(arch, agent_num=agent_num)['agent_num'])
        shapes = stage_agent_shapes(len(agents), agent_shapes)

        def make_branches(letter: str, i: int, j: int, dim: int, heads: int,
                          last_stage: bool) -> list[nn.Module]:
            if letter == 'A':
                side = pretrain_img_size // (4 * 2**i)
                return [AgentCSwinBranch(dim, heads, agents[i], (side, side), shapes[i])]
            return stripe_branches(dim, heads, split_size, last_stage, attn_impl, pad_mask)

        super().__init__(make_branches=make_branches, arch=arch, **layout)


class AgentCSwinClassifier(ClassifierHead, AgentCSwin):
    """Agent-CSwin with the released head: final ``norm`` (eps 1e-5), token mean, ``head``."""


register_family(BackboneFamily(
    name='agent_cswin', backbone=AgentCSwin, classifier=AgentCSwinClassifier,
    key_prefixes=('stage1_conv_embed.', ), key_markers=('.attns.0.an_bias', ),
    first_conv='stage1_conv_embed.0',
    released=(
        ReleasedModel('agent_cswin_tiny', 'agent_cswin_t', 'tiny', 0.2),
        ReleasedModel('agent_cswin_small', 'agent_cswin_s', 'small', 0.4),
        ReleasedModel('agent_cswin_base', 'agent_cswin_b', 'base', 0.5),
        # 384 px: agent split sizes 96-48 (global), softmax stripes 12.
        ReleasedModel('agent_cswin_base_384', 'agent_cswin_b_384', 'base', 0.7, 384, 1.0,
                      (('pretrain_img_size', 384), ('split_size', 12))),
    ),
    benchmark=(
        BenchmarkVariant('agent-cswin-t', 'Agent-CSwin-T, global agent attention in stages 1-2 '
                         '(9, 16 agents), softmax stripes after', (('arch', 'tiny'), )),
    ),
))
