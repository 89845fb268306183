"""The q, k, v projections in the two layouts the released models use."""
from __future__ import annotations

from torch import Tensor, nn

from .chunked import linear_slice
from .linear import Linear

__all__ = ['QKVProjection', 'QKV_LAYOUTS']

#: ``qkv``: one Linear split as [q | k | v] (Swin, DeiT, CSwin); ``q_kv``: a ``q``
#: Linear and a ``kv`` Linear split as [k | v] (PVT).
QKV_LAYOUTS = ('qkv', 'q_kv')


class QKVProjection(nn.Module):
    """Base of attention modules: ``qkv`` or ``q`` + ``kv`` Linear layers (released
    names), :meth:`project` and :meth:`project_part`. Subclasses call
    :meth:`add_projections` in ``__init__``."""

    dim: int
    qkv_layout: str

    def add_projections(self, dim: int, layout: str, bias: bool) -> None:
        if layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be 'qkv' or 'q_kv', got {layout!r}")
        self.qkv_layout = layout
        if layout == 'qkv':
            self.qkv = Linear(dim, dim * 3, bias=bias)
        else:
            self.q = Linear(dim, dim, bias=bias)
            self.kv = Linear(dim, dim * 2, bias=bias)

    def project(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, N, C)`` -> q, k, v each ``(B, N, C)``."""
        b, n, c = tokens.shape
        if self.qkv_layout == 'qkv':
            q, k, v = self.qkv(tokens).view(b, n, 3, c).unbind(2)
        else:
            q = self.q(tokens)
            k, v = self.kv(tokens).view(b, n, 2, c).unbind(2)
        return q, k, v

    def project_part(self, tokens: Tensor, part: int, count: int = 1) -> Tensor:
        """``count`` of q, k, v from ``part`` on (0, 1, 2), computed without the others."""
        c = self.dim
        if self.qkv_layout == 'qkv':
            return linear_slice(self.qkv, tokens, part * c, (part + count) * c)
        if part == 0:
            return self.q(tokens)
        return linear_slice(self.kv, tokens, (part - 1) * c, (part - 1 + count) * c)
