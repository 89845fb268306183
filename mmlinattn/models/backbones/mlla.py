"""MLLA: Mamba-like linear attention backbones (Han et al., NeurIPS 2024), released
layouts T/S/B, for dense prediction at any input size.

A convolutional stem (stride 4), four stages of :class:`~mmlinattn.models.layers.MLLABlock`
with convolutional merges between them. Its attention is linear (a sum over tokens)
with a RoPE computed for the map at hand, so any size works.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ...parallel import (
    current_group,
    gather_rows,
    own_rows,
    row_spans,
    strided_spans,
    suspended,
)
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import ClassifierHead, MLLABlock, MLLAMerge, MLLAStem
from .base import StagedBackbone
from .inline_swin import convert_swin_checkpoint

__all__ = ['MLLA', 'MLLAClassifier', 'MLLA_ARCHS']

MLLA_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16)),
    'small': dict(embed_dims=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16)),
    'base': dict(embed_dims=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24)),
}


class MLLAStage(nn.Module):
    """``blocks`` then an optional ``downsample`` (parameter names as released)."""

    def __init__(self, dim: int, num_heads: int, drop_path: Sequence[float], mlp_ratio: float,
                 qkv_bias: bool, drop_rate: float, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MLLABlock(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, p) for p in drop_path)
        self.downsample = MLLAMerge(dim) if downsample else None


class MLLA(StagedBackbone):
    """MLLA backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``,
            ``depths``, ``num_heads``.
        embed_dims, depths, num_heads: override the arch's values.
        in_channels: input image channels.
        mlp_ratio, qkv_bias: as released (4, True).
        drop_rate, drop_path_rate: regularisation.
        out_indices, out_norm, frozen_stages, with_cp, chunk_tokens, pretrained,
            init_cfg: the OpenMMLab backbone contract, passed by name to
            :class:`InLineBackbone` (``**contract``).

    Input ``(B, in_channels, H, W)`` of any size; output ``(B, C_i, ceil(H / 4 / 2^i),
    ceil(W / 4 / 2^i))`` maps for i in out_indices. Token-chunked inference and spatial
    parallelism (``chunk_tokens``, :mod:`mmlinattn.parallel`) recompute the stem's,
    the merges' and each block's few rows around a band (docs/sibling_attentions.md).
    """

    arch_settings = MLLA_ARCHS
    convert_checkpoint = staticmethod(convert_swin_checkpoint)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 in_channels: int = 3,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.2,
                 **contract: Any) -> None:
        setting = self.resolve_arch(arch, embed_dims=embed_dims, depths=depths,
                                    num_heads=num_heads)
        depths = tuple(setting['depths'])
        heads = tuple(setting['num_heads'])
        super().__init__(len(depths), **contract)
        dims = [setting['embed_dims'] * 2**i for i in range(self.num_stages)]
        self.num_features = dims
        self.patch_embed = MLLAStem(in_channels, dims[0])
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            MLLAStage(dims[i], heads[i], dpr[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio,
                      qkv_bias, drop_rate, downsample=i < self.num_stages - 1)
            for i in range(self.num_stages))
        self._add_out_norms(dims, eps=1e-5)
        self._finish_init()


    def embed(self, module: nn.Module, x: Tensor) -> Tensor:
        """The stem or a merge. Spatially sharded while its BatchNorms take batch
        statistics (training), it runs on the gathered map, so the statistics are the
        whole map's; otherwise as every embedding (by rows, from a few rows around)."""
        group = current_group()
        if group is not None and any(m.training for m in module.modules()
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            axis = module.row_axis
            spans = row_spans(x.shape[axis], group)
            full = gather_rows(x, axis, spans, group)
            with suspended():
                out = module(full)
            return own_rows(out, 1, strided_spans(spans, module.row_stride, out.shape[1]))
        return super().embed(module, x)


class MLLAClassifier(ClassifierHead, MLLA):
    """MLLA with the released head: final ``norm``, token mean, ``head``."""


register_family(BackboneFamily(
    name='mlla', backbone=MLLA, classifier=MLLAClassifier,
    key_prefixes=('layers.', ), key_markers=('.cpe1.', ), first_conv='patch_embed.conv1.conv',
    released=(
        ReleasedModel('mlla_tiny', 'mlla_t', 'tiny', 0.2),
        ReleasedModel('mlla_small', 'mlla_s', 'small', 0.3),
        ReleasedModel('mlla_base', 'mlla_b', 'base', 0.5),
    ),
    benchmark=(
        BenchmarkVariant('mlla-t', 'MLLA-T, Mamba-like linear attention with RoPE',
                         (('arch', 'tiny'), )),
        BenchmarkVariant('mlla-t-chunked', 'MLLA-T, token-chunked inference (2^16 tokens a '
                         'band)', (('arch', 'tiny'), ('chunk_tokens', 65536))),
    ),
))
