"""Agent attention over a whole channels-last map, with the released parameter layout."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ...ops import AgentSums, attention, pool_agents, pool_agents_rows
from ...parallel import (
    SpatialGroup,
    all_reduce_max,
    all_reduce_sum,
    current_group,
    halo_rows,
    resized_rows,
    row_spans,
)
from .chunked import SummedAttentionPlan
from .linear import Linear
from .projection import QKVProjection
from .regions import check_map, check_tokens, merge_heads, split_heads

__all__ = ['AgentAttention', 'AgentBiasTables', 'agent_bias_for', 'stage_agent_shapes']


def _resize(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(N, C, h, w)`` (align_corners=False, as the release);
    the same size is returned as is (the resize would be exact anyway)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode='bilinear', align_corners=False)


def agent_bias_for(table: Tensor, hw: tuple[int, int], agent_shape: tuple[int, int],
                   rows: Optional[tuple[int, int]] = None) -> Tensor:
    """An agent bias table ``(heads, A, h0, w0)`` (one ``h0 x w0`` map per agent of a
    square ``sqrt(A)`` grid) for an ``h x w`` map and a ``gh x gw`` agent grid:
    ``(heads, h*w, gh*gw)``; with ``rows=(r0, r1)`` only those rows' tokens.

    The map axes are resized bilinearly to ``h x w``, then the agent axes to
    ``gh x gw``: the released downstream detectors' rule, which is the identity at
    the classification size and agent count.
    """
    heads, agents = table.shape[:2]
    side = math.isqrt(agents)
    if rows is None:
        t = _resize(table, hw)
    else:  # those rows of the resize alone (token-chunked inference)
        t = resized_rows(table, hw, *rows)
    n = t.shape[2] * t.shape[3]
    t = t.reshape(heads, side, side, n).permute(0, 3, 1, 2)
    return _resize(t, agent_shape).reshape(heads, n, agent_shape[0] * agent_shape[1])


def stage_agent_shapes(num_stages: int, agent_shapes: Optional[Sequence[Optional[Sequence[int]]]]
                       ) -> list[Optional[tuple[int, int]]]:
    """A backbone's ``agent_shapes`` argument as one run-time agent grid per stage
    (None: the square of the released agent count), refused when it does not name
    one entry per stage."""
    if agent_shapes is None:
        return [None] * num_stages
    if len(agent_shapes) != num_stages:
        raise ValueError(f'agent_shapes {list(agent_shapes)} must have one entry per stage '
                         f'({num_stages})')
    return [None if shape is None else tuple(shape) for shape in agent_shapes]


class AgentBiasTables(nn.Module):
    """The released bias tables of agent attention and the attention that reads them:
    the base of every module whose agents attend one map (:class:`AgentAttention`,
    Agent-CSwin's branch, Agent-DeiT's attention with its class token).

    Subclasses call :meth:`add_agent_biases` in ``__init__``. Tables: ``an_bias``,
    ``na_bias`` ``(heads, A, 7, 7)``; ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``
    along the ``h0 x w0`` map they were learned on; with ``prefix_tokens``, ``ac_bias``
    ``(1, heads, A, 1)`` and ``ca_bias`` ``(1, heads, 1, A)`` between the agents and a
    class token.
    """

    num_heads: int
    agent_num: int
    agent_shape: tuple[int, int]

    def add_agent_biases(self, num_heads: int, agent_num: int, bias_size: tuple[int, int],
                         agent_shape: Optional[tuple[int, int]] = None,
                         prefix_tokens: bool = False) -> None:
        side = math.isqrt(agent_num)
        if side * side != agent_num:
            raise ValueError(f'agent_num must be a square (agents pooled on a grid), got '
                             f'{agent_num}')
        self.num_heads, self.agent_num = num_heads, agent_num
        self.agent_shape = tuple(agent_shape) if agent_shape is not None else (side, side)
        h0, w0 = bias_size
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, h0, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, w0))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, h0, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, w0, agent_num))
        tables = [self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias,
                  self.wa_bias]
        if prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
            tables += [self.ac_bias, self.ca_bias]
        for p in tables:
            trunc_normal_(p, std=.02)

    def biases(self, hw: tuple[int, int], rows: Optional[tuple[int, int]] = None
               ) -> tuple[Tensor, Tensor]:
        """``(agent_bias (1, heads, G, N), query_bias (1, heads, N, G))`` for an
        ``h x w`` map (``rows=(r0, r1)``: its tokens in those rows) and this module's
        agent grid (G agents)."""
        g = self.agent_shape
        agent = agent_bias_for(self.an_bias, hw, g, rows) + agent_bias_for(
            (self.ah_bias + self.aw_bias)[0], hw, g, rows)
        query = agent_bias_for(self.na_bias, hw, g, rows) + agent_bias_for(
            (self.ha_bias + self.wa_bias)[0].permute(0, 3, 1, 2), hw, g, rows)
        return agent.transpose(1, 2)[None], query[None]

    def prefix_biases(self) -> tuple[Tensor, Tensor]:
        """``(agents -> class token (1, heads, G, 1), class token -> agents (1, heads, 1, G))``
        for this module's agent grid (the released tables resized along the agents)."""
        side = math.isqrt(self.agent_num)
        heads, g = self.num_heads, self.agent_shape

        def on_grid(t: Tensor) -> Tensor:  # (heads, A) -> (heads, G)
            return _resize(t.reshape(1, heads, side, side), g).reshape(heads, g[0] * g[1])

        return on_grid(self.ac_bias[0, :, :, 0])[None, :, :, None], \
            on_grid(self.ca_bias[0, :, 0])[None, :, None]

    def agent_plan(self, h: int, w: int, project_part: Callable[..., Tensor],
                   local: nn.Conv2d, out: Callable[[Tensor], Tensor],
                   prefix: Optional[Tensor] = None) -> SummedAttentionPlan:
        """Token-chunked inference on an ``h x w`` map (:mod:`.chunked`) in three passes
        over bands: the pooled agents (each band's share of every cell), the
        agent-to-key softmax (:class:`~mmlinattn.ops.AgentSums`, online over the
        bands), then each band's queries, with ``kernel // 2`` halo rows for the
        depthwise convolution ``local`` of v.

        ``project_part(tokens, part, count=1)`` gives ``count`` of q, k, v from ``part``
        (0, 1, 2) of normed tokens; ``out`` maps the attention plus ``local`` to the
        module's output (its ``proj``). ``prefix``: the normed class tokens ``(B, P, C)``
        (Agent-DeiT), keys of every agent with the ``ac_bias`` table, added to the
        softmax with the first band; their own output (agents read out with
        ``ca_bias``, no local term) is the plan's ``attend_prefix()``.
        """
        heads = self.num_heads
        state: dict[str, Tensor] = {}
        sums = AgentSums()
        if prefix is not None and not hasattr(self, 'ac_bias'):
            raise ValueError(f'{type(self).__name__} has no class-token biases '
                             '(prefix_tokens=False) but got prefix tokens')

        def pool(t: Tensor, r0: int, r1: int) -> None:
            part = pool_agents_rows(project_part(t, 0), h, r0, self.agent_shape)
            state['agents'] = part if 'agents' not in state else state['agents'] + part

        def heads_of(x: Tensor) -> Tensor:
            return split_heads(x, heads).float()

        def add_keys(tokens: Tensor, agent_bias: Tensor) -> None:
            """The keys and values of normed ``tokens (B, n, C)`` into the softmax."""
            c = tokens.shape[-1]
            k, v = (heads_of(p) for p in project_part(tokens, 1, 2).unflatten(-1, (2, c))
                    .unbind(-2))
            agents = heads_of(state['agents']) * (c // heads) ** -0.5
            sums.add(agents @ k.transpose(-2, -1) + agent_bias, v)

        def read_out(tokens: Tensor, query_bias: Tensor) -> Tensor:
            """Attention output ``(B, n, C)`` of the queries of normed ``tokens``."""
            c = tokens.shape[-1]
            if 'agent_v' not in state:
                state['agent_v'] = sums.result()
            q = heads_of(project_part(tokens, 0)) * (c // heads) ** -0.5
            weights = (q @ heads_of(state['agents']).transpose(-2, -1) + query_bias).softmax(-1)
            return merge_heads(weights @ state['agent_v']).to(tokens.dtype)

        def keys(t: Tensor, r0: int, r1: int) -> None:
            if prefix is not None and r0 == 0:  # the class tokens: keys once, before row 0
                add_keys(prefix, self.prefix_biases()[0].expand(-1, -1, -1, prefix.shape[1]))
            add_keys(t.reshape(t.shape[0], -1, t.shape[-1]), self.biases((h, w), (r0, r1))[0])

        def attend(t: Tensor, lo: int, r0: int, r1: int) -> Tensor:
            b, rows, _, c = t.shape
            tokens = t.reshape(b, -1, c)
            att = read_out(tokens[:, (r0 - lo) * w:(r1 - lo) * w],
                           self.biases((h, w), (r0, r1))[1]).view(b, r1 - r0, w, c)
            v = project_part(tokens, 2).view(b, rows, w, c)
            near = local(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[:, r0 - lo:r1 - lo]
            return out(att + near)

        def attend_prefix() -> Tensor:
            assert prefix is not None
            return out(read_out(prefix, self.prefix_biases()[1]))

        return SummedAttentionPlan(local.kernel_size[0] // 2, (pool, keys), attend,
                                   None if prefix is None else attend_prefix)

    def attend_agents(self, q: Tensor, k: Tensor, v: Tensor, hw: tuple[int, int],
                      num_prefix: int = 0) -> Tensor:
        """Agent attention of ``q, k, v (B, P + h*w, C)`` (``P = num_prefix`` leading class
        tokens, then an ``h x w`` map) -> ``(B, P + h*w, C)``, before any local term.
        The agents are pooled from the map's queries; every query and key takes part."""
        b, n, c = q.shape
        h, w = hw
        agents = pool_agents(q[:, num_prefix:].reshape(b, h, w, c), self.agent_shape)
        agent_bias, query_bias = self.biases(hw)
        if num_prefix:
            if not hasattr(self, 'ac_bias'):
                raise ValueError(f'{type(self).__name__} has no class-token biases '
                                 '(prefix_tokens=False) but got num_prefix={num_prefix}')
            to_cls, from_cls = self.prefix_biases()
            agent_bias = torch.cat([to_cls.expand(-1, -1, -1, num_prefix), agent_bias], dim=-1)
            query_bias = torch.cat([from_cls.expand(-1, -1, num_prefix, -1), query_bias], dim=-2)
        heads = self.num_heads
        return merge_heads(attention('agent', split_heads(q, heads), split_heads(k, heads),
                                     split_heads(v, heads), agents=split_heads(agents, heads),
                                     agent_bias=agent_bias, query_bias=query_bias))


class AgentAttention(QKVProjection, AgentBiasTables):
    """Agent attention (:func:`mmlinattn.ops.agent_attention`) over a whole map, plus
    the depthwise convolution of v, with the released parameters.

    Args:
        dim: channels ``C``.
        num_heads: heads.
        agent_num: agents of the released model (a square: 9, 16, 49).
        bias_size: the ``h0 x w0`` map the biases were learned on (the stage's map
            at the classification size: 56, 28, 14, 7 at 224 px).
        agent_shape: the agent grid at run time; None: ``sqrt(agent_num)`` square.
            The released detectors and segmenters use more agents than the
            classifiers (``(9, 9), (12, 12), (14, 14)`` for Swin stages 1-3); the
            biases are resized to it (:func:`agent_bias_for`).
        kernel_size: of the depthwise convolution on v (3).
        qkv_bias, proj_drop: as in Swin.
        qkv_layout: ``'qkv'`` (Swin) or ``'q_kv'`` (PVT: ``q`` and ``kv`` Linear layers).
        prefix_tokens: add the class-token biases ``ac_bias``, ``ca_bias`` (Agent-DeiT;
            :meth:`forward_tokens` with ``num_prefix``).

    Shapes: ``forward(x: (B, H, W, C)) -> (B, H, W, C)``, any ``H x W``;
    ``forward_tokens(tokens: (B, P + h*w, C), (h, w), P) -> (B, P + h*w, C)``.
    Parameters ``qkv`` (or ``q``, ``kv``), ``proj``, ``dwc``, ``an_bias``, ``na_bias``, ``ah_bias``,
    ``aw_bias``, ``ha_bias``, ``wa_bias`` as released.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 agent_num: int,
                 bias_size: tuple[int, int],
                 agent_shape: Optional[tuple[int, int]] = None,
                 kernel_size: int = 3,
                 qkv_bias: bool = True,
                 proj_drop: float = 0.,
                 qkv_layout: str = 'qkv',
                 prefix_tokens: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = dim
        self.add_projections(dim, qkv_layout, qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.add_agent_biases(num_heads, agent_num, bias_size, agent_shape, prefix_tokens)

    @property
    def plans_prefix_tokens(self) -> bool:
        """Whether :meth:`chunk_plan` takes class tokens (it has their biases)."""
        return hasattr(self, 'ac_bias')

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, agents={self.agent_num} -> '
                f'{self.agent_shape}')

    def chunk_plan(self, h: int, w: int, prefix: Optional[Tensor] = None) -> SummedAttentionPlan:
        """Token-chunked inference on an ``h x w`` map (:meth:`~AgentBiasTables.agent_plan`)
        with this module's projections, depthwise convolution and ``proj``; ``prefix``:
        normed class tokens ``(B, P, C)`` before the map (Agent-DeiT)."""
        return self.agent_plan(h, w, self.project_part, self.dwc,
                               lambda a: self.proj_drop(self.proj(a)), prefix)

    def _attend_sharded(self, tokens: Tensor, hw: tuple[int, int], num_prefix: int,
                        group: SpatialGroup) -> Tensor:
        """Agent attention plus the depthwise convolution, before ``proj``, for tokens
        ``(B, P + h*w, C)``: ``P`` class tokens (the same on every rank), then this
        rank's ``h`` rows of the map (spatial parallelism). Each rank's share of the
        pooled agents is summed over the group; the agent-to-key softmax is shifted by
        the group's largest logit and its sums reduced (one softmax over every rank's
        keys; the class tokens are keys on the first rank only); the queries read out
        locally; the convolution reads ``kernel // 2`` rows of each neighbour."""
        b, n, c = tokens.shape
        h, w = hw
        heads = self.num_heads
        spans = row_spans(h, group)
        r0, r1 = spans.mine
        group.stats.layers.append((spans.total * w, c))
        q, k, v = self.project(tokens)
        agents = all_reduce_sum(pool_agents_rows(q[:, num_prefix:].reshape(b, h, w, c),
                                                 spans.total, r0, self.agent_shape), group)
        agent_bias, query_bias = self.biases((spans.total, w), (r0, r1))
        if num_prefix:
            to_cls, from_cls = self.prefix_biases()
            # Replicated class tokens count once among the keys: on the first rank.
            to_cls = to_cls if group.first else torch.full_like(to_cls, float('-inf'))
            agent_bias = torch.cat([to_cls.expand(-1, -1, -1, num_prefix), agent_bias], dim=-1)
            query_bias = torch.cat([from_cls.expand(-1, -1, num_prefix, -1), query_bias],
                                   dim=-2)
        scale = (c // heads) ** -0.5
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        a, qh, kh, vh = (split_heads(t, heads).to(dtype) for t in (agents, q, k, v))
        with torch.autocast(tokens.device.type, enabled=False):
            logits = (a * scale) @ kh.transpose(-2, -1) + agent_bias
            # Any shared shift gives the same softmax; the group's maximum keeps exp() finite.
            p = torch.exp(logits - all_reduce_max(logits.amax(dim=-1, keepdim=True), group))
            agent_v = all_reduce_sum(p @ vh, group) / all_reduce_sum(
                p.sum(dim=-1, keepdim=True), group)
            weights = ((qh * scale) @ a.transpose(-2, -1) + query_bias).softmax(dim=-1)
            out = merge_heads(weights @ agent_v).to(tokens.dtype)
        halo = self.dwc.kernel_size[0] // 2
        vmap = v[:, num_prefix:].reshape(b, h, w, c)
        local = self.dwc(halo_rows(vmap, 1, halo, halo, group).permute(0, 3, 1, 2))
        local = local.permute(0, 2, 3, 1)[:, halo:halo + h].reshape(b, h * w, c)
        return torch.cat([out[:, :num_prefix], out[:, num_prefix:] + local], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        check_map(self, x, self.dim)
        group = current_group()
        b, h, w, c = x.shape
        if group is not None:
            out = self._attend_sharded(x.reshape(b, h * w, c), (h, w), 0, group)
            return self.proj_drop(self.proj(out.view(b, h, w, c)))
        q, k, v = self.project(x.reshape(b, h * w, c))
        out = self.attend_agents(q, k, v, (h, w)).view(b, h, w, c)
        local = self.dwc(v.view(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out + local))

    def forward_tokens(self, tokens: Tensor, hw: tuple[int, int], num_prefix: int = 0) -> Tensor:
        """Global agent attention over ``num_prefix`` class tokens and an ``h x w`` map
        (Agent-DeiT): ``(B, P + h*w, C) -> (B, P + h*w, C)``; the depthwise convolution
        adds to the map's tokens only."""
        check_tokens(self, tokens, hw, num_prefix, self.dim)
        b, n, c = tokens.shape
        h, w = hw
        group = current_group()
        if group is not None:  # hw: this rank's rows
            return self.proj_drop(self.proj(self._attend_sharded(tokens, hw, num_prefix,
                                                                 group)))
        q, k, v = self.project(tokens)
        out = self.attend_agents(q, k, v, hw, num_prefix)
        local = self.dwc(v[:, num_prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2))
        out = torch.cat([out[:, :num_prefix],
                         out[:, num_prefix:] + local.permute(0, 2, 3, 1).reshape(b, h * w, c)],
                        dim=1)
        return self.proj_drop(self.proj(out))
