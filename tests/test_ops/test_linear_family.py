"""The sibling linear attentions (focused, agent, MLLA) against explicit N x N forms.

The explicit forms below are written from the papers' equations on ``(B, N, C)``
tokens in float64 (RoPE with complex numbers, softmaxes over whole rows, pooling by
loops); nothing of mmlinattn is used in them.
"""
import math

import pytest
import torch

import mmlinattn.ops.inline as inline_ops
from mmlinattn.models.layers import InLineAttention
from mmlinattn.ops import (
    agent_attention,
    attention,
    focused_linear_attention,
    focusing_map,
    mlla_linear_attention,
    pool_agents,
    rope_rotations,
)


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, h, N, C/h)``."""
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d)`` -> ``(B, N, h*d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def explicit_focus(x: torch.Tensor, p: float, s: torch.Tensor) -> torch.Tensor:
    """FLatten's focusing function on ``(B, N, C)`` tokens, float64."""
    y = (x.double().clamp_min(0) + 1e-6) / s.double()
    return y.norm(dim=-1, keepdim=True) * y**p / (y**p).norm(dim=-1, keepdim=True)


def explicit_normalised(qn, kn, v, qd, kd, h, eps=1e-6):
    """Per head: ``O_i = sum_j (qn_i.kn_j) v_j / N / (qd_i . mean_j kd_j + eps)`` with the
    N x N matrix of numerator weights written out."""
    out = torch.empty_like(v, dtype=torch.float64)
    c = v.shape[-1]
    d = c // h
    n = kn.shape[1]
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        w = qn[..., sl].double() @ kn[..., sl].double().transpose(1, 2) / n  # N x N
        den = qd[..., sl].double() @ kd[..., sl].double().mean(1, keepdim=True).transpose(1, 2)
        out[..., sl] = (w @ v[..., sl].double()) / (den + eps)
    return out


def test_focused_linear_attention_equals_its_explicit_form():
    torch.manual_seed(0)
    b, n, c, h = 2, 13, 8, 2
    q, k, v = (torch.randn(b, n, c) for _ in range(3))
    s = torch.nn.functional.softplus(torch.randn(c))
    qf, kf = explicit_focus(q, 3, s), explicit_focus(k, 3, s)
    # Normalised by the same weights as the numerator: rows of w / rowsum.
    want = explicit_normalised(qf, kf, v, qf, kf, h)
    got = focused_linear_attention(heads(q, h), heads(k, h), heads(v, h),
                                   channel_scale=s.view(h, c // h))
    torch.testing.assert_close(tokens(got).double(), want, rtol=1e-5, atol=1e-6)
    # The focusing map's norms cross the heads: per-head norms would differ.
    per_head = torch.cat([explicit_focus(q[..., :4], 3, s[:4]),
                          explicit_focus(q[..., 4:], 3, s[4:])], -1)
    assert not torch.allclose(tokens(focusing_map(heads(q, h), 3, s.view(h, 4))).double(),
                              per_head, rtol=1e-3)
    with pytest.raises(ValueError, match='channel_scale must be'):
        focusing_map(heads(q, h), 3, s)


def test_focused_masked_tokens_count_for_nothing_and_half_precision_stays_finite():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 4) * 4 for _ in range(3))
    pad = torch.randn(1, 2, 6, 4) * 100
    mask = torch.tensor([[True] * 10 + [False] * 6])
    padded = focused_linear_attention(torch.cat([q, pad], 2), torch.cat([k, pad], 2),
                                      torch.cat([v, pad], 2), mask)
    torch.testing.assert_close(padded[:, :, :10], focused_linear_attention(q, k, v))
    # x^3 of activations of a few units in bfloat16 would lose everything: fp32 inside.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = focused_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), focused_linear_attention(q, k, v), rtol=0.05,
                               atol=0.05)


def explicit_agent(q, k, v, agents, h, bias_a=None, bias_q=None, valid=None):
    """Both softmaxes written out per head on ``(B, N, C)`` tokens, float64."""
    c = v.shape[-1]
    d = c // h
    out = torch.empty(q.shape[0], q.shape[1], c, dtype=torch.float64)
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        a = agents[..., sl].double()
        la = d**-0.5 * a @ k[..., sl].double().transpose(1, 2)
        if bias_a is not None:
            la = la + bias_a[:, i].double()
        if valid is not None:
            la = la.masked_fill(~valid[:, None, :], -math.inf)
        lq = d**-0.5 * q[..., sl].double() @ a.transpose(1, 2)
        if bias_q is not None:
            lq = lq + bias_q[:, i].double()
        out[..., sl] = lq.softmax(-1) @ (la.softmax(-1) @ v[..., sl].double())
    return out


def test_agent_attention_equals_both_softmaxes_with_biases():
    torch.manual_seed(2)
    b, n, c, h, na = 2, 12, 8, 2, 4
    q, k, v = (torch.randn(b, n, c) for _ in range(3))
    agents = torch.randn(b, na, c)
    bias_a, bias_q = torch.randn(1, h, na, n), torch.randn(1, h, n, na)
    want = explicit_agent(q, k, v, agents, h, bias_a, bias_q)
    got = agent_attention(heads(q, h), heads(k, h), heads(v, h), agents=heads(agents, h),
                          agent_bias=bias_a, query_bias=bias_q)
    torch.testing.assert_close(tokens(got).double(), want, rtol=1e-5, atol=1e-6)
    # Through the table, which refuses a call without agents.
    torch.testing.assert_close(attention('agent', heads(q, h), heads(k, h), heads(v, h),
                                         agents=heads(agents, h), agent_bias=bias_a,
                                         query_bias=bias_q), got)
    with pytest.raises(ValueError, match='agent attention needs agents='):
        attention('agent', heads(q, h), heads(k, h), heads(v, h))
    with pytest.raises(ValueError, match='agent_bias must be'):
        agent_attention(heads(q, h), heads(k, h), heads(v, h), agents=heads(agents, h),
                        agent_bias=bias_a[..., :-1])


def test_agent_softmax_over_key_chunks_is_one_softmax(monkeypatch):
    """Keys in chunks (online softmax, the maximum growing from chunk to chunk) and
    masked keys, among them the largest logits, against one explicit softmax."""
    torch.manual_seed(3)
    monkeypatch.setattr(inline_ops, 'CHUNK_BYTES', 1)  # the smallest chunks: 1024 tokens
    b, n, c, h, na = 1, 2600, 4, 2, 4
    q, k, v = (torch.randn(b, n, c) for _ in range(3))
    agents = torch.randn(b, na, c)
    ramp = torch.linspace(-40, 40, n)  # later chunks hold larger logits
    bias_a = ramp.expand(1, h, na, n).clone()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[:, -150:] = False  # the largest logits of all are padding
    want = explicit_agent(q, k, v, agents, h, bias_a, valid=valid)
    got = agent_attention(heads(q, h), heads(k, h), heads(v, h), mask=valid,
                          agents=heads(agents, h), agent_bias=bias_a)
    torch.testing.assert_close(tokens(got).double(), want, rtol=1e-5, atol=1e-6)


def test_agents_pool_valid_cells_only():
    torch.manual_seed(4)
    x = torch.randn(2, 7, 9, 3)
    valid = torch.ones(2, 7, 9, dtype=torch.bool)
    valid[1, 5:] = False
    valid[1, :, 6:] = False
    side = 3
    got = pool_agents(x, side, valid)
    for bi in range(2):
        for i in range(side):
            r0, r1 = (i * 7) // side, -(-(i + 1) * 7 // side)
            for j in range(side):
                c0, c1 = (j * 9) // side, -(-(j + 1) * 9 // side)
                m = valid[bi, r0:r1, c0:c1]
                cell = x[bi, r0:r1, c0:c1][m]
                want = cell.mean(0) if len(cell) else torch.zeros(3)
                torch.testing.assert_close(got[bi, i * side + j], want)
    torch.testing.assert_close(pool_agents(x, side), pool_agents(x, side, torch.ones_like(valid)))


def explicit_rope(x: torch.Tensor, hw: tuple[int, int], row0: int = 0) -> torch.Tensor:
    """MLLA's RoPE on ``(B, h*w, C)`` tokens with complex numbers: pair p < C/4 turns by
    row * theta_p, the others by column * theta_(p - C/4)."""
    b, n, c = x.shape
    kmax = c // 4
    theta = torch.tensor([10000.0**(-t / kmax) for t in range(kmax)], dtype=torch.float64)
    rows = torch.arange(row0, row0 + hw[0], dtype=torch.float64)
    cols = torch.arange(hw[1], dtype=torch.float64)
    ang = torch.empty(hw[0], hw[1], 2 * kmax, dtype=torch.float64)
    for r in range(hw[0]):
        for col in range(hw[1]):
            ang[r, col, :kmax] = rows[r] * theta
            ang[r, col, kmax:] = cols[col] * theta
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    z = z * torch.exp(1j * ang.reshape(n, 2 * kmax))
    return torch.stack([z.real, z.imag], -1).reshape(b, n, c)


def test_mlla_attention_equals_its_explicit_form_on_a_non_square_map():
    torch.manual_seed(5)
    b, hw, c, h = 2, (3, 5), 16, 2
    n = hw[0] * hw[1]
    q, k, v = (torch.randn(b, n, c) for _ in range(3))
    elu1 = lambda t: torch.nn.functional.elu(t.double()) + 1  # noqa: E731
    qe, ke = elu1(q), elu1(k)
    want = explicit_normalised(explicit_rope(qe, hw), explicit_rope(ke, hw), v, qe, ke, h)
    rot = rope_rotations(hw, h, c // h)
    got = mlla_linear_attention(heads(q, h), heads(k, h), heads(v, h), rotations=rot)
    torch.testing.assert_close(tokens(got).double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention('mlla', heads(q, h), heads(k, h), heads(v, h),
                                         rotations=rot), got)
    # A band of rows (chunked inference, one rank's rows): its rotations are the rows
    # of the whole map's.
    band = rope_rotations((2, 5), h, c // h, row_offset=1)
    torch.testing.assert_close(band, rot[:, :, 5:15])
    with pytest.raises(ValueError, match='rotations .* do not fit'):
        mlla_linear_attention(heads(q, h), heads(k, h), heads(v, h), rotations=band)


@pytest.mark.parametrize('name', ['focused', 'mlla'])
def test_summed_attentions_split_over_two_processes_equal_the_whole(name):
    """Tokens split over two 'processes': each sums its statistics with the other's
    (the reduce of spatial parallelism) and gets the whole map's output rows."""
    torch.manual_seed(6)
    hw, c, h = (4, 3), 8, 2
    q, k, v = (torch.randn(1, h, 12, c // h) for _ in range(3))
    options = {'rotations': rope_rotations(hw, h, c // h)} if name == 'mlla' else {}
    whole = attention(name, q, k, v, **options)

    def half(sl, reduce):
        opts = {'rotations': options['rotations'][:, :, sl]} if options else {}
        return attention(name, q[:, :, sl], k[:, :, sl], v[:, :, sl], reduce=reduce, **opts)

    partial = {}
    half(slice(6, 12), lambda t: partial.setdefault('other', t.clone()))
    top = half(slice(0, 6), lambda t: t + partial['other'])
    torch.testing.assert_close(top, whole[:, :, :6])


def test_modules_swap_only_the_attentions_of_q_k_v_alone():
    with pytest.raises(ValueError, match="unknown attention operator 'agent'"):
        InLineAttention(8, 2, operator='agent')


def test_agent_pooling_for_export_equals_adaptive_pooling():
    """The matrix form exported graphs use (adaptive pooling's indices would be fixed
    at the export size) pools the same cells."""
    from mmlinattn.ops.agent import _pool_by_matrices

    torch.manual_seed(7)
    for hw, side in [((7, 9), 3), ((56, 56), 3), ((13, 40), (12, 5)), ((5, 4), 7)]:
        x = torch.randn(2, 3, *hw)
        torch.testing.assert_close(_pool_by_matrices(x, side),
                                   torch.nn.functional.adaptive_avg_pool2d(x, side))
