"""bf16 inputs, fp32 statistics: every attention's bf16 output is its exact value rounded.

Under CPU autocast the operators take bf16 queries, keys and values, but what sums over
all tokens (InLine's means and covariance, FLatten's powers and norms and the linear
sums, Agent's softmax statistics, MLLA's normaliser) must be computed in fp32: a
statistic rounded to bf16 (8 bits of mantissa) is wrong by up to 0.4% before anything
is done with it, and InLine's covariance, a difference of two large sums, loses every
digit. The independent truth is the float64 computation on the same bf16-rounded
inputs: with fp32 statistics the bf16 output is that value rounded to bf16, within one
unit in the last place (ulp) for every element; a statistic kept in bf16 puts elements
several ulps off.
"""
import pytest
import torch

from mmlinattn.ops import (
    agent_attention,
    focused_linear_attention,
    inline_attention,
    mlla_linear_attention,
    rope_rotations,
)

#: Tokens: a 64 x 64 map, two heads of 16 channels.
SIDE, HEADS, DIM = 64, 2, 16


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    """bf16 ``q, k, v (1, HEADS, N, DIM)`` where a bf16 statistic shows: keys and values
    with means far larger than their spread (InLine's covariance cancels them)."""
    g = torch.Generator().manual_seed(0)
    n = SIDE * SIDE
    q, k, v = (torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3))
    if name == 'inline':
        k, v = k + 24.0, v * 4 + 40.0
    return tuple(t.bfloat16() for t in (q, k, v))


def _run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if name == 'inline':
        return inline_attention(q, k, v)
    if name == 'focused':
        return focused_linear_attention(q, k, v)
    if name == 'agent':
        return agent_attention(q, k, v, agents=q[:, :, ::64])
    rot = rope_rotations((SIDE, SIDE), HEADS, DIM)
    return mlla_linear_attention(q, k, v, rotations=rot)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How far ``got`` (bf16) is from ``want`` (float64) in bf16 units in the last place
    of ``want``, elements within 1e-3 of the largest counted at that scale (the
    outputs near zero are differences of O(1) terms: fp32 itself is off by ~1e-7 there)."""
    scale = want.abs().clamp_min(1e-3 * want.abs().max())
    ulp = torch.pow(2.0, (torch.frexp(scale)[1] - 8).double())  # bf16: 8 significant bits
    return (got.double() - want).abs() / ulp


@pytest.mark.parametrize('name', ['inline', 'focused', 'agent', 'mlla'])
def test_bf16_output_is_the_exact_value_rounded(name: str) -> None:
    q, k, v = _inputs(name)
    want = _run(name, q.double(), k.double(), v.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = _run(name, q, k, v)
    assert got.dtype == torch.bfloat16
    ulps = _ulps(got, want)
    # Rounding alone is half an ulp; the fp32 computation adds ~1e-7 relative.
    assert ulps.max() <= 1.0, f'{name}: {ulps.max():.1f} ulps off the float64 value'
    # The same operator on fp32 inputs, rounded, is what bf16 inputs give.
    ref = _run(name, q.float(), k.float(), v.float()).bfloat16()
    assert (ref == got).double().mean() > 0.999, name
