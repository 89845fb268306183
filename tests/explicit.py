"""Attention written out the slow way, as the independent truth the tests compare with.

Explicit ``N x N`` weights per head, loops over regions and samples, float64, and
``torch.nn.functional`` convolutions: no mmlinattn function is used except a
module's own parameters (and the tap predictor, whose layout has its own test).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def inline_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(..., N, d)`` -> ``(..., N, N)``: ``s/N q.k_j - s/N^2 sum_t q.k_t + 1/N``."""
    n, s = k.shape[-2], q.shape[-1]**-0.5
    sim = s * q @ k.transpose(-2, -1)
    return sim / n - sim.sum(-1, keepdim=True) / n**2 + 1.0 / n


def softmax_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (q.shape[-1]**-0.5 * q @ k.transpose(-2, -1)).softmax(-1)


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    kind: str = 'inline') -> torch.Tensor:
    """``(B, N, C)`` tokens, one explicit attention per head -> ``(B, N, C)``."""
    c = q.shape[-1]
    d = c // heads
    weights_fn = {'inline': inline_weights, 'softmax': softmax_weights}[kind]
    out = torch.empty_like(v)
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        out[..., sl] = weights_fn(q[..., sl], k[..., sl]) @ v[..., sl]
    return out


def depthwise3x3(vmap: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Sample by sample: ``(B, h, w, C)`` convolved with ``taps (B, C, 3, 3)``, zero border."""
    out = torch.empty_like(vmap)
    for s in range(vmap.shape[0]):
        conv = F.conv2d(vmap[s].permute(2, 0, 1)[None], taps[s][:, None].to(vmap.dtype),
                        padding=1, groups=vmap.shape[-1])
        out[s] = conv[0].permute(1, 2, 0)
    return out


def inline_tokens(attn, tokens: torch.Tensor, hw: tuple[int, int],
                  num_prefix: int = 0) -> torch.Tensor:
    """:class:`InLineAttention` (``qkv`` layout) on ``(B, P + h*w, C)`` tokens, one region:
    every token in the attention; the local term on the ``h x w`` map tokens only, with
    taps from the mean of all tokens."""
    b, n, c = tokens.shape
    h, w = hw
    t = tokens.double()
    q, k, v = F.linear(t, attn.qkv.weight.double(), attn.qkv.bias.double()).split(c, dim=-1)
    out = heads_attention(q, k, v, attn.num_heads)
    taps = attn.residual.taps(tokens.mean(1)).double()
    local = depthwise3x3(v[:, num_prefix:].reshape(b, h, w, c), taps)
    out[:, num_prefix:] += local.reshape(b, h * w, c)
    out = F.linear(out, attn.proj.weight.double(), attn.proj.bias.double())
    return out.float()


def inline_map(attn, x: torch.Tensor) -> torch.Tensor:
    """:class:`InLineAttention` over the whole ``(B, h, w, C)`` map as one region."""
    b, h, w, c = x.shape
    return inline_tokens(attn, x.reshape(b, h * w, c), (h, w)).reshape(b, h, w, c)


def regions(h: int, w: int, rh: int, rw: int) -> list[tuple[slice, slice]]:
    """The ``rh x rw`` tiles of an ``h x w`` map, the last ones cut at the border."""
    return [(slice(r, min(r + rh, h)), slice(c, min(c + rw, w)))
            for r in range(0, h, rh) for c in range(0, w, rw)]


def cswin_branch(branch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 x_mean: torch.Tensor, tiles: Optional[list] = None) -> torch.Tensor:
    """A CSwin branch region by region: explicit attention, plus LePE (a depthwise 3x3
    of v with zero padding at the region's border) and, for InLine, the local term
    with taps from ``x_mean``."""
    b, h, w, c = q.shape
    tiles = tiles or [(slice(0, h), slice(0, w))]
    out = torch.zeros(b, h, w, c, dtype=torch.float64)
    taps = branch.residual.taps(x_mean).double() if branch.residual is not None else None
    conv = branch.get_v
    for rows, cols in tiles:
        qr, kr, vr = (t[:, rows, cols].double() for t in (q, k, v))
        rh, rw = qr.shape[1:3]
        o = heads_attention(qr.reshape(b, -1, c), kr.reshape(b, -1, c), vr.reshape(b, -1, c),
                            branch.num_heads, 'inline' if taps is not None else 'softmax')
        o = o.reshape(b, rh, rw, c)
        lepe = F.conv2d(vr.permute(0, 3, 1, 2), conv.weight.double(), conv.bias.double(),
                        padding=1, groups=c).permute(0, 2, 3, 1)
        o = o + lepe
        if taps is not None:
            o = o + depthwise3x3(vr, taps)
        out[:, rows, cols] = o
    return out.float()
