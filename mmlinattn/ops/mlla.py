"""MLLA's linear attention (Mamba-like linear attention, Han et al., NeurIPS 2024).

ELU+1 kernel, division-normalised linear attention, and a 2-D rotary position
embedding (RoPE) on q and k in the numerator only::

    O_i = R(q_i) (sum_j R(k_j)^T v_j / N) / (q_i . kbar + eps)

``R`` rotates channel pairs ``(2m, 2m+1)`` of the full ``C``-channel token (before the
heads are split, as the release does) by an angle ``pos * theta``: the first ``C/4``
pairs by the row, the last ``C/4`` by the column, ``theta_t = base^(-t / (C/4))``.

The release builds its rotations once, for the training resolution, so other sizes
fail; here they are computed for the map at hand (:func:`rope_rotations`), with a
``row_offset`` for a band of a larger map (chunked inference, spatial parallelism):
RoPE depends on positions, never on the map's size. The LePE (a depthwise 3x3
convolution of v) is a module parameter, outside these functions.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .inline import (
    KernelArg,
    Reduce,
    _acc,
    _autocast_off,
    _check_qkv,
    get_kernel,
    kernel_features,
    linear_readout,
)

__all__ = ['rope_rotations', 'apply_rope', 'mlla_linear_attention']


def rope_rotations(hw: tuple[int, int], num_heads: int, head_dim: int, base: float = 10000.,
                   row_offset: int = 0, col_offset: int = 0,
                   device: Union[torch.device, str, None] = None) -> Tensor:
    """MLLA's 2-D RoPE for an ``h x w`` map (rows ``row_offset ...``) as ``(cos, sin)``:
    ``(2, heads, h*w, head_dim / 2)`` float32, tokens row-major.

    ``C = heads * head_dim`` must be a multiple of 4 (a pair of channels per angle,
    half the pairs per axis) and ``head_dim`` even.
    """
    c = num_heads * head_dim
    if c % 4 or head_dim % 2:
        raise ValueError(f'RoPE needs channels divisible by 4 and an even head_dim; got '
                         f'{num_heads} heads of {head_dim}')
    h, w = hw
    k_max = c // 4
    # 1 / base^(t/k), in the release's order of operations (the same float32 angles).
    theta = 1 / (base**(torch.arange(k_max, device=device) / k_max))
    rows = torch.arange(row_offset, row_offset + h, device=device, dtype=torch.float32)
    cols = torch.arange(col_offset, col_offset + w, device=device, dtype=torch.float32)
    angles = torch.cat([(rows[:, None, None] * theta).expand(h, w, k_max),
                        (cols[None, :, None] * theta).expand(h, w, k_max)], dim=-1)
    angles = angles.reshape(h * w, num_heads, head_dim // 2).transpose(0, 1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate the channel pairs of ``x (B, heads, N, d)`` by ``rotations``
    (:func:`rope_rotations`, ``(2, heads, N, d/2)``) -> ``(B, heads, N, d)`` float32."""
    if rotations.shape != (2, x.shape[1], x.shape[2], x.shape[3] // 2):
        raise ValueError(f'rotations {tuple(rotations.shape)} do not fit ({x.shape[1]} heads, '
                         f'{x.shape[2]} tokens, head_dim {x.shape[3]}): expected '
                         f'(2, {x.shape[1]}, {x.shape[2]}, {x.shape[3] // 2})')
    with _autocast_off(x):
        pairs = _acc(x).unflatten(-1, (-1, 2))
        re, im = pairs.unbind(-1)
        cos, sin = rotations.to(re.dtype)
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def mlla_linear_attention(q: Tensor,
                          k: Tensor,
                          v: Tensor,
                          mask: Optional[Tensor] = None,
                          kernel: KernelArg = 'elu1',
                          scale: Optional[float] = None,
                          rotations: Optional[Tensor] = None,
                          eps: float = 1e-6,
                          reduce: Reduce = None) -> Tensor:
    """MLLA's linear attention with RoPE in O(N d^2).

    Args:
        q, k: ``(B, heads, N, d)`` before the kernel.
        v: ``(B, heads, N, dv)``.
        mask: optional ``(B, N)`` bool, True for valid tokens.
        kernel: ``phi``, ELU+1 (``'elu1'``) as released.
        scale: accepted for interface parity; it cancels in the normalisation.
        rotations: RoPE of these tokens (:func:`rope_rotations`); None: no RoPE.
        eps: added to the normaliser, as the release.
        reduce: a differentiable sum over the processes holding the other tokens.

    Returns ``(B, heads, N, dv)`` in the dtype of ``v``; sums in float32.
    """
    del scale
    _check_qkv(q, k, v, mask)
    phi = get_kernel(kernel)
    if phi is not None:
        q, k = kernel_features(phi, q), kernel_features(phi, k)
    with _autocast_off(q):
        if rotations is None:
            out = linear_readout(q, k, v, mask, eps, reduce)
        else:
            out = linear_readout(q, k, v, mask, eps, reduce, q_num=apply_rope(q, rotations),
                                 k_num=apply_rope(k, rotations))
    return out.to(v.dtype)
