"""InLine-DeiT: the released InLine-DeiT models (plain ViTs) as a dense-prediction backbone.

The model is called DeiT everywhere (class, timm names, checkpoints, configs);
``InLineViT``, ``VIT_ARCHS`` and ``convert_vit_checkpoint`` are older aliases.
Released layouts (docs/method.md): ``tiny`` 192 wide, 6 heads, 224 px; ``small`` 320
wide, 10 heads, 288 px; ``base`` 384 wide, 12 heads, 448 px; depth 12, patch
16, LayerNorm eps 1e-6, class token plus ``pos_embed``. InLine counts the class
token (it is in N and in the means); the local 3x3 term runs on the patch
tokens only. For dense prediction the patch-token maps of four blocks
(``out_indices``, default 3, 5, 7, 11) go through a simple feature pyramid
(ViTDet-style: two and one stride-2 transposed convolutions, identity, max
pooling) to strides 4, 8, 16, 32, all ``embed_dims`` channels.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from torch import Tensor, nn

from ...ops import exporting
from ...ops.inline import KernelArg
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import (
    ClassifierHead,
    InLineAttention,
    PatchEmbed,
    TransformerBlock,
    band_rows,
    fill_rows,
)
from .base import InLineBackbone

__all__ = ['DeiTBackbone', 'DeiTAttentionFactory', 'DeiTClassifierHead', 'InLineDeiT',
           'InLineDeiTClassifier', 'DeiTBlock', 'SimpleFeaturePyramid',
           'convert_deit_checkpoint', 'DEIT_ARCHS']

DEIT_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=192, depth=12, num_heads=6, pretrain_img_size=224),
    'small': dict(embed_dims=320, depth=12, num_heads=10, pretrain_img_size=288),
    'base': dict(embed_dims=384, depth=12, num_heads=12, pretrain_img_size=448),
}


class DeiTBlock(TransformerBlock):
    """Pre-norm block on ``(B, 1 + h*w, C)`` tokens whose first token is the class token."""

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn.forward_tokens(self.norm1(x), hw, num_prefix=1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SimpleFeaturePyramid(nn.Module):
    """Stride-16 maps -> strides 4, 8, 16, 32 (``fpn{0..3}``), channels unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn0 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), LayerNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn1 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn2 = nn.Identity()
        self.fpn3 = nn.MaxPool2d(2, ceil_mode=True)

    #: Output rows per input row of each level (fpn3 halves).
    scales = (4, 2, 1, 0.5)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [getattr(self, f'fpn{i}')(m) for i, m in enumerate(maps)]

    def forward_chunked(self, maps: Sequence[Tensor], chunk_tokens: int) -> list[Tensor]:
        """:meth:`forward` in bands of output rows: every level maps disjoint input rows
        to disjoint output rows (stride-2 kernels of 2, pointwise norm and GELU)."""
        outs = []
        for i, m in enumerate(maps):
            level, scale = getattr(self, f'fpn{i}'), self.scales[i]
            height = math.ceil(m.shape[2] * scale)
            step = int(max(1, scale))
            rows = band_rows(chunk_tokens, math.ceil(m.shape[3] * scale), step)
            outs.append(fill_rows(height, rows, lambda r0, r1, m=m, level=level, scale=scale:
                                  level(m[:, :, int(r0 / scale):math.ceil(r1 / scale)]),
                                  dim=2))
        return outs


def convert_deit_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released InLine-DeiT keys -> :class:`InLineDeiT` keys: the final ``norm`` becomes the
    last block's tap norm (``norm11`` for depth 12); ``head`` is dropped."""
    depth = 1 + max((int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.')),
                    default=11)
    out = {}
    for k, v in state_dict.items():
        if k.startswith('head.'):
            continue
        out[f'norm{depth - 1}.' + k[len('norm.'):] if k.startswith('norm.') else k] = v
    return out


#: Builds block ``i``'s attention: ``(i, dim, heads) -> module`` with
#: ``forward_tokens(tokens (B, P + h*w, C), (h, w), P)`` (P class tokens).
DeiTAttentionFactory = Callable[[int, int, int], nn.Module]


class DeiTBackbone(InLineBackbone):
    """The DeiT layout (patch embedding, class token, position embedding, a stack of
    pre-norm blocks) with each block's attention from a factory, its tapped patch maps
    through a simple feature pyramid.

    Subclasses (:class:`InLineDeiT`, ``AgentDeiT``) declare their arch table (with
    ``embed_dims``, ``depth``, ``num_heads``, ``pretrain_img_size``) and pass a
    :data:`DeiTAttentionFactory`. The other arguments are :class:`InLineDeiT`'s.

    Its keyword arguments are passed on by name (the module docstring of
    :mod:`~mmlinattn.models.backbones.base`).
    """

    convert_checkpoint = staticmethod(convert_deit_checkpoint)

    def __init__(self,
                 make_attention: DeiTAttentionFactory,
                 *,
                 setting: dict,
                 in_channels: int = 3,
                 patch_size: int = 16,
                 mlp_ratio: float = 4.,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_indices: Sequence[int] = (3, 5, 7, 11),
                 pyramid: bool = True,
                 **contract: Any) -> None:
        depth, dim = setting['depth'], setting['embed_dims']
        super().__init__(num_stages=depth, out_indices=out_indices, **contract)
        if pyramid and len(self.out_indices) != 4:
            raise ValueError(f'pyramid=True needs four out_indices (strides 4-32), got '
                             f'{self.out_indices}')
        self.embed_dims = dim
        self.num_features = [dim] * depth
        self.grid = setting['pretrain_img_size'] // patch_size
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size, norm=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            DeiTBlock(dim, make_attention(i, dim, setting['num_heads']), mlp_ratio=mlp_ratio,
                      drop=drop_rate, drop_path=dpr[i], norm_eps=1e-6)
            for i in range(depth)
        ])
        self._add_out_norms(self.num_features, eps=1e-6)
        self.pyramid = SimpleFeaturePyramid(dim) if pyramid else None
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self._finish_init()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.patch_embed]

    def _stage_params(self, i: int) -> list[nn.Parameter]:
        return [self.cls_token, self.pos_embed] if i == 0 else []

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.frozen_stages >= 0:  # the stem owns the token and position embeddings
            self.cls_token.requires_grad = False
            self.pos_embed.requires_grad = False

    def _stage_modules(self, i: int) -> list[nn.Module]:
        norm = getattr(self, f'norm{i}', None)
        return [self.blocks[i]] + ([norm] if norm is not None else [])

    def position_embedding(self, h: int, w: int) -> Tensor:
        """``(1, 1 + h*w, C)``: the class token's, then the patch grid's resized bicubically."""
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) != (self.grid, self.grid) or exporting():  # same size: resizing is exact
            grid_pos = grid_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid_pos = F.interpolate(grid_pos, size=(h, w), mode='bicubic', align_corners=False)
            grid_pos = grid_pos.flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int], list[Tensor]]:
        """Tokens after the last block, the patch grid, and the tapped patch maps."""
        x = self.embed(self.patch_embed, x)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        # Spatially sharded, this rank's rows of the grid's table (after the class token's).
        pos = self.rows_of_whole(lambda rows: self.position_embedding(rows, w)[:, 1:]
                                 .reshape(1, rows, w, c), h).reshape(1, h * w, c)
        x = self.pos_drop(x + torch.cat([self.pos_embed[:, :1], pos], dim=1))
        taps = []
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, hw=(h, w))
            if i in self.out_indices:
                taps.append(x[:, 1:].reshape(b, h, w, c))
        return x, (h, w), taps

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        taps = dict(zip(self.out_indices, self.forward_tokens(x)[2]))
        return [taps.get(i) for i in range(self.num_stages)]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        outs = list(super().forward(x))
        if self.pyramid is not None:
            outs = (self.pyramid.forward_chunked(outs, self.chunk_tokens) if self.chunking
                    else self.pyramid(outs))
        return tuple(outs)


class InLineDeiT(DeiTBackbone):
    """InLine-DeiT (the released layouts) as a dense-prediction backbone.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict (``embed_dims``,
            ``depth``, ``num_heads``, ``pretrain_img_size``).
        in_channels, patch_size (16), mlp_ratio, qkv_bias, drop_rate, drop_path_rate.
        inline_window: must be None: the class token attends to every patch, so
            the attention is global (it is accepted so that every family takes
            the same arguments, and refused with the reason otherwise).
        inline_operator: ``'inline'``; ``'linear'`` / ``'softmax'`` for ablations.
        kernel: ``phi`` of the attention (``'default'``: identity for InLine).
        attn_impl: attention implementation (``'auto'``; see
            :mod:`mmlinattn.ops.implementations`).
        out_indices: the blocks whose patch maps are returned (four of them with
            ``pyramid``), default (3, 5, 7, 11).
        pyramid: map the four taps to strides 4/8/16/32 (True) or return them
            all at stride 16 (False; e.g. for UperNet with its own resizing).
        out_norm: LayerNorm ``norm{i}`` on each tap (the last block's is the
            released final ``norm``).
        frozen_stages: -1 none; 0 the patch embedding, class token and position
            embedding; k also blocks 0..k-1.
        with_cp, chunk_tokens, pretrained, init_cfg: the OpenMMLab backbone contract.
        The layout and the contract are passed on by name to :class:`DeiTBackbone`
        (``**layout``).

    Position embeddings (stored for the arch's pre-training size) are resized
    bicubically to the input's patch grid; any input size works (padded to a
    multiple of the patch size).
    """

    arch_settings = DEIT_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 inline_window: Optional[int] = None,
                 inline_operator: str = 'inline',
                 kernel: KernelArg = 'default',
                 attn_impl: str = 'auto',
                 **layout: Any) -> None:
        if inline_window is not None:
            raise ValueError(f'InLineDeiT: inline_window={inline_window} is not possible: the '
                             'class token attends to every patch token, so InLine-DeiT attends '
                             'globally; windowed InLine needs a pyramid backbone (InLineSwin, '
                             'InLinePVT, InLineCSwin)')
        setting = self.resolve_arch(arch)

        def make_attention(i: int, dim: int, heads: int) -> nn.Module:
            return InLineAttention(dim, heads, qkv_layout='qkv', operator=inline_operator,
                                   kernel=kernel, impl=attn_impl, qkv_bias=qkv_bias,
                                   proj_drop=drop_rate)

        super().__init__(make_attention=make_attention, setting=setting, drop_rate=drop_rate,
                         **layout)


class DeiTClassifierHead(ClassifierHead):
    """The released DeiT head for ``Classifier(DeiTClassifierHead, DeiT backbone)``: final
    ``norm`` (eps 1e-6) on the tokens, the class token, ``head``."""

    head_norm_eps = 1e-6

    def __init__(self, arch: Union[str, dict] = 'tiny', num_classes: int = 1000,
                 **kwargs: Any) -> None:
        super().__init__(arch, num_classes, pyramid=False, **kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> normed tokens ``(B, 1 + h*w, C)``."""
        return self.norm(self.forward_tokens(x)[0])

    def pool(self, x: Tensor) -> Tensor:
        """The class token."""
        return x[:, 0]


class InLineDeiTClassifier(DeiTClassifierHead, InLineDeiT):
    """InLine-DeiT with the reference head: final ``norm`` (eps 1e-6), class token, ``head``."""


register_family(BackboneFamily(
    name='deit', backbone=InLineDeiT, classifier=InLineDeiTClassifier,
    key_prefixes=('cls_token', ), key_markers=('.attn.residual.', ),
    first_conv='patch_embed.proj', feature_stride=16,
    # The released models' image sides are those of their position embeddings.
    released=(
        ReleasedModel('inline_deit_tiny', 'inline_deit_t', 'tiny', 0.1, 224),
        ReleasedModel('inline_deit_small', 'inline_deit_s', 'small', 0.1, 288),
        ReleasedModel('inline_deit_base', 'inline_deit_b', 'base', 0.1, 448),
    ),
    benchmark=(
        BenchmarkVariant('inline-deit-s', 'InLine-DeiT-S, global InLine, simple pyramid',
                         (('arch', 'small'), )),
        BenchmarkVariant('deit-s-global-softmax', 'the same layout, global softmax attention',
                         (('arch', 'small'), ('inline_operator', 'softmax'))),
    ),
    aliases=('InLineViT', ),
))

#: Older names of the same model.
InLineViT = InLineDeiT
VIT_ARCHS = DEIT_ARCHS
convert_vit_checkpoint = convert_deit_checkpoint
