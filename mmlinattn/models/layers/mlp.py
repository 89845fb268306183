"""The transformer MLP (``fc1 -> GELU -> fc2``), keeping one hidden tensor for backward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import linear
from ...ops.dense import autocast_dtype, bias_grad, input_grad, weight_grad
from .linear import Linear

__all__ = ['Mlp', 'gelu_mlp']


class _GeluMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` whose backward keeps ``x`` and ``fc1(x)``, not ``gelu(fc1(x))``.

    Autograd through the layers keeps both hidden tensors (the GELU's input and
    output, each ``hidden`` wide: 8 of a block's 16 token-widths for ratio 4); here
    the GELU is recomputed in backward, an elementwise pass, instead of stored.
    Runs in the autocast dtype when autocast is on, as the layers would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor]) -> Tensor:
        dtype = autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            hidden = linear(xc, w1.to(dtype), None if b1 is None else b1.to(dtype))
            out = linear(F.gelu(hidden), w2.to(dtype), None if b2 is None else b2.to(dtype))
        ctx.save_for_backward(xc, hidden, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Optional[Tensor], ...]:
        xc, hidden, w1, w2 = ctx.saved_tensors
        dtype = hidden.dtype
        with torch.autocast(xc.device.type, enabled=False):
            dout = dout.to(dtype)
            act = F.gelu(hidden)
            dout = dout.contiguous()
            dw2 = weight_grad(dout, act).to(w2.dtype)
            db2 = bias_grad(dout).to(w2.dtype) if ctx.has_bias[1] else None
            dhidden = torch.ops.aten.gelu_backward(input_grad(dout, w2.to(dtype)), hidden)
            dw1 = weight_grad(dhidden, xc).to(w1.dtype)
            db1 = bias_grad(dhidden).to(w1.dtype) if ctx.has_bias[0] else None
            dx = (input_grad(dhidden, w1.to(dtype)).to(ctx.x_dtype)
                  if ctx.needs_input_grad[0] else None)
        return dx, dw1, db1, dw2, db2


def gelu_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Tensor:
    """``fc2(gelu(fc1(x)))``; under autograd, stores one hidden tensor instead of two."""
    if torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad
                                    or fc2.weight.requires_grad):
        return _GeluMlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    # Inference: the GELU applied inside fc1's product where oneDNN runs it.
    return fc2(linear(x, fc1.weight, fc1.bias, activation='gelu'))


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> dropout -> fc2 -> dropout`` on the last axis.

    Parameters ``fc1``, ``fc2`` as timm's ``Mlp`` (and the released checkpoints).
    Without dropout, training keeps ``fc1``'s output but not the GELU's
    (:func:`gelu_mlp`); with dropout it runs layer by layer.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = drop
        self.dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f'drop={self.drop}'

    def forward(self, x: Tensor) -> Tensor:
        if self.drop > 0 and self.training:
            return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))
        return gelu_mlp(x, self.fc1, self.fc2)
