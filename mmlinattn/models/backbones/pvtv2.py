"""The PVT v2 layout (Wang et al., 2022): overlapping patch embeddings, no position
tables, a depthwise 3x3 convolution inside every MLP, and a LayerNorm closing each
stage. FLatten-PVTv2 builds on it; its attention comes from a factory, as for the
other bases.

Parameter names as released: ``patch_embed{i}.{proj,norm}``, ``block{i}.{j}.{norm1,
attn,norm2,mlp.fc1,mlp.dwconv.dwconv,mlp.fc2}``, ``norm{i}`` (i from 1).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ...parallel import conv2d, current_group
from ...utils.spill import new_map
from ..layers import ConvRows, Linear, OwnBands, row_bands
from .base import InLineBackbone

__all__ = ['PVTv2Backbone', 'OverlapPatchEmbed', 'DWConvMlp', 'PVTv2Block',
           'convert_pvtv2_checkpoint', 'PVTv2AttentionFactory']

#: Builds block ``j`` of stage ``i``'s attention: ``(i, j, dim, heads) -> module`` mapping
#: ``(B, H, W, C)`` to the same shape.
PVTv2AttentionFactory = Callable[[int, int, int, int], nn.Module]


class OverlapPatchEmbed(ConvRows, nn.Module):
    """Overlapping strided convolution (7x7 stride 4, or 3x3 stride 2; padding k // 2)
    and LayerNorm: ``(B, C_in, H, W) -> (B, ceil(H/s), ceil(W/s), C)``."""

    def __init__(self, in_channels: int, embed_dims: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'expected an NCHW input with {self.in_channels} channels, got shape '
                             f'{tuple(x.shape)} (check in_channels / the data pipeline)')
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    @property
    def row_conv(self) -> nn.Conv2d:
        return self.proj

    def after_conv(self, y: Tensor) -> Tensor:
        return self.norm(y)


class _DWConv(nn.Module):
    """The released ``dwconv.dwconv``: a depthwise 3x3 convolution on ``(B, H, W, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        group = current_group()
        if group is not None:  # one halo row of each neighbour
            return conv2d(self.dwconv, x.permute(0, 3, 1, 2), group).permute(0, 2, 3, 1)
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DWConvMlp(nn.Module):
    """PVT v2's MLP on a map: ``fc1``, depthwise 3x3, GELU, ``fc2``; ``(B, H, W, C)`` in and out."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.dwconv = _DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x))))))


class PVTv2Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on ``(B, H, W, C)`` maps, with
    :class:`DWConvMlp` (LayerNorm eps 1e-6, as released)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop: float = 0.,
                 drop_path: float = 0.) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_bands(self, x: Tensor, rows: int) -> Tensor:
        """Token-chunked inference (:class:`~mmlinattn.models.layers.chunked.OwnBands`):
        the attention's passes over bands (its ``chunk_plan``), then each band's output
        from the attention's output one row around it (the MLP's 3x3 convolution),
        which reads the attention's own halo beyond that."""
        h, w = x.shape[1:3]
        plan = self.attn.chunk_plan(h, w)
        for collect in plan.passes:
            for r0, r1 in row_bands(h, rows):
                collect(self.norm1(x[:, r0:r1]), r0, r1)
        out = new_map(x.shape, x.dtype, x.device)
        for r0, r1 in row_bands(h, rows):
            a0, a1 = max(0, r0 - 1), min(h, r1 + 1)
            lo, hi = max(0, a0 - plan.halo), min(h, a1 + plan.halo)
            x2 = x[:, a0:a1] + self.drop_path(plan.attend(self.norm1(x[:, lo:hi]), lo, a0, a1))
            out[:, r0:r1] = (x2 + self.drop_path(self.mlp(self.norm2(x2))))[:, r0 - a0:r1 - a0]
        return out

    def chunk_plan(self, x: Tensor) -> Optional[OwnBands]:
        return OwnBands(self.forward_bands) if hasattr(self.attn, 'chunk_plan') else None


def convert_pvtv2_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released PVT v2 classification keys -> backbone keys: the ``head`` is dropped (the
    stage norms ``norm1``-``norm4`` are part of the backbone)."""
    return {k: v for k, v in state_dict.items() if not k.startswith('head.')}


class PVTv2Backbone(InLineBackbone):
    """The PVT v2 layout with each block's attention from a :data:`PVTv2AttentionFactory`.

    The released stage norms (``norm1``-``norm4``) close every stage, before the next
    embedding, so they are always applied; ``out_norm`` adds none. Token-chunked
    inference runs each block's attention passes, then each band from one row of
    attention output around it (for the MLP's depthwise convolution); spatially
    sharded, that convolution reads one row of each neighbour.

    Input ``(B, in_channels, H, W)`` of any size; outputs ``(B, C_i, ceil(H / 4 / 2^i),
    ceil(W / 4 / 2^i))`` for i in out_indices.

    Its keyword arguments are passed on by name (the module docstring of
    :mod:`~mmlinattn.models.backbones.base`).
    """

    convert_checkpoint = staticmethod(convert_pvtv2_checkpoint)

    def __init__(self,
                 make_attention: PVTv2AttentionFactory,
                 *,
                 arch: Union[str, dict] = 'b0',
                 embed_dims: Optional[Sequence[int]] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 mlp_ratios: Optional[Sequence[float]] = None,
                 in_channels: int = 3,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_norm: bool = True,
                 **contract: Any) -> None:
        del out_norm  # accepted for the contract: the released stage norms always apply
        setting = self.resolve_arch(arch, embed_dims=embed_dims, depths=depths,
                                    num_heads=num_heads, mlp_ratios=mlp_ratios)
        dims = tuple(setting['embed_dims'])
        depths = tuple(setting['depths'])
        heads = tuple(setting['num_heads'])
        ratios = tuple(setting['mlp_ratios'])
        super().__init__(len(depths), out_norm=False, **contract)
        self.num_features = list(dims)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(self.num_stages):
            self.add_module(f'patch_embed{i + 1}', OverlapPatchEmbed(
                in_channels if i == 0 else dims[i - 1], dims[i], 7 if i == 0 else 3,
                4 if i == 0 else 2))
            start = sum(depths[:i])
            self.add_module(f'block{i + 1}', nn.ModuleList([
                PVTv2Block(dims[i], make_attention(i, j, dims[i], heads[i]), ratios[i], drop_rate,
                           dpr[start + j])
                for j in range(depths[i])
            ]))
            self.add_module(f'norm{i + 1}', nn.LayerNorm(dims[i], eps=1e-6))
        self._finish_init()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.patch_embed1]

    def _stage_modules(self, i: int) -> list[nn.Module]:
        mods = [getattr(self, f'block{i + 1}'), getattr(self, f'norm{i + 1}')]
        return mods + ([getattr(self, f'patch_embed{i + 1}')] if i > 0 else [])

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(self.num_stages):
            x = self.embed(getattr(self, f'patch_embed{i + 1}'), x)
            for block in getattr(self, f'block{i + 1}'):  # x: this stage's own map
                x = self.run_block(block, x, inplace=True)
            x = getattr(self, f'norm{i + 1}')(x)
            outs.append(x)
            x = x.permute(0, 3, 1, 2)
        return outs
