"""Adapting pretrained position tables to the model they are loaded into.

What mmdet's Swin and PVT loaders do for their families, for ours: a Swin
relative-position bias table learned for one softmax window is interpolated to
the configured window (e.g. the 224 px weights, window 7, into ``softmax_window=12``
for 384 px fine-tuning), and an absolute position embedding learned on one grid
is resized to the grid the model stores (``pretrain_img_size``). Each change is
reported so that the caller can log it.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['adapt_position_tables']


def _square_side(n: int) -> Optional[int]:
    side = math.isqrt(n)
    return side if side * side == n else None


def _resize_relative_table(table: Tensor, target: torch.Size) -> Optional[Tensor]:
    """``((2w-1)^2, heads)`` -> ``((2w'-1)^2, heads)`` by bicubic interpolation of each head."""
    if table.dim() != 2 or len(target) != 2 or table.shape[1] != target[1]:
        return None
    src, dst = _square_side(table.shape[0]), _square_side(target[0])
    if src is None or dst is None:
        return None
    heads = table.shape[1]
    grid = table.float().t().reshape(1, heads, src, src)
    grid = F.interpolate(grid, size=(dst, dst), mode='bicubic', align_corners=False)
    return grid.reshape(heads, dst * dst).t().to(table.dtype).contiguous()


def _resize_pos_embed(embed: Tensor, target: torch.Size, mode: str) -> Optional[Tensor]:
    """``(1, extra + g^2, C)`` -> ``(1, extra + g'^2, C)``; leading (class) tokens kept."""
    if embed.dim() != 3 or len(target) != 3 or embed.shape[::2] != target[::2]:
        return None
    for extra in (0, 1):
        src, dst = _square_side(embed.shape[1] - extra), _square_side(target[1] - extra)
        if src and dst:
            break
    else:
        return None
    c = embed.shape[-1]
    grid = embed[:, extra:].float().reshape(1, src, src, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst * dst, c).to(embed.dtype)
    return torch.cat([embed[:, :extra], grid], dim=1)


def _is_pos_embed(key: str) -> bool:
    leaf = key.rsplit('.', 1)[-1]
    return leaf == 'pos_embed' or (leaf.startswith('pos_embed') and leaf[9:].isdigit())


def adapt_position_tables(state_dict: Mapping[str, Tensor], model_state: Mapping[str, Tensor],
                          pos_embed_mode: str = 'bicubic') -> tuple[dict[str, Tensor], list[str]]:
    """Resize the position tables of ``state_dict`` whose shapes differ from ``model_state``.

    Relative-position bias tables (``*relative_position_bias_table``) are
    interpolated bicubically per head; absolute embeddings (``pos_embed``,
    ``pos_embed1``...) with ``pos_embed_mode`` (the mode the model itself uses
    to resize them at run time), keeping a leading class token. Tables that
    cannot be matched are left as they are, for the shape check to report.

    Returns the adapted state dict and one line per resized table.
    """
    out = dict(state_dict)
    notes = []
    for key, value in state_dict.items():
        target = model_state.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key.endswith('relative_position_bias_table'):
            resized = _resize_relative_table(value, target.shape)
            how = 'bicubic'
        elif _is_pos_embed(key):
            resized = _resize_pos_embed(value, target.shape, pos_embed_mode)
            how = pos_embed_mode
        else:
            continue
        if resized is not None:
            out[key] = resized
            notes.append(f'{key}: {tuple(value.shape)} -> {tuple(resized.shape)} ({how})')
    return out, notes
