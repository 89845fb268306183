"""InLine attention and the two attentions it is compared with, as pure functions.

All functions take ``q, k, v`` of shape ``(batch, heads, tokens, head_dim)`` and
return ``(batch, heads, tokens, head_dim)``. ``mask`` is an optional boolean
tensor of shape ``(batch, tokens)``; ``True`` marks a valid token. Invalid
(padding) tokens contribute nothing and do not count in ``N``; their outputs
are defined but meaningless.

InLine attention (Han et al., NeurIPS 2024) with ``s = head_dim ** -0.5``::

    O_i = (s / N) sum_j (q_i . k_j) v_j + (1 - s q_i . kbar) vbar
        = vbar + s q_i (K^T V / N - kbar^T vbar)

The second (covariance) form is what :func:`inline_attention` evaluates: one
``d x d`` matrix per head, so time and memory are O(N d^2), never O(N^2).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import exporting

__all__ = [
    'KERNELS', 'InLineSums', 'get_kernel', 'inline_attention', 'inline_attention_weights',
    'inline_readout', 'linear_attention', 'linear_readout', 'softmax_attention'
]


def _exp_kernel(x: Tensor) -> Tensor:
    # exp(0.2 x), the temperature used by the reference release.
    return torch.exp(0.2 * x)


def _elu1_kernel(x: Tensor) -> Tensor:
    # ELU(x) + 1 > 0: MLLA's kernel (and the linear transformer's of Katharopoulos et al.).
    return F.elu(x) + 1.0


KERNELS: dict[str, Optional[Callable[[Tensor], Tensor]]] = {
    'identity': None,
    'relu': F.relu,
    'leakyrelu': F.leaky_relu,  # negative slope 0.01, as nn.LeakyReLU()
    'exp': _exp_kernel,
    'elu1': _elu1_kernel,
}

KernelArg = Union[str, Callable[[Tensor], Tensor], None]

#: Sums a tensor over the processes that hold the other tokens of the same map
#: (spatial parallelism, :mod:`mmlinattn.parallel`), differentiably; None: one process.
Reduce = Optional[Callable[[Tensor], Tensor]]


def _pack(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


def _unpack(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def get_kernel(kernel: KernelArg) -> Optional[Callable[[Tensor], Tensor]]:
    """Resolve a kernel name (``identity``, ``relu``, ``leakyrelu``, ``exp``, ``elu1``) or
    callable."""
    if kernel is None or callable(kernel):
        return kernel
    if kernel not in KERNELS:
        raise ValueError(f'unknown attention kernel {kernel!r}; expected one of {sorted(KERNELS)}')
    return KERNELS[kernel]


def _autocast_off(t: Tensor) -> torch.autocast:
    """Disable autocast on ``t``'s device (meta tensors, used to count FLOPs, have none)."""
    device_type = t.device.type if t.device.type != 'meta' else 'cpu'
    return torch.autocast(device_type=device_type, enabled=False)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError('q, k, v must be (batch, heads, tokens, head_dim); got shapes '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f'incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    if mask is not None and (mask.dim() != 2 or mask.shape[0] != k.shape[0]
                             or mask.shape[1] != k.shape[2]):
        raise ValueError(f'mask must be (batch, tokens) = ({k.shape[0]}, {k.shape[2]}); '
                         f'got {tuple(mask.shape)}')


#: Tokens are processed in chunks of about this many bytes (fp32) of the operands, so
#: that each chunk is read from memory once and fully used (sums, K^T V, or q @ cov)
#: while it sits in cache. At large N the operator is memory-bound, and this halves
#: its traffic compared with one full pass per reduction.
CHUNK_BYTES = 2 * 2**20


def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype: float32 for half types, else unchanged (fp32/fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def kernel_features(phi: Optional[Callable[[Tensor], Tensor]], x: Tensor) -> Tensor:
    """``phi(x)`` in the accumulation dtype, autocast off (``x`` itself without a
    kernel). ELU+1 of a bf16 activation is ``-1 + e^x`` rounded to 8 bits, then ``+ 1``:
    a feature of ``e^-6`` came out as 0 or twice its value, and every statistic over the
    tokens carried that."""
    if phi is None:
        return x
    with _autocast_off(x):
        return phi(_acc(x))


def _chunk_size(t: Tensor, width: int) -> int:
    """Tokens per chunk for ``t (B, h, N, .)`` rows of ``width`` fp32 values."""
    return max(1024, CHUNK_BYTES // (4 * t.shape[0] * t.shape[1] * width))


class InLineSums:
    """Running sums over chunks of tokens for InLine's global statistics.

    :meth:`add` takes chunks ``k (B, h, n, d)``, ``v (B, h, n, dv)`` (k after phi)
    with an optional ``mask (B, n)``; :meth:`means` returns ``kbar (B, h, 1, d)``,
    ``vbar (B, h, 1, dv)`` and ``kv = K^T V / N (B, h, d, dv)`` over every token
    added. The sums are float32 (float64 for float64 inputs): reductions over up to
    10^6 tokens of fp16/bf16 activations overflow or lose all precision in half
    precision. Chunked whole-image inference (:mod:`mmlinattn.models.layers.chunked`)
    feeds it one band of a feature map at a time.
    """

    def __init__(self) -> None:
        self.k_sum: Optional[Tensor] = None
        self.v_sum: Optional[Tensor] = None
        self.kv_sum: Optional[Tensor] = None
        self.count: Union[int, Tensor] = 0

    def add(self, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
            mean_keys: Optional[Tensor] = None) -> None:
        """Add a chunk of tokens. ``mean_keys (B, h, n, d)``: the keys whose mean
        ``kbar`` keeps, when they differ from the keys of ``K^T V`` (MLLA normalises
        by un-rotated keys and multiplies by rotated ones); None: ``k``."""
        kc, vc = _acc(k), _acc(v)
        mk = kc if mean_keys is None else _acc(mean_keys)
        if mask is not None:
            mc = mask[:, None, :, None].to(kc.dtype)
            kc, vc, mk = kc * mc, vc * mc, mk * mc
            count = mask.sum(dim=1).to(kc.dtype)[:, None, None, None]
        else:
            count = k.shape[2]  # an int (symbolic under export: no float() specialising it)
        parts = (mk.sum(dim=2, keepdim=True), vc.sum(dim=2, keepdim=True),
                 kc.transpose(-2, -1) @ vc)
        if self.kv_sum is None:
            self.k_sum, self.v_sum, self.kv_sum = parts
        else:
            self.k_sum = self.k_sum + parts[0]
            self.v_sum = self.v_sum + parts[1]
            self.kv_sum = self.kv_sum + parts[2]
        self.count = self.count + count

    def reduce(self, reduce: Reduce) -> InLineSums:
        """Sum the statistics (and the token count) over the processes of ``reduce``
        in one call; a no-op for None."""
        if reduce is None:
            return self
        if self.kv_sum is None:
            raise ValueError('InLineSums.reduce() before any tokens were added')
        count = self.count if isinstance(self.count, Tensor) else \
            self.kv_sum.new_full((1, ), float(self.count))
        parts = [self.k_sum, self.v_sum, self.kv_sum, count]
        self.k_sum, self.v_sum, self.kv_sum, self.count = _unpack(reduce(_pack(parts)), parts)
        return self

    def means(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.kv_sum is None:
            raise ValueError('InLineSums.means() before any tokens were added')
        count = self.count
        inv_n = (1.0 / count.clamp_min(1.0) if isinstance(count, Tensor)
                 else 1.0 / torch.sym_max(count, 1))
        return self.k_sum * inv_n, self.v_sum * inv_n, self.kv_sum * inv_n

    def readout(self, scale: float) -> tuple[Tensor, Tensor]:
        """``(cov, vbar)`` with ``cov = s (K^T V / N - kbar^T vbar)``: ``O = q cov + vbar``."""
        kbar, vbar, kv = self.means()
        return _covariance(kbar, vbar, kv, scale), vbar


def _covariance(kbar: Tensor, vbar: Tensor, kv: Tensor, scale: float) -> Tensor:
    """``s (K^T V / N - kbar^T vbar)``: the one ``d x dv`` matrix per head of InLine."""
    return (kv - kbar.transpose(-2, -1) @ vbar) * scale


def inline_readout(q: Tensor, cov: Tensor, vbar: Tensor) -> Tensor:
    """InLine's output ``q cov + vbar`` for queries ``(B, h, n, d)`` (after phi), in
    ``cov``'s dtype with autocast off; see :meth:`InLineSums.readout`."""
    with _autocast_off(q):
        return torch.matmul(_acc(q).to(cov.dtype), cov).add_(vbar)


def _masked_sums(k: Tensor, v: Tensor, mask: Optional[Tensor], reduce: Reduce = None,
                 mean_keys: Optional[Tensor] = None) -> InLineSums:
    """The sums of k (or ``mean_keys``), v and K^T V over the valid tokens
    (:class:`InLineSums`), with the tokens read in cache-sized chunks, summed over
    ``reduce``'s processes."""
    sums = InLineSums()
    if exporting():  # one pass: a chunk loop's trip count would be fixed at the export size
        sums.add(k, v, mask, mean_keys)
        return sums.reduce(reduce)
    width = k.shape[-1] * (1 if mean_keys is None else 2) + v.shape[-1]
    step = _chunk_size(k, width)
    for start in range(0, k.shape[2], step):
        sl = slice(start, start + step)
        sums.add(k[:, :, sl], v[:, :, sl], None if mask is None else mask[:, sl],
                 None if mean_keys is None else mean_keys[:, :, sl])
    return sums.reduce(reduce)


def _token_weights(mask: Optional[Tensor], count: Union[int, Tensor],
                   dtype: torch.dtype) -> Union[float, Tensor]:
    """Each token's weight in the means: ``1/N`` (a float), or ``mask / count`` as
    ``(B, 1, N, 1)``. ``count`` is :attr:`InLineSums.count`: an int, ``(B, 1, 1, 1)`` per
    sample with a mask, or ``(1,)`` once reduced over processes without one."""
    if not isinstance(count, Tensor):
        return 1.0 / max(count, 1)
    inv_n = 1.0 / count.to(dtype).clamp_min(1.0)
    return float(inv_n) if mask is None else mask[:, None, :, None].to(dtype) * inv_n


def _inline_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                    scale: float, reduce: Reduce = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Union[int, Tensor]]:
    """``(out, kbar, vbar, cov, count)`` in the accumulation dtype, autocast off; q, k
    after phi; ``count`` the tokens of the means (over every process of ``reduce``)."""
    sums = _masked_sums(k, v, mask, reduce)
    kbar, vbar, kv = sums.means()
    # Covariance form: vbar + s q (K^T V / N - kbar^T vbar).
    cov = _covariance(kbar, vbar, kv, scale)
    n, step = q.shape[2], _chunk_size(q, q.shape[-1] + v.shape[-1])
    if exporting() or n <= step:
        out = torch.matmul(_acc(q).to(cov.dtype), cov).add_(vbar)
    else:
        out = q.new_empty(*q.shape[:3], v.shape[-1], dtype=cov.dtype)
        for start in range(0, n, step):
            out[:, :, start:start + step] = torch.matmul(
                _acc(q[:, :, start:start + step]).to(cov.dtype), cov).add_(vbar)
    return out, kbar, vbar, cov, sums.count


class _InLineFunction(torch.autograd.Function):
    """InLine attention whose backward keeps only q, k, v (as given) and ``d x d`` statistics.

    Autograd through the forward would also keep masked copies of k and v, float32
    copies of half-precision q, k, v and per-chunk intermediates. Here backward
    recomputes what it needs chunk by chunk from the saved inputs. With ``O = q cov +
    vbar``, ``cov = s (K^T V / N - kbar^T vbar)`` and ``w_j`` the weight of token j in
    the means (``1/N``; 0 on padding, the valid count otherwise):

        dq = dO cov^T          dcov = q^T dO          dkv = s dcov
        dkbar = -s vbar dcov^T                        dvbar = sum_i dO_i - s kbar dcov
        dk_j = w_j (v_j dkv^T + dkbar)                dv_j = w_j (k_j dkv + dvbar)

    With ``reduce`` (tokens spread over processes), the statistics are summed over the
    processes in forward, and ``dcov`` and ``sum_i dO_i`` in backward: the gradient of
    the sum of every process's loss, which is what the wrapper trains on.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                scale: float, reduce: Reduce = None) -> Tensor:
        with _autocast_off(q):
            out, kbar, vbar, cov, count = _inline_forward(q, k, v, mask, scale, reduce)
        ctx.save_for_backward(q, k, v, mask, kbar, vbar, cov)
        ctx.scale, ctx.reduce, ctx.count = scale, reduce, count
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, mask, kbar, vbar, cov = ctx.saved_tensors
        scale, acc = ctx.scale, cov.dtype
        n = q.shape[2]
        step = _chunk_size(q, q.shape[-1] + 2 * v.shape[-1])
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        with _autocast_off(q):
            # Pass 1: dq, and the gradients of the d x d statistics.
            dcov = dout_sum = None
            for start in range(0, n, step):
                sl = slice(start, start + step)
                do = dout[:, :, sl].to(acc)
                if dq is not None:
                    dq[:, :, sl] = (do @ cov.transpose(-2, -1)).to(q.dtype)
                parts = (_acc(q[:, :, sl]).to(acc).transpose(-2, -1) @ do,
                         do.sum(dim=2, keepdim=True))
                dcov = parts[0] if dcov is None else dcov + parts[0]
                dout_sum = parts[1] if dout_sum is None else dout_sum + parts[1]
            if ctx.reduce is not None:
                dcov, dout_sum = _unpack(ctx.reduce(_pack([dcov, dout_sum])), [dcov, dout_sum])
            dkv = dcov * scale  # d(K^T V / N)
            douter = -dkv  # d(kbar^T vbar)
            dkbar = vbar @ douter.transpose(-2, -1)  # (B, h, 1, d)
            dvbar = dout_sum + kbar @ douter  # (B, h, 1, dv): from O and from kbar^T vbar
            # Pass 2: dk, dv; each token's share of the means is its weight w_j.
            weights = _token_weights(mask, ctx.count, acc)
            dk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
            dv = torch.empty_like(v) if ctx.needs_input_grad[2] else None
            for start in range(0, n, step):
                sl = slice(start, start + step)
                w = weights if isinstance(weights, float) else weights[:, :, sl]
                if dk is not None:
                    vc = _acc(v[:, :, sl]).to(acc)
                    dk[:, :, sl] = ((vc @ dkv.transpose(-2, -1) + dkbar) * w).to(k.dtype)
                if dv is not None:
                    kc = _acc(k[:, :, sl]).to(acc)
                    dv[:, :, sl] = ((kc @ dkv + dvbar) * w).to(v.dtype)
        return dq, dk, dv, None, None, None


def inline_attention(q: Tensor,
                     k: Tensor,
                     v: Tensor,
                     mask: Optional[Tensor] = None,
                     kernel: KernelArg = 'identity',
                     scale: Optional[float] = None,
                     reduce: Reduce = None) -> Tensor:
    """InLine (injective linear) attention in O(N d^2).

    Args:
        q: queries ``(B, heads, N, d)``.
        k: keys ``(B, heads, N, d)``.
        v: values ``(B, heads, N, dv)``.
        mask: optional ``(B, N)`` bool, True for valid tokens (queries at
            invalid positions get an output too, which callers discard).
        kernel: ``phi`` applied to q and k: ``identity`` (default), ``relu``,
            ``leakyrelu``, ``exp`` or a callable.
        scale: ``s``; defaults to ``d ** -0.5``.
        reduce: for tokens spread over processes (spatial parallelism), a
            differentiable sum over them (:func:`mmlinattn.parallel.all_reduce_sum`):
            the statistics and N cover every process's tokens, ``q`` only this one's.

    Returns:
        ``(B, heads, N, dv)`` in the dtype of ``v``. The reductions and the
        final product run in float32 (float64 for float64 inputs) whatever the
        input dtype or autocast. When gradients are needed, backward keeps only
        q, k, v (after phi) and the ``d x d`` statistics (:class:`_InLineFunction`).
    """
    _check_qkv(q, k, v, mask)
    phi = get_kernel(kernel)
    if phi is not None:
        q, k = kernel_features(phi, q), kernel_features(phi, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = _InLineFunction.apply(q, k, v, mask, scale, reduce)
    else:
        with _autocast_off(q):
            out = _inline_forward(q, k, v, mask, scale, reduce)[0]
    return out.to(out_dtype)


def inline_attention_weights(q: Tensor,
                             k: Tensor,
                             mask: Optional[Tensor] = None,
                             kernel: KernelArg = 'identity',
                             scale: Optional[float] = None) -> Tensor:
    """The explicit ``(B, heads, N, N)`` InLine weights ``InL(q_i)_j`` (tests and plots only).

    ``w_ij = s/N (q_i . k_j) - s/N^2 sum_t (q_i . k_t) + 1/N`` over valid ``j``
    (0 at invalid ``j``); each row sums to 1. Quadratic memory: small N only.
    """
    phi = get_kernel(kernel)
    if phi is not None:
        q, k = kernel_features(phi, q), kernel_features(phi, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sim = (q @ k.transpose(-2, -1)) * scale
    if mask is None:
        n = k.shape[2]
        return (sim - sim.mean(dim=-1, keepdim=True) + 1.0) / n
    m = mask[:, None, None, :].to(sim.dtype)
    n = m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    sim = sim * m
    return (sim - sim.sum(dim=-1, keepdim=True) / n + 1.0) / n * m


def linear_attention(q: Tensor,
                     k: Tensor,
                     v: Tensor,
                     mask: Optional[Tensor] = None,
                     kernel: KernelArg = 'relu',
                     scale: Optional[float] = None,
                     eps: float = 1e-6,
                     reduce: Reduce = None) -> Tensor:
    """Plain (division-normalised) linear attention, the non-injective baseline.

    ``O_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) . sum_j phi(k_j) + eps)``.
    ``phi`` must be non-negative for the weights to be; ReLU by default.
    ``scale`` is accepted for interface parity and cancels out. Shapes as
    :func:`inline_attention`; O(N d^2); reductions in float32.
    """
    del scale  # q and a*q give the same output: this is the non-injectivity.
    _check_qkv(q, k, v, mask)
    phi = get_kernel(kernel)
    if phi is not None:
        q, k = kernel_features(phi, q), kernel_features(phi, k)
    return linear_readout(q, k, v, mask, eps, reduce).to(v.dtype)


def linear_readout(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                   eps: float = 1e-6, reduce: Reduce = None,
                   q_num: Optional[Tensor] = None, k_num: Optional[Tensor] = None) -> Tensor:
    """Division-normalised linear attention of kernelised ``q, k`` (the shared core of
    plain, focused and MLLA linear attention), float32, autocast off::

        O_i = (qn_i (Kn^T V / N)) / (q_i . kbar + eps)

    ``qn, kn`` (``q_num``, ``k_num``) are the numerator's queries and keys, ``q, k``
    by default (MLLA passes RoPE-rotated ones, and normalises by the plain ones).
    """
    with _autocast_off(q):
        if k_num is None:
            sums = _masked_sums(k, v, mask, reduce)
        else:
            sums = _masked_sums(k_num, v, mask, reduce, mean_keys=k)
        kbar, _, kv = sums.means()
        qf = _acc(q).to(kv.dtype)
        qn = qf if q_num is None else _acc(q_num).to(kv.dtype)
        return (qn @ kv) / (qf @ kbar.transpose(-2, -1) + eps)


def softmax_attention(q: Tensor,
                      k: Tensor,
                      v: Tensor,
                      mask: Optional[Tensor] = None,
                      kernel: KernelArg = None,
                      scale: Optional[float] = None) -> Tensor:
    """Global softmax attention through ``F.scaled_dot_product_attention`` (O(N^2) compute).

    ``kernel`` is accepted for interface parity and must be None or identity.
    """
    _check_qkv(q, k, v, mask)
    if get_kernel(kernel) is not None:
        raise ValueError('softmax attention takes no kernel function')
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
