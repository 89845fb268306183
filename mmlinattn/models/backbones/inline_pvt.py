"""InLine-PVT: Pyramid Vision Transformer with global InLine attention in every block.

No spatial reduction (every key of the full map, linear cost); per-stage
position embeddings stored at the 224 px grid (56, 28, 14, 7 tokens a side)
and resized bilinearly (align_corners=False, as the reference) to the actual
map at run time, so any input size works.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ...ops import exporting
from ...ops.inline import KernelArg
from ...parallel import current_group, row_spans
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import ClassifierHead, InLineAttention, PatchEmbed, TransformerBlock
from .base import InLineBackbone

__all__ = ['PVTBackbone', 'InLinePVT', 'InLinePVTClassifier', 'convert_pvt_checkpoint',
           'PVT_ARCHS', 'PVTAttentionFactory', 'resize_pos_embed']

_PVT_COMMON = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                   mlp_ratios=(8, 8, 4, 4))
PVT_ARCHS: dict[str, dict] = {
    'tiny': dict(_PVT_COMMON, depths=(2, 2, 2, 2)),
    'small': dict(_PVT_COMMON, depths=(3, 4, 6, 3)),
    'medium': dict(_PVT_COMMON, depths=(3, 4, 18, 3)),
    'large': dict(_PVT_COMMON, depths=(3, 8, 27, 3)),
}


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``(1, gh*gw, C)`` embedding on a ``grid`` -> ``(1, h, w, C)`` by bilinear resizing."""
    c = pos_embed.shape[-1]
    pe = pos_embed.reshape(1, grid[0], grid[1], c)
    if tuple(size) == tuple(grid) and not exporting():  # resizing to the same size is exact
        return pe
    pe = F.interpolate(pe.permute(0, 3, 1, 2), size=size, mode='bilinear', align_corners=False)
    return pe.permute(0, 2, 3, 1)


def convert_pvt_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released InLine-PVT classification keys -> :class:`InLinePVT` keys (``head`` dropped).

    The released model has no output norms; the backbone's ``norm{i}`` start
    from their initialisation (identity up to the normalisation).
    """
    return {k: v for k, v in state_dict.items() if not k.startswith('head.')}


#: Builds block ``j`` of stage ``i``'s attention: ``(i, j, dim, heads) -> module`` mapping
#: ``(B, H, W, C)`` to the same shape, with ``q``/``kv`` projections (the PVT layout).
PVTAttentionFactory = Callable[[int, int, int, int], nn.Module]


class PVTBackbone(InLineBackbone):
    """The PVT layout: per stage a patch embedding, a position table learned on the
    ``pretrain_img_size`` grid and resized to each map, and pre-norm blocks whose
    attention a subclass builds (:class:`InLinePVT`, ``AgentPVT``, ``FLattenPVT``).

    Input ``(B, in_channels, H, W)`` of any size; output a tuple of
    ``(B, C_i, H_i, W_i)`` maps at strides 4, 8, 16, 32.

    Its keyword arguments are passed on by name (the module docstring of
    :mod:`~mmlinattn.models.backbones.base`).
    """

    convert_checkpoint = staticmethod(convert_pvt_checkpoint)
    pos_embed_interpolation = 'bilinear'  # as forward resizes them (reference behaviour)
    #: Sides that are not a multiple of a patch embedding's stride: ``'pad'`` (ceil) or
    #: ``'drop'`` (floor: PVT's released detection code); see
    #: :class:`~mmlinattn.models.layers.PatchEmbed`.
    patch_remainder: str = 'pad'

    def __init__(self,
                 make_attention: PVTAttentionFactory,
                 *,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[Sequence[int]] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 mlp_ratios: Optional[Sequence[float]] = None,
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 **contract: Any) -> None:
        setting = self.resolve_arch(arch, embed_dims=embed_dims, depths=depths,
                                    num_heads=num_heads, mlp_ratios=mlp_ratios)
        dims = tuple(setting['embed_dims'])
        depths = tuple(setting['depths'])
        heads = tuple(setting['num_heads'])
        ratios = tuple(setting['mlp_ratios'])
        super().__init__(len(depths), **contract)
        self.num_features = list(dims)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.pos_grids = []
        for i in range(self.num_stages):
            stride = 4 * 2**i
            grid = (pretrain_img_size // stride, pretrain_img_size // stride)
            self.pos_grids.append(grid)
            self.add_module(f'patch_embed{i + 1}',
                            PatchEmbed(in_channels if i == 0 else dims[i - 1], dims[i],
                                       4 if i == 0 else 2, norm_eps=1e-5,
                                       remainder=self.patch_remainder))
            pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dims[i]))
            trunc_normal_(pos, std=.02)
            self.register_parameter(f'pos_embed{i + 1}', pos)
            self.add_module(f'pos_drop{i + 1}', nn.Dropout(drop_rate))
            start = sum(depths[:i])
            blocks = [
                TransformerBlock(dims[i], make_attention(i, j, dims[i], heads[i]),
                                 mlp_ratio=ratios[i], drop=drop_rate, drop_path=dpr[start + j],
                                 norm_eps=1e-6)
                for j in range(depths[i])
            ]
            self.add_module(f'block{i + 1}', nn.ModuleList(blocks))
        self._add_out_norms(dims, eps=1e-6)
        self._finish_init()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.patch_embed1]

    def _stage_modules(self, i: int) -> list[nn.Module]:
        mods = [getattr(self, f'block{i + 1}')]
        if i > 0:
            mods.append(getattr(self, f'patch_embed{i + 1}'))
        norm = getattr(self, f'norm{i}', None)
        return mods + ([norm] if norm is not None else [])

    def _stage_params(self, i: int) -> list[nn.Parameter]:
        return [getattr(self, f'pos_embed{i + 1}')]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Channels-last outputs ``(B, H_i, W_i, C_i)`` of every stage."""
        outs = []
        for i in range(self.num_stages):
            x = self.embed(getattr(self, f'patch_embed{i + 1}'), x)
            h = x.shape[1] if current_group() is None else row_spans(x.shape[1],
                                                                      current_group()).total
            table = getattr(self, f'pos_embed{i + 1}')
            grid = self.pos_grids[i]
            # Chunked: added in place band by band (x is the embedding's own output).
            x = self.add_positions(
                x, lambda t=table, g=grid: t.reshape(1, *g, -1).permute(0, 3, 1, 2),
                (h, x.shape[2]),
                lambda rows, w=x.shape[2], t=table, g=grid: resize_pos_embed(t, g, (rows, w)))
            x = getattr(self, f'pos_drop{i + 1}')(x)
            for block in getattr(self, f'block{i + 1}'):  # x: this stage's own map
                x = self.run_block(block, x, inplace=True)
            outs.append(x)
            if i < self.num_stages - 1:
                x = x.permute(0, 3, 1, 2)  # NCHW view in channels-last memory: no copy
        return outs


class InLinePVT(PVTBackbone):
    """InLine-PVT backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'medium'``, ``'large'`` or a dict with
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``.
        embed_dims, depths, num_heads, mlp_ratios: override the arch's values.
        in_channels: input image channels.
        pretrain_img_size: image side the position embeddings were learned at
            (224); it fixes their stored grid.
        qkv_bias: bias of the ``q``/``kv`` projections.
        inline_window: None (default, global) or a window side for InLine.
        inline_operator: ``'inline'``; ``'linear'`` / ``'softmax'`` for ablations.
        kernel: ``phi`` of the attention (``'default'``: identity for InLine).
        attn_impl: attention implementation (``'auto'``; see
            :mod:`mmlinattn.ops.implementations`).
        drop_rate, drop_path_rate: regularisation (every block is InLine: there
            are no attention weights to drop, hence no ``attn_drop_rate``).
        out_indices, out_norm, frozen_stages, with_cp, chunk_tokens, pretrained, init_cfg:
            the OpenMMLab backbone contract (see :class:`InLineBackbone`).
        The layout and the contract are passed on by name to :class:`PVTBackbone`
        (``**layout``).

    Input ``(B, in_channels, H, W)`` of any size; output a tuple of
    ``(B, C_i, H_i, W_i)`` maps at strides 4, 8, 16, 32.
    """

    arch_settings = PVT_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 qkv_bias: bool = True,
                 inline_window: Optional[int] = None,
                 inline_operator: str = 'inline',
                 kernel: KernelArg = 'default',
                 attn_impl: str = 'auto',
                 drop_rate: float = 0.,
                 **layout: Any) -> None:

        def make_attention(i: int, j: int, dim: int, heads: int) -> nn.Module:
            return InLineAttention(dim, heads, qkv_layout='q_kv', window_size=inline_window,
                                   operator=inline_operator, kernel=kernel, impl=attn_impl,
                                   qkv_bias=qkv_bias, proj_drop=drop_rate)

        super().__init__(make_attention=make_attention, arch=arch, drop_rate=drop_rate, **layout)


class InLinePVTClassifier(ClassifierHead, InLinePVT):
    """InLine-PVT with the reference head: token mean of the last stage, ``head`` (no norm)."""

    head_norm_eps = None


register_family(BackboneFamily(
    name='pvt', backbone=InLinePVT, classifier=InLinePVTClassifier,
    key_prefixes=('block1.', ), key_markers=('.attn.residual.', ), first_conv='patch_embed1.proj',
    released=(
        ReleasedModel('inline_pvt_tiny', 'inline_pvt_t', 'tiny', 0.1),
        ReleasedModel('inline_pvt_small', 'inline_pvt_s', 'small', 0.1),
        ReleasedModel('inline_pvt_medium', 'inline_pvt_m', 'medium', 0.3),
        ReleasedModel('inline_pvt_large', 'inline_pvt_l', 'large', 0.3),
    ),
    benchmark=(
        BenchmarkVariant('inline-pvt-t', 'InLine-PVT-T, global InLine, no spatial reduction',
                         (('arch', 'tiny'), )),
        BenchmarkVariant('inline-pvt-s', 'InLine-PVT-S, global InLine, no spatial reduction',
                         (('arch', 'small'), )),
        BenchmarkVariant('inline-pvt-s-chunked', 'InLine-PVT-S, token-chunked inference '
                         '(2^16 tokens a band)', (('arch', 'small'), ('chunk_tokens', 65536))),
        BenchmarkVariant('pvt-s-global-linear', 'the same layout, global plain linear '
                         'attention (ReLU kernel)',
                         (('arch', 'small'), ('inline_operator', 'linear'))),
    ),
))
