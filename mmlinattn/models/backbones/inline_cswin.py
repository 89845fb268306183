"""InLine-CSwin: CSwin Transformer whose InLine stages use global InLine attention.

Released layouts (docs/method.md): ``tiny`` C=64, depths 2-4-18-1, heads 2-4-8-16;
``small`` C=64, 3-6-29-2; ``base`` C=96, 3-6-29-2, heads 4-8-16-32; all IISS.
At 224 px the InLine stages' split sizes (56, 28) equal their maps, so each
InLine block is one branch over all channels and the whole map; we keep that
(global) at every input size. Softmax stages are CSwin's cross-shaped stripes:
two branches over half the channels each, vertical and horizontal stripes of
``split_size`` (7) across the whole map, and one branch over the whole map in
the last stage. Every branch adds the locally-enhanced positional encoding
(LePE: a depthwise 3x3 ``get_v`` on v); InLine branches also add the local
residual, with taps from the mean of the block input before ``norm1``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ...ops import QKV_ATTENTIONS, SUMMED_ATTENTIONS, resolve_kernel
from ...ops.inline import KernelArg
from ...parallel import SpatialGroup, conv2d, current_group, gathered, mean_tokens, summing_over
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import (
    BandPlan,
    ClassifierHead,
    ConvRows,
    InLineBlockParts,
    Linear,
    LocalResidual,
    Mlp,
    RegionGrid,
    SummedAttentionPlan,
    attend_heads,
    linear_slice,
    parse_attn_types,
    window_region,
)
from .base import InLineBackbone

__all__ = ['CSwinBackbone', 'InLineCSwin', 'InLineCSwinClassifier', 'CSwinBlock', 'CSwinBranch',
           'BranchFactory', 'stripe_branches', 'ConvStem', 'ConvMerge',
           'convert_cswin_checkpoint', 'CSWIN_ARCHS']

CSWIN_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), attn_types='IISS'),
    'small': dict(embed_dims=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16),
                  attn_types='IISS'),
    'base': dict(embed_dims=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                 attn_types='IISS'),
}


class CSwinBranch(nn.Module):
    """One attention branch over a channel slice of a CSwin block.

    Args:
        dim: channels of the slice.
        num_heads: heads of the slice.
        kind: ``'inline'`` (InLine attention + local residual) or ``'softmax'``.
        stripe: None for the whole map; ``(0, s)`` for full-height stripes ``s``
            wide, ``(1, s)`` for full-width stripes ``s`` high.
        operator: the attention of an ``'inline'`` branch: ``'inline'``, or
            ``'linear'``/``'softmax'`` for ablations with the same parameters.
        kernel: ``phi`` of an ``'inline'`` branch (``'default'``: the operator's own).
        window: an ``'inline'`` branch's window side (None: the whole map).
        impl: the attention implementation (``'auto'``).
        pad_mask: maps not divisible by the stripe or window are zero-padded (q, k and v);
            the padding is masked out of the attention and the local residual (True) or
            attended like the map's own tokens (False).

    ``forward(q, k, v: (B, H, W, dim), x_mean: (B, dim)) -> (B, H, W, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, kind: str,
                 stripe: Optional[tuple[int, int]] = None, operator: str = 'inline',
                 kernel: KernelArg = 'default', window: Optional[int] = None,
                 impl: str = 'auto', pad_mask: bool = True) -> None:
        super().__init__()
        if kind not in ('inline', 'softmax'):
            raise ValueError(f"kind must be 'inline' or 'softmax', got {kind!r}")
        if operator not in QKV_ATTENTIONS:
            raise ValueError(f'unknown attention operator {operator!r}; expected one of '
                             f'{sorted(QKV_ATTENTIONS)}')
        if kind == 'softmax' and window is not None:
            raise ValueError('a softmax branch attends in stripes (stripe=...), not windows')
        self.num_heads = num_heads
        self.kind = kind
        self.attention = operator if kind == 'inline' else 'softmax'
        self.kernel = resolve_kernel(self.attention, kernel if kind == 'inline' else 'default')
        self.impl = impl
        self.stripe = stripe
        self.window = window
        self.pad_mask = pad_mask
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.residual = LocalResidual(dim, num_heads) if kind == 'inline' else None

    def extra_repr(self) -> str:
        return (f'kind={self.kind}, stripe={self.stripe}, window={self.window}, '
                f'pad_mask={self.pad_mask}')

    def region(self, h: int, w: int) -> Optional[tuple[Optional[int], Optional[int]]]:
        """The attended region for an ``h x w`` map (None: the whole map; a stripe spans
        the map along the axis given as None)."""
        if self.stripe is not None:
            orientation, size = self.stripe
            return (None, size) if orientation == 0 else (size, None)
        return window_region(self.window, h, w)

    def forward_sharded(self, q: Tensor, k: Tensor, v: Tensor, x_mean: Tensor,
                        group: SpatialGroup) -> Tensor:
        """A global summed branch on this rank's rows: statistics reduced over the group,
        LePE and the local residual with one halo row from each neighbour."""
        b, h, w, c = q.shape
        group.stats.layers.append((h * w * group.size, c))
        lepe = conv2d(self.get_v, v.permute(0, 3, 1, 2), group).permute(0, 2, 3, 1)
        out = attend_heads(self.attention, q.reshape(b, h * w, c), k.reshape(b, h * w, c),
                           v.reshape(b, h * w, c), self.num_heads, None, self.kernel, self.impl,
                           summing_over(group)).view(b, h, w, c)
        if self.residual is not None:
            out = out + self.residual(v, x_mean)
        return out + lepe

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x_mean: Tensor) -> Tensor:
        group = current_group()
        if group is not None:
            if self.stripe is None and self.window is None and \
                    self.attention in SUMMED_ATTENTIONS:
                return self.forward_sharded(q, k, v, x_mean, group)
            # Stripes, windows and softmax: on the gathered map (see docs/spatial_parallel.md).
            return gathered(lambda q, k, v: self.forward(q, k, v, x_mean), q, k, v)
        b, h, w, c = q.shape
        grid = RegionGrid(b, h, w, self.region(h, w), q.device)
        q, k, v = (grid.split(t) for t in (q, k, v))  # (B*nR, wh, ww, c), zero-padded
        valid = grid.valid if self.pad_mask else None
        # LePE: depthwise 3x3 on v within each region (zero padding at region borders).
        lepe = self.get_v(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        nr, wh, ww = v.shape[:3]
        out = attend_heads(self.attention, q.reshape(nr, wh * ww, c), k.reshape(nr, wh * ww, c),
                           v.reshape(nr, wh * ww, c), self.num_heads,
                           grid.mask if self.pad_mask else None, self.kernel,
                           self.impl).view(nr, wh, ww, c)
        if self.residual is not None:
            # Taps from the mean of the block input (before norm1), as released.
            taps_from = x_mean.repeat_interleave(grid.num_regions, dim=0)
            out = out + self.residual(v, taps_from, valid)
        return grid.merge(out + lepe)


def stripe_branches(dim: int, num_heads: int, split_size: int, last_stage: bool,
                    impl: str = 'auto', pad_mask: bool = True) -> list[CSwinBranch]:
    """CSwin's softmax attention: two branches over half the channels and heads each,
    full-height and full-width stripes ``split_size`` across; one branch over the
    whole map in the last stage. ``pad_mask``: see :class:`CSwinBranch`."""
    if last_stage:
        return [CSwinBranch(dim, num_heads, 'softmax', impl=impl)]
    return [CSwinBranch(dim // 2, num_heads // 2, 'softmax', (i, split_size), impl=impl,
                        pad_mask=pad_mask) for i in range(2)]


#: Builds block ``j`` of stage ``i``'s attention branches from its letter:
#: ``(letter, i, j, dim, heads, last_stage) -> branches``, each mapping q, k, v
#: ``(B, H, W, c)`` slices (and the block input's channel mean ``(B, c)``) to
#: ``(B, H, W, c)``; one branch takes all channels, two take half each.
BranchFactory = Callable[[str, int, int, int, int, bool], list[nn.Module]]


class CSwinBlock(nn.Module):
    """CSwin block: block-level ``qkv`` and ``proj``, one or two attention branches.

    ``forward(x: (B, H, W, C)) -> (B, H, W, C)``. Parameter names as released:
    ``qkv``, ``norm1``, ``proj``, ``attns.{0,1}.*``, ``mlp``, ``norm2``.
    """

    def __init__(self, dim: int, branches: Sequence[nn.Module], mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop: float = 0., drop_path: float = 0.) -> None:
        super().__init__()
        if len(branches) not in (1, 2):
            raise ValueError(f'a CSwin block has one or two attention branches, got '
                             f'{len(branches)}')
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.attns = nn.ModuleList(branches)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm2 = nn.LayerNorm(dim)

    def chunk_plan(self, x: Tensor
                   ) -> Optional[Union[InLineBlockParts, BandPlan, SummedAttentionPlan]]:
        """Chunked inference (:mod:`mmlinattn.models.layers.chunked`): two passes for a
        global InLine block; bands of whole windows (with the mean of the whole map
        for the taps) when windowed; a branch's own passes when it has a
        ``summed_plan`` (agent, focused); None (run whole) for the softmax stripes."""
        branch = self.attns[0]
        c = x.shape[-1]
        if len(self.attns) == 1 and hasattr(branch, 'summed_plan'):
            plan = branch.summed_plan(
                x.shape[1], x.shape[2],
                lambda t, part, count=1: linear_slice(self.qkv, t, part * c, (part + count) * c),
                lambda a: self.proj_drop(self.proj(a)))
            return dataclasses.replace(plan, norm1=self.norm1, norm2=self.norm2, mlp=self.mlp,
                                       drop_path=self.drop_path)
        if len(self.attns) != 1 or not isinstance(branch, CSwinBranch) or \
                branch.kind != 'inline' or branch.attention != 'inline':
            return None
        region = branch.region(*x.shape[1:3])
        if region is not None:
            return BandPlan(region[0], dict(x_mean=x.mean(dim=(1, 2))))

        def kv(t: Tensor) -> tuple[Tensor, Tensor]:
            return linear_slice(self.qkv, t, c, 3 * c).unflatten(-1, (2, c)).unbind(-2)

        return InLineBlockParts(
            norm1=self.norm1, q=lambda t: linear_slice(self.qkv, t, 0, c), kv=kv,
            v=lambda t: linear_slice(self.qkv, t, 2 * c, 3 * c),
            proj=lambda a: self.proj_drop(self.proj(a)), norm2=self.norm2, mlp=self.mlp,
            drop_path=self.drop_path, num_heads=branch.num_heads, kernel=branch.kernel,
            residual=branch.residual, lepe=branch.get_v, taps_from_input=True)

    def forward(self, x: Tensor, x_mean: Optional[Tensor] = None) -> Tensor:
        """``x (B, H, W, C)``; ``x_mean (B, C)`` overrides the mean of ``x`` the InLine
        taps are predicted from (chunked inference passes the whole map's)."""
        b, h, w, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, h, w, 3, c).unbind(3)
        group = current_group()
        if x_mean is None:  # the block input, before norm1, as released
            x_mean = x.mean(dim=(1, 2)) if group is None else \
                mean_tokens(x.reshape(b, h * w, c), group)
        if len(self.attns) == 1:
            out = self.attns[0](q, k, v, x_mean)
        else:
            half = c // 2

            def branches(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return torch.cat([
                    branch(q[..., sl], k[..., sl], v[..., sl], x_mean[..., sl])
                    for branch, sl in zip(self.attns, (slice(0, half), slice(half, c)))
                ], dim=-1)

            # Stripes span the map: spatially sharded, they attend the gathered map.
            out = gathered(branches, q, k, v)
        x = x + self.drop_path(self.proj_drop(self.proj(out)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _ToChannelsLast(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H, W, C)`` (no parameters; keeps the released indices)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ConvStem(ConvRows, nn.Sequential):
    """CSwin's stem: 7x7 stride-4 convolution, channels last, LayerNorm (``0``, ``2``
    as released). ``(B, C_in, H, W) -> (B, H/4, W/4, C)``."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__(nn.Conv2d(in_channels, dim, 7, 4, 2), _ToChannelsLast(), nn.LayerNorm(dim))

    @property
    def row_conv(self) -> nn.Conv2d:
        return self[0]

    def after_conv(self, y: Tensor) -> Tensor:
        return self[2](y)


class ConvMerge(ConvRows, nn.Module):
    """CSwin's stage merge: 3x3 stride-2 convolution then LayerNorm, channels last."""

    channels_last_input = True

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    @property
    def row_conv(self) -> nn.Conv2d:
        return self.conv

    def after_conv(self, y: Tensor) -> Tensor:
        return self.norm(y)


def convert_cswin_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released InLine-CSwin keys -> :class:`InLineCSwin` keys (``norm`` -> ``norm3``,
    ``head`` dropped)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith('head.'):
            continue
        out['norm3.' + k[len('norm.'):] if k.startswith('norm.') else k] = v
    return out


class CSwinBackbone(InLineBackbone):
    """The CSwin layout (7x7 stride-4 stem, four stages of CSwin blocks, 3x3 stride-2
    merges) with each block's attention branches chosen by a per-stage letter string.

    Subclasses (:class:`InLineCSwin`, ``AgentCSwin``, ``FLattenCSwin``) declare their
    arch table and letters (``attn_letters``) and pass a :data:`BranchFactory`.

    Input ``(B, in_channels, H, W)`` of any size; outputs at strides 4, 8, 16, 32
    with ``C * 2^i`` channels.

    Its keyword arguments are passed on by name (the module docstring of
    :mod:`~mmlinattn.models.backbones.base`).
    """

    #: (linear attention's letter, softmax letter) of ``attn_types``.
    attn_letters = 'IS'
    convert_checkpoint = staticmethod(convert_cswin_checkpoint)

    def __init__(self,
                 make_branches: BranchFactory,
                 *,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 attn_types: Optional[str] = None,
                 in_channels: int = 3,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 **contract: Any) -> None:
        setting = self.resolve_arch(arch, embed_dims=embed_dims, depths=depths,
                                    num_heads=num_heads, attn_types=attn_types)
        depths = tuple(setting['depths'])
        heads = tuple(setting['num_heads'])
        super().__init__(len(depths), **contract)
        letters = parse_attn_types(setting['attn_types'], depths, self.attn_letters)
        dims = [setting['embed_dims'] * 2**i for i in range(self.num_stages)]
        self.num_features = dims
        self.in_channels = in_channels
        self.stage1_conv_embed = ConvStem(in_channels, dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(self.num_stages):
            start = sum(depths[:i])
            last = i == self.num_stages - 1
            blocks = [
                CSwinBlock(dims[i], make_branches(letters[i][j], i, j, dims[i], heads[i], last),
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                           drop_path=dpr[start + j])
                for j in range(depths[i])
            ]
            self.add_module(f'stage{i + 1}', nn.ModuleList(blocks))
            if i < self.num_stages - 1:
                self.add_module(f'merge{i + 1}', ConvMerge(dims[i], dims[i + 1]))
        self._add_out_norms(dims, eps=1e-5)
        self._finish_init()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.stage1_conv_embed]

    def _stage_modules(self, i: int) -> list[nn.Module]:
        mods = [getattr(self, f'stage{i + 1}')]
        if i > 0:
            mods.append(getattr(self, f'merge{i}'))
        norm = getattr(self, f'norm{i}', None)
        return mods + ([norm] if norm is not None else [])

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'expected an NCHW input with {self.in_channels} channels, got '
                             f'shape {tuple(x.shape)}')
        x = self.embed(self.stage1_conv_embed, x)
        outs = []
        for i in range(self.num_stages):
            if i > 0:
                x = self.embed(getattr(self, f'merge{i}'), x)
            for block in getattr(self, f'stage{i + 1}'):  # x: this stage's own map
                x = self.run_block(block, x, inplace=True)
            outs.append(x)
        return outs


class InLineCSwin(CSwinBackbone):
    """InLine-CSwin backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict (``embed_dims``,
            ``depths``, ``num_heads``, ``attn_types``); the named args override it.
        split_size: stripe width of the softmax stages (7, as released).
        inline_window: None (default, global) or a window side for the InLine stages.
        pad_mask: stripes and windows of maps that are not a multiple of their side are
            zero-padded; True (default) masks the padding out of the attention and the
            local terms, False attends it (no CSwin-based detector was released; the
            padding-invariant rule is ours).
        inline_operator: ``'inline'``; ``'linear'`` / ``'softmax'`` make the InLine
            stages global plain-linear / softmax attention (ablations).
        kernel: ``phi`` of the InLine stages (``'default'``: identity for InLine).
        attn_impl: attention implementation (``'auto'``; see
            :mod:`mmlinattn.ops.implementations`).
        in_channels, mlp_ratio, qkv_bias, drop_rate, drop_path_rate: as usual.
        out_indices, out_norm, frozen_stages, with_cp, chunk_tokens, pretrained, init_cfg:
            the OpenMMLab backbone contract (see :class:`InLineBackbone`).
        The layout and the contract are passed on by name to :class:`CSwinBackbone`
        (``**layout``).

    Input ``(B, in_channels, H, W)`` of any size; outputs at strides 4, 8, 16, 32
    (the 7x7 stride-4 stem, then stride-2 merges) with ``C * 2^i`` channels.
    """

    arch_settings = CSWIN_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 split_size: int = 7,
                 pad_mask: bool = True,
                 inline_window: Optional[int] = None,
                 inline_operator: str = 'inline',
                 kernel: KernelArg = 'default',
                 attn_impl: str = 'auto',
                 **layout: Any) -> None:

        def make_branches(letter: str, i: int, j: int, dim: int, heads: int,
                          last_stage: bool) -> list[nn.Module]:
            if letter == 'I':
                return [CSwinBranch(dim, heads, 'inline', operator=inline_operator,
                                    kernel=kernel, window=inline_window, impl=attn_impl,
                                    pad_mask=pad_mask)]
            return stripe_branches(dim, heads, split_size, last_stage, attn_impl, pad_mask)

        super().__init__(make_branches=make_branches, arch=arch, **layout)


class InLineCSwinClassifier(ClassifierHead, InLineCSwin):
    """InLine-CSwin with the reference head: final ``norm`` (eps 1e-5), token mean, ``head``."""


register_family(BackboneFamily(
    name='cswin', backbone=InLineCSwin, classifier=InLineCSwinClassifier,
    key_prefixes=('stage1_conv_embed.', ), key_markers=('.attns.0.residual.', ),
    first_conv='stage1_conv_embed.0',
    released=(
        ReleasedModel('inline_cswin_tiny', 'inline_cswin_t', 'tiny', 0.2),
        ReleasedModel('inline_cswin_small', 'inline_cswin_s', 'small', 0.4),
        ReleasedModel('inline_cswin_base', 'inline_cswin_b', 'base', 0.5),
        # 384 px: softmax stripes 12 (InLine split sizes 96-48 equal the maps: global).
        ReleasedModel('inline_cswin_base_384', 'inline_cswin_b_384', 'base', 0.7, 384, 1.0,
                      (('split_size', 12), )),
    ),
    benchmark=(
        BenchmarkVariant('inline-cswin-t', 'InLine-CSwin-T, global InLine stages 1-2, softmax '
                         'stripes after', (('arch', 'tiny'), )),
        BenchmarkVariant('cswin-t-global-softmax', 'the same layout, global softmax attention '
                         'in stages 1-2', (('arch', 'tiny'), ('inline_operator', 'softmax'))),
    ),
))
