"""The attention x implementation table: selection by impl=, 'auto', and clear refusals."""
import explicit
import pytest
import torch

from mmlinattn.models.layers import InLineAttention
from mmlinattn.ops import (
    ATTENTION_IMPLS,
    AttentionImpl,
    attention,
    get_attention_impl,
    inline_attention,
    register_attention_impl,
)


def test_each_attention_has_its_torch_implementation_and_default_kernel():
    assert {name: sorted(impls) for name, impls in ATTENTION_IMPLS.items()} == {
        'inline': ['torch'], 'linear': ['torch'], 'softmax': ['torch'], 'focused': ['torch'],
        'agent': ['torch'], 'mlla': ['torch']}
    assert get_attention_impl('linear').default_kernel == 'relu'
    assert get_attention_impl('mlla').default_kernel == 'elu1'
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    torch.testing.assert_close(attention('inline', q, k, v), inline_attention(q, k, v))
    torch.testing.assert_close(attention('linear', q, k, v),
                               attention('linear', q, k, v, kernel='relu'))


def _explicit_inline(q, k, v, mask=None, kernel='identity', scale=None):
    assert mask is None and kernel == 'identity' and scale is None
    calls.append(q.dtype)
    return explicit.inline_weights(q, k) @ v


calls: list = []


@pytest.fixture
def explicit_impl():
    calls.clear()
    entry = register_attention_impl(AttentionImpl(
        'inline', 'explicit', _explicit_inline, 'identity', priority=1,
        supports=lambda q: q.dtype == torch.float64))
    yield entry
    del ATTENTION_IMPLS['inline']['explicit']


def test_a_new_implementation_is_one_entry(explicit_impl):
    q64, k64, v64 = (torch.randn(2, 2, 11, 4, dtype=torch.float64) for _ in range(3))
    # auto: the highest priority that supports the input; float32 falls back to torch.
    assert get_attention_impl('inline', 'auto', q64) is explicit_impl
    assert get_attention_impl('inline', 'auto', q64.float()).impl == 'torch'
    torch.testing.assert_close(attention('inline', q64, k64, v64),
                               inline_attention(q64, k64, v64))
    assert calls == [torch.float64]
    with pytest.raises(ValueError, match="'explicit' implementation of inline attention does "
                       'not support torch.float32'):
        attention('inline', q64.float(), k64.float(), v64.float(), impl='explicit')
    # The module runs the implementation it is given (float64 input: auto would pick ours).
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    InLineAttention(8, 2, impl='torch').double()(x)
    assert len(calls) == 1
    InLineAttention(8, 2, impl='explicit').double()(x)
    assert len(calls) == 2


def test_refusals_name_the_problem(explicit_impl):
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match=r"no 'triton' implementation; expected 'auto' or one "
                       r"of \['explicit', 'torch'\]"):
        attention('inline', q, q, q, impl='triton')
    with pytest.raises(ValueError, match="unknown attention 'cosine'"):
        attention('cosine', q, q, q)
    with pytest.raises(ValueError, match="already has a 'explicit' implementation"):
        register_attention_impl(explicit_impl)
    with pytest.raises(ValueError, match="default kernel 'relu' differs"):
        register_attention_impl(AttentionImpl('inline', 'other', _explicit_inline, 'relu'))
