"""``x @ W^T + b`` (optionally followed by an exact GELU) through oneDNN on the CPU.

PyTorch's CPU ``F.linear`` in float32 runs the product through its BLAS (MKL) after
copying the broadcast bias into the output. On an AMD EPYC with AVX512 (measured
2026-12-06, 2 threads) that BLAS reached 215 GFLOP/s where oneDNN's inner product
reaches 380-430 GFLOP/s on the same shapes, with the bias (and a GELU) applied to
the output while it is still in registers: an InLine-PVT-S forward at 1024 px went
from 1029 to 604 ms. In bfloat16 both go through oneDNN already; fusing the bias
and the GELU still saves a pass over the output.

Where float32 gradients are needed the forward and the backward (``dx = dy W``,
``dW = dy^T x``) run in oneDNN too (the fused GELU only in inference, where no
pre-activation is kept): an InLine-PVT-S training step at 512 px went from 827 to
556 ms. bfloat16 training keeps ``F.linear`` (oneDNN already, with autocast's cached
weight casts). Taken on the CPU, for float32 and (on CPUs with bfloat16 instructions)
bfloat16, outside graph exports and ``torch.compile`` (they see ``F.linear``). Its
results differ from ``F.linear``'s by the order of the float32 sums (a few ulps); they
do not depend on how many rows are computed at once (chunked bands, spatial ranks),
except for a single row. ``MMLINATTN_LINEAR=aten`` (or :func:`set_linear_backend`)
turns it off, to compare.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import exporting

__all__ = ['linear', 'set_linear_backend', 'linear_backend', 'onednn_linear_applies',
           'LINEAR_BACKENDS', 'input_grad', 'weight_grad', 'bias_grad', 'autocast_dtype',
           'onednn_available']

#: ``onednn``: oneDNN's inner product for CPU inference where it applies; ``aten``:
#: always ``F.linear`` (and a separate GELU).
LINEAR_BACKENDS = ('onednn', 'aten')
_ACTIVATIONS = {'none': ('none', ''), 'gelu': ('gelu', 'none')}  # 'none': erf, exact
_backend: list[Optional[str]] = [None]


def set_linear_backend(name: Optional[str]) -> None:
    """Choose the backend (one of :data:`LINEAR_BACKENDS`); ``None``: from the
    environment (``MMLINATTN_LINEAR``, default ``onednn``)."""
    if name is not None and name not in LINEAR_BACKENDS:
        raise ValueError(f'linear backend must be one of {LINEAR_BACKENDS}, got {name!r}')
    _backend[0] = name


def linear_backend() -> str:
    """The backend in use (see :func:`set_linear_backend`)."""
    if _backend[0] is not None:
        return _backend[0]
    name = os.environ.get('MMLINATTN_LINEAR', 'onednn')
    if name not in LINEAR_BACKENDS:
        raise ValueError(f'MMLINATTN_LINEAR must be one of {LINEAR_BACKENDS}, got {name!r}')
    return name


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's CPU inner product (``_linear_pointwise``)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


@functools.cache
def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's CPU inner product runs natively here (none without oneDNN)."""
    if not onednn_available():
        return ()
    from ..utils.cpu import cpu_has_native_bf16

    return (torch.float32, torch.bfloat16) if cpu_has_native_bf16() else (torch.float32,)


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype a product on ``x`` runs in: autocast's for ``x``'s device when it is on,
    else ``x``'s own."""
    device = x.device.type
    if device in ('cpu', 'cuda') and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _needs_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def onednn_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether :func:`linear` runs these arguments through oneDNN now (with or without
    gradients)."""
    if exporting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x.device.type != 'cpu' or x.dim() < 2 or x.numel() == 0 or weight.dim() != 2:
        return False
    dtype = autocast_dtype(x)
    return (dtype in _onednn_dtypes() and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype in (torch.float32, torch.bfloat16)
            and linear_backend() == 'onednn')


def _product(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
             activation: str = 'none') -> Tensor:
    """oneDNN's ``activation(x @ weight^T + bias)`` on tensors of one dtype."""
    attr, algorithm = _ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad @ weight``: ``grad (..., out)``, ``weight (out, in)`` -> ``(..., in)``, the
    gradient of a linear layer's input: oneDNN in float32 where :func:`linear` uses it
    (2.4x faster than ``torch.mm`` on the EPYC; in bfloat16 both are oneDNN)."""
    if grad.dtype == torch.float32 and onednn_linear_applies(grad, weight):
        return _product(grad, weight.t().contiguous())
    return grad @ weight


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad^T @ x`` over every leading axis: ``grad (..., out)``, ``x (..., in)`` ->
    ``(out, in)``, the gradient of a linear layer's weight: oneDNN in float32 (on
    transposed views; slower than ``torch.mm`` for some shapes, faster over a training
    step: 556 against 643 ms for InLine-PVT-S at 512 px), ``torch.mm`` in bfloat16
    (where oneDNN's inner product over every token was 1.2-4x slower)."""
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    if g2.dtype == torch.float32 and onednn_linear_applies(g2, x2):
        return _product(g2.t(), x2.t())
    return g2.t() @ x2


def bias_grad(grad: Tensor) -> Tensor:
    """``grad`` summed over every leading axis: ``(..., out)`` -> ``(out,)``, the gradient
    of a linear layer's bias."""
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class _LinearFunction(torch.autograd.Function):
    """``x @ weight^T + bias`` through oneDNN, forward and backward, in one dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = input_grad(grad, weight) if ctx.needs_input_grad[0] else None
        dw = weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        db = bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: str = 'none') -> Tensor:
    """``activation(x @ weight^T + bias)``: ``x (..., in)``, ``weight (out, in)``,
    ``bias (out,)`` -> ``(..., out)``; ``activation`` is ``'none'`` or ``'gelu'`` (exact,
    erf). In autocast's dtype when autocast is on, as ``F.linear`` would be."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f'activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}')
    if onednn_linear_applies(x, weight, bias):
        dtype = autocast_dtype(x)
        grads = _needs_grad(x, weight, bias)
        # bf16 training keeps F.linear (measured faster, autocast caching weight casts).
        if not grads or dtype == torch.float32:
            xc, wc = x.to(dtype), weight.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            if not grads:
                return _product(xc, wc, bc, activation)
            out = _LinearFunction.apply(xc, wc, bc)
            return F.gelu(out) if activation == 'gelu' else out
    out = F.linear(x, weight, bias)
    return F.gelu(out) if activation == 'gelu' else out
