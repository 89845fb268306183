"""Agent attention (Han et al., ECCV 2024) as pure functions.

A few *agent* tokens ``A`` (``n_a`` of them, pooled from the queries) first attend to
every key, then every query attends to the agents::

    V_a = softmax(s A K^T + B_a) V        (n_a x N softmax over the keys)
    O   = softmax(s Q A^T + B_q) V_a      (N x n_a softmax over the agents)

``B_a (.., heads, n_a, N)`` and ``B_q (.., heads, N, n_a)`` are the agent and query
biases (built by the module from its parameters for the map at hand). The cost is
O(N n_a d): linear in N for a fixed number of agents.

The agent-to-key softmax runs over every key. :class:`AgentSums` evaluates it as an
*online softmax* (a running maximum, with the sums rescaled whenever it grows) over
chunks of keys, so the ``n_a x N`` weights never exist at once and keys can arrive
band by band (chunked whole-image inference) with the same result up to rounding.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .inline import KernelArg, _acc, _autocast_off, _check_qkv, _chunk_size
from .tracing import exporting

__all__ = ['AgentSums', 'agent_attention', 'pool_agents', 'pool_agents_rows']


def pool_agents(q_map: Tensor, side: Union[int, tuple[int, int]],
                valid: Optional[Tensor] = None) -> Tensor:
    """Agent tokens: ``q_map (B, H, W, C)`` average-pooled (``adaptive_avg_pool2d``) to
    ``side`` cells (an int for a square grid, or ``(rows, cols)``) -> ``(B, cells, C)``,
    cells row-major.

    ``valid (B, H, W)`` bool: only valid positions count in a cell's mean (padded
    windows); a cell with none gives 0.
    """
    x = q_map.permute(0, 3, 1, 2)
    pool = _pool_by_matrices if exporting() else F.adaptive_avg_pool2d
    if valid is None:
        pooled = pool(x, side)
    else:
        m = valid[:, None].to(x.dtype)
        pooled = pool(x * m, side) / pool(m, side).clamp_min(torch.finfo(x.dtype).tiny)
    return pooled.flatten(2).transpose(1, 2)


def pool_agents_rows(q_rows: Tensor, height: int, r0: int,
                     side: Union[int, tuple[int, int]]) -> Tensor:
    """The share of rows ``r0 ...`` of an ``height``-row map in :func:`pool_agents`:
    ``q_rows (B, rows, W, C)`` -> ``(B, cells, C)``. Summed over bands that cover
    the map, it is the pooled agents (token-chunked inference)."""
    sh, sw = (side, side) if isinstance(side, int) else side
    ph = _cell_matrix(height, sh, q_rows)[:, r0:r0 + q_rows.shape[1]]
    pw = _cell_matrix(q_rows.shape[2], sw, q_rows)
    return torch.einsum('ir,brwc,jw->bijc', ph, q_rows, pw).flatten(1, 2)


def _cell_matrix(n: int, cells: int, like: Tensor) -> Tensor:
    """``(cells, n)``: row i averages positions ``floor(i n / cells)`` to
    ``ceil((i + 1) n / cells) - 1``, the cells of ``adaptive_avg_pool``."""
    i = torch.arange(cells, device=like.device)
    r = torch.arange(n, device=like.device)
    start, end = (i * n) // cells, ((i + 1) * n + cells - 1) // cells
    m = ((r[None] >= start[:, None]) & (r[None] < end[:, None])).to(like.dtype)
    return m / m.sum(dim=1, keepdim=True)


def _pool_by_matrices(x: Tensor, side: Union[int, tuple[int, int]]) -> Tensor:
    """``adaptive_avg_pool2d`` of ``x (B, C, H, W)`` as two matrix products. Exported
    graphs need it: the exporter bakes the export size into adaptive pooling's
    indices (ONNX Runtime then reads out of range at other sizes)."""
    sh, sw = (side, side) if isinstance(side, int) else side
    ph = _cell_matrix(x.shape[2], sh, x)
    pw = _cell_matrix(x.shape[3], sw, x)
    return torch.einsum('ih,bchw,jw->bcij', ph, x, pw)


class AgentSums:
    """The agent-to-key softmax ``softmax(logits) V`` accumulated over chunks of keys.

    :meth:`add` takes the logits ``(B, h, n_a, n)`` of a chunk of keys (float32 or
    float64) and their values ``(B, h, n, dv)``, with an optional key ``mask (B, n)``;
    :meth:`result` is ``(B, h, n_a, dv)`` over every key added. Per agent it keeps
    the running maximum ``m``, ``sum_j exp(l_j - m)`` and ``sum_j exp(l_j - m) v_j``,
    rescaling both by ``exp(m_old - m_new)`` when the maximum grows: the same value as
    one softmax over all keys, without ever holding the ``n_a x N`` weights.
    """

    def __init__(self) -> None:
        self.max: Optional[Tensor] = None
        self.den: Optional[Tensor] = None
        self.num: Optional[Tensor] = None

    def add(self, logits: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> None:
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float('-inf'))
        chunk_max = logits.amax(dim=-1, keepdim=True)
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        # Agents that have seen only masked keys keep -inf; subtract 0 there instead.
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        p = torch.exp(logits - shift)
        den, num = p.sum(dim=-1, keepdim=True), p @ v.to(p.dtype)
        if self.max is not None:
            alpha = torch.exp(self.max - shift)
            den, num = self.den * alpha + den, self.num * alpha + num
        self.max, self.den, self.num = new_max, den, num

    def result(self) -> Tensor:
        if self.num is None:
            raise ValueError('AgentSums.result() before any keys were added')
        return self.num / self.den.clamp_min(torch.finfo(self.den.dtype).tiny)


def agent_attention(q: Tensor,
                    k: Tensor,
                    v: Tensor,
                    mask: Optional[Tensor] = None,
                    kernel: KernelArg = None,
                    scale: Optional[float] = None,
                    agents: Optional[Tensor] = None,
                    agent_bias: Optional[Tensor] = None,
                    query_bias: Optional[Tensor] = None) -> Tensor:
    """Agent attention in O(N n_a d).

    Args:
        q: queries ``(B, heads, Nq, d)``.
        k, v: keys ``(B, heads, N, d)`` and values ``(B, heads, N, dv)`` (N may differ
            from Nq: keys of a spatially reduced map).
        mask: optional ``(B, N)`` bool, True for valid keys; invalid ones get no
            weight from any agent.
        kernel: must be None (softmax attention has no kernel).
        scale: ``s``; defaults to ``d ** -0.5``.
        agents: ``(B, heads, n_a, d)`` agent tokens (required; :func:`pool_agents`).
        agent_bias: ``(B or 1, heads, n_a, N)`` added to the agent-to-key logits.
        query_bias: ``(B or 1, heads, Nq, n_a)`` added to the query-to-agent logits.

    Returns ``(B, heads, Nq, dv)`` in the dtype of ``v``. Both softmaxes run in float32
    (float64 for float64 inputs), autocast off; the keys in cache-sized chunks.
    """
    if agents is None:
        raise ValueError('agent attention needs agents=(batch, heads, agents, head_dim) '
                         'tokens (mmlinattn.ops.pool_agents pools them from the queries)')
    if kernel is not None:
        raise ValueError(f'agent attention takes no kernel function; got {kernel!r}')
    if q.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f'q {tuple(q.shape)} and k {tuple(k.shape)} must be '
                         '(batch, heads, tokens, head_dim) with the same batch, heads, head_dim')
    _check_qkv(k, k, v, mask)
    b, h, nq, d = q.shape
    n, na = k.shape[2], agents.shape[2]
    if agents.shape != (b, h, na, d):
        raise ValueError(f'agents must be ({b}, {h}, n_agents, {d}); got {tuple(agents.shape)}')
    if agent_bias is not None and agent_bias.shape[1:] != (h, na, n):
        raise ValueError(f'agent_bias must be (batch or 1, {h}, {na}, {n}); got '
                         f'{tuple(agent_bias.shape)}')
    if query_bias is not None and query_bias.shape[1:] != (h, nq, na):
        raise ValueError(f'query_bias must be (batch or 1, {h}, {nq}, {na}); got '
                         f'{tuple(query_bias.shape)}')
    s = d**-0.5 if scale is None else scale
    with _autocast_off(q):
        a = _acc(agents) * s
        sums = AgentSums()
        step = n if exporting() else _chunk_size(k, na + v.shape[-1])
        for start in range(0, n, step):
            sl = slice(start, start + step)
            logits = a @ _acc(k[:, :, sl]).to(a.dtype).transpose(-2, -1)
            if agent_bias is not None:
                logits = logits + agent_bias[..., sl].to(a.dtype)
            sums.add(logits, _acc(v[:, :, sl]), None if mask is None else mask[:, sl])
        agent_v = sums.result()
        step = nq if exporting() else _chunk_size(q, na + v.shape[-1])
        parts = []
        for start in range(0, nq, step):
            sl = slice(start, start + step)
            logits = (_acc(q[:, :, sl]).to(a.dtype) * s) @ _acc(agents).to(a.dtype).transpose(
                -2, -1)
            if query_bias is not None:
                logits = logits + query_bias[:, :, sl].to(a.dtype)
            parts.append(logits.softmax(dim=-1) @ agent_v)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.to(v.dtype)
