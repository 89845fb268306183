"""Focused linear attention (FLatten Transformer, Han et al., ICCV 2023) as pure functions.

FLatten replaces softmax by division-normalised linear attention whose kernel is the
*focusing map* ``phi_p``: with ``x' = (ReLU(x) + 1e-6) / s`` (``s = softplus`` of a
learned per-channel scale, applied by the caller's module),

    phi_p(x) = ||x'|| * x'^p / ||x'^p||

with the norms over **all** ``C = heads * head_dim`` channels of a token, before the
heads are split (as the release computes it). Raising to ``p`` (3 in every released
model) sharpens each token's direction towards its dominant channels while keeping its
length. The attention is then :func:`mmlinattn.ops.linear_attention` of ``phi_p(q)``
and ``phi_p(k)``; the positional encoding added to k and the depthwise convolution on
v are module parameters (:mod:`mmlinattn.models.layers`), outside these functions.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .inline import KernelArg, Reduce, _acc, _autocast_off, _check_qkv, linear_readout

__all__ = ['focusing_map', 'focused_linear_attention']


def focusing_map(x: Tensor, power: float = 3.0, channel_scale: Optional[Tensor] = None,
                 eps: float = 1e-6) -> Tensor:
    """FLatten's ``phi_p`` of ``x (B, heads, N, d)`` -> ``(B, heads, N, d)`` in float32
    (float64 for float64 input), autocast off: ``x^p`` of activations of a few units
    overflows half precision.

    ``channel_scale``: the positive per-channel divisor ``(heads, d)`` (the module's
    ``softplus(scale)``), None for 1. The norms run over every channel of a token,
    across the heads.
    """
    if x.dim() != 4:
        raise ValueError(f'focusing_map expects (batch, heads, tokens, head_dim); got '
                         f'{tuple(x.shape)}')
    with _autocast_off(x):
        y = F.relu(_acc(x)) + eps
        if channel_scale is not None:
            if channel_scale.shape != (x.shape[1], x.shape[3]):
                raise ValueError(f'channel_scale must be (heads, head_dim) = '
                                 f'({x.shape[1]}, {x.shape[3]}); got {tuple(channel_scale.shape)}')
            y = y / channel_scale[:, None, :].to(y.dtype)
        norm = _channel_norm(y)
        yp = y**power
        return yp / _channel_norm(yp) * norm


def _channel_norm(y: Tensor) -> Tensor:
    """L2 norm of each token over heads and head channels: ``(B, h, N, d) -> (B, 1, N, 1)``."""
    return y.square().sum(dim=(1, 3), keepdim=True).sqrt()


def focused_linear_attention(q: Tensor,
                             k: Tensor,
                             v: Tensor,
                             mask: Optional[Tensor] = None,
                             kernel: KernelArg = None,
                             scale: Optional[float] = None,
                             focusing_factor: float = 3.0,
                             channel_scale: Optional[Tensor] = None,
                             eps: float = 1e-6,
                             reduce: Reduce = None) -> Tensor:
    """Focused linear attention in O(N d^2)::

        O_i = phi_p(q_i) sum_j phi_p(k_j)^T v_j / (phi_p(q_i) . sum_j phi_p(k_j) + N eps)

    Args:
        q, k: ``(B, heads, N, d)`` before the focusing map (k with its positional
            encoding already added).
        v: ``(B, heads, N, dv)``.
        mask: optional ``(B, N)`` bool, True for valid tokens.
        kernel: must be None: the focusing map is this attention's kernel.
        scale: accepted for interface parity; it cancels in the normalisation.
        focusing_factor: ``p``.
        channel_scale: see :func:`focusing_map`.
        eps: added to the normaliser, as the release.
        reduce: a differentiable sum over the processes holding the other tokens
            (spatial parallelism).

    Returns ``(B, heads, N, dv)`` in the dtype of ``v``; sums in float32.
    """
    del scale
    _check_qkv(q, k, v, mask)
    if kernel is not None:
        raise ValueError('focused linear attention has its own kernel (the focusing map); '
                         f'kernel must be None, got {kernel!r}')
    if not focusing_factor > 0:
        raise ValueError(f'focusing_factor must be positive, got {focusing_factor}')
    qf = focusing_map(q, focusing_factor, channel_scale)
    kf = focusing_map(k, focusing_factor, channel_scale)
    with _autocast_off(q):
        out = linear_readout(qf, kf, v, mask, eps, reduce)
    return out.to(v.dtype)

