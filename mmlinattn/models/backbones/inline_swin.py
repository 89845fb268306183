"""InLine-Swin: Swin Transformer whose InLine stages use injective linear attention.

Layouts of the released models (docs/method.md): ``tiny`` IIIS, ``small``
IISS, ``base`` IIMS2. InLine stages attend globally by default (the released
models at 224 px with window 56 are global in every InLine stage), or in
non-overlapping windows with ``inline_window``. Softmax blocks are Swin's
7x7 shifted windows with relative position bias.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ...ops.inline import KernelArg
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import (
    ClassifierHead,
    InLineAttention,
    PatchEmbed,
    PatchMerging,
    TransformerBlock,
    WindowSoftmaxAttention,
    parse_attn_types,
)
from .base import StagedBackbone

__all__ = ['SwinBackbone', 'InLineSwin', 'InLineSwinClassifier', 'InLineSwinStage',
           'convert_swin_checkpoint', 'swin_softmax_attention', 'AttentionFactory', 'SWIN_ARCHS']

SWIN_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_types='IIIS'),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                  attn_types='IISS'),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 attn_types='IIMS2'),
}


#: Builds block ``j`` of stage ``i``'s attention from its letter: ``(letter, i, j, dim,
#: heads) -> module`` mapping ``(B, H, W, C)`` to the same shape.
AttentionFactory = Callable[[str, int, int, int, int], nn.Module]


class InLineSwinStage(nn.Module):
    """One stage: ``blocks`` then an optional ``downsample`` (PatchMerging).

    A container (parameter names ``layers.{i}.blocks``, ``layers.{i}.downsample``
    as released): :class:`SwinBackbone` runs the blocks and the merge, so that each
    can run checkpointed or token-chunked.
    """

    def __init__(self,
                 dim: int,
                 attns: Sequence[nn.Module],
                 drop_path: Sequence[float],
                 mlp_ratio: float,
                 drop_rate: float,
                 downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, attn, mlp_ratio=mlp_ratio, drop=drop_rate,
                             drop_path=drop_path[j], norm_eps=1e-5)
            for j, attn in enumerate(attns))
        self.downsample = PatchMerging(dim) if downsample else None


def swin_softmax_attention(dim: int, num_heads: int, window: int, block: int,
                           qkv_bias: bool, attn_drop: float, proj_drop: float,
                           pad_mask: bool = True) -> nn.Module:
    """Swin's window softmax attention for block ``block`` of a stage: every other
    block shifted by half a window; ``pad_mask``: see :class:`WindowSoftmaxAttention`."""
    return WindowSoftmaxAttention(dim, num_heads, window_size=window,
                                  shift_size=window // 2 if block % 2 else 0, qkv_bias=qkv_bias,
                                  attn_drop=attn_drop, proj_drop=proj_drop, pad_mask=pad_mask)


def convert_swin_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released InLine-Swin classification keys -> :class:`InLineSwin` backbone keys.

    The final ``norm`` is the last stage's output norm (``norm3``); ``head`` is
    dropped; derived buffers are expected to be removed already. Backbone keys
    pass through unchanged.
    """
    last = max((int(k.split('.')[1]) for k in state_dict if k.startswith('layers.')), default=3)
    out = {}
    for k, v in state_dict.items():
        if k.startswith('head.'):
            continue
        if k.startswith('norm.'):
            k = f'norm{last}.' + k[len('norm.'):]
        out[k] = v
    return out


class SwinBackbone(StagedBackbone):
    """The Swin layout (patch embedding, four stages of pre-norm blocks, patch merging)
    with the attention of each block chosen by a per-stage letter string.

    Subclasses (:class:`InLineSwin`, ``AgentSwin``, ``FLattenSwin``) declare their
    arch table and the two letters of their strings (``attn_letters``), and pass an
    :data:`AttentionFactory` that builds each block's attention from its letter.
    ``M`` stages are mixed (see :func:`~mmlinattn.models.layers.parse_attn_types`).

    Input ``(B, in_channels, H, W)`` of any size; output a tuple of
    ``(B, C_i, ceil(H / 4 / 2^i), ceil(W / 4 / 2^i))`` maps for i in out_indices.

    Its keyword arguments are passed on by name (the module docstring of
    :mod:`~mmlinattn.models.backbones.base`).
    """

    #: (linear attention's letter, softmax letter) of ``attn_types``.
    attn_letters = 'IS'
    convert_checkpoint = staticmethod(convert_swin_checkpoint)

    def __init__(self,
                 make_attention: AttentionFactory,
                 *,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 attn_types: Optional[str] = None,
                 in_channels: int = 3,
                 patch_size: int = 4,
                 mlp_ratio: float = 4.,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 **contract: Any) -> None:
        setting = self.resolve_arch(arch, embed_dims=embed_dims, depths=depths,
                                    num_heads=num_heads, attn_types=attn_types)
        depths = tuple(setting['depths'])
        num_heads = tuple(setting['num_heads'])
        super().__init__(len(depths), **contract)
        letters = parse_attn_types(setting['attn_types'], depths, self.attn_letters)
        dims = [setting['embed_dims'] * 2**i for i in range(self.num_stages)]
        self.embed_dims = setting['embed_dims']
        self.attn_types = setting['attn_types']
        self.num_features = dims
        self.patch_embed = PatchEmbed(in_channels, dims[0], patch_size, norm_eps=1e-5)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(self.num_stages):
            start = sum(depths[:i])
            attns = [make_attention(letter, i, j, dims[i], num_heads[i])
                     for j, letter in enumerate(letters[i])]
            self.layers.append(
                InLineSwinStage(dims[i], attns, dpr[start:start + depths[i]], mlp_ratio,
                                drop_rate, downsample=i < self.num_stages - 1))
        self._add_out_norms(dims, eps=1e-5)
        self._finish_init()


class InLineSwin(SwinBackbone):
    """InLine-Swin backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``,
            ``depths``, ``num_heads``, ``attn_types``.
        embed_dims, depths, num_heads, attn_types: override the arch's values.
            ``attn_types`` has one letter per stage (``I`` InLine, ``S`` softmax,
            ``M`` mixed, with the number of leading InLine blocks at the end).
        in_channels: input image channels.
        patch_size: stride of the patch embedding.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the qkv projections.
        inline_window: None (default) for global InLine attention over each
            whole map; an int for non-overlapping windows of that side.
        softmax_window: window side of the softmax blocks (7).
        pad_mask: windows of maps that are not a multiple of their side are zero-padded;
            True (default) masks the padding out (features that do not depend on how far
            a map is from a multiple of the window; a map within one window unshifted);
            False attends it and shifts at every size, as MMDetection's Swin does. No
            InLine detector was released, so ours follow the padding-invariant rule.
        inline_operator: ``'inline'``; ``'linear'`` or ``'softmax'`` turn the
            InLine stages into plain linear / global softmax attention (ablations).
        kernel: ``phi`` of the InLine stages (``'default'``: identity for InLine).
        drop_rate, attn_drop_rate, drop_path_rate: regularisation.
        out_indices: stages whose outputs are returned.
        out_norm: LayerNorm on each returned map (``norm{i}``).
        frozen_stages: -1 none; 0 the patch embedding; k also stages 0..k-1.
        with_cp: activation checkpointing per block.
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', ...)``.
        init_cfg: mmengine init config; ``Pretrained`` loads released or converted
            checkpoints safely.
        The layout and the contract are passed on by name to :class:`SwinBackbone`
        (``**layout``).

    Input ``(B, in_channels, H, W)`` of any size; output a tuple of
    ``(B, C_i, ceil(H / 4 / 2^i), ceil(W / 4 / 2^i))`` maps for i in out_indices.
    """

    arch_settings = SWIN_ARCHS

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 qkv_bias: bool = True,
                 inline_window: Optional[int] = None,
                 softmax_window: int = 7,
                 pad_mask: bool = True,
                 inline_operator: str = 'inline',
                 kernel: KernelArg = 'default',
                 attn_impl: str = 'auto',
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 **layout: Any) -> None:

        def make_attention(letter: str, i: int, j: int, dim: int, heads: int) -> nn.Module:
            if letter == 'I':
                return InLineAttention(dim, heads, qkv_layout='qkv', window_size=inline_window,
                                       operator=inline_operator, kernel=kernel, impl=attn_impl,
                                       qkv_bias=qkv_bias, proj_drop=drop_rate, pad_mask=pad_mask)
            return swin_softmax_attention(dim, heads, softmax_window, j, qkv_bias,
                                          attn_drop_rate, drop_rate, pad_mask)

        super().__init__(make_attention=make_attention, arch=arch, drop_rate=drop_rate, **layout)


class InLineSwinClassifier(ClassifierHead, InLineSwin):
    """InLine-Swin with the reference head: final ``norm`` (eps 1e-5), token mean, ``head``."""


register_family(BackboneFamily(
    name='swin', backbone=InLineSwin, classifier=InLineSwinClassifier,
    key_prefixes=('layers.', ), key_markers=('.attn.residual.', ), first_conv='patch_embed.proj',
    released=(
        ReleasedModel('inline_swin_tiny', 'inline_swin_t', 'tiny', 0.2),
        ReleasedModel('inline_swin_small', 'inline_swin_s', 'small', 0.3),
        ReleasedModel('inline_swin_base', 'inline_swin_b', 'base', 0.5),
        # The reference's 384 px fine-tuning: window 96 (InLine stages stay global),
        # softmax windows max(7, 96 // 8) = 12; evaluated without a centre crop.
        ReleasedModel('inline_swin_base_384', 'inline_swin_b_384', 'base', 0.5, 384, 1.0,
                      (('softmax_window', 12), )),
    ),
    benchmark=(
        BenchmarkVariant('inline-swin-t', 'InLine-Swin-T, global InLine stages 1-3',
                         (('arch', 'tiny'), )),
        BenchmarkVariant('inline-swin-t-chunked', 'InLine-Swin-T, token-chunked inference '
                         '(2^16 tokens a band)', (('arch', 'tiny'), ('chunk_tokens', 65536))),
        BenchmarkVariant('inline-swin-t-w56', 'InLine-Swin-T, InLine in 56x56 windows',
                         (('arch', 'tiny'), ('inline_window', 56))),
        BenchmarkVariant('swin-t-global-softmax', 'the same layout, global softmax attention '
                         'in stages 1-3', (('arch', 'tiny'), ('inline_operator', 'softmax'))),
        BenchmarkVariant('swin-t-global-linear', 'the same layout, global plain linear '
                         'attention (ReLU kernel) in stages 1-3',
                         (('arch', 'tiny'), ('inline_operator', 'linear'))),
    ),
))
