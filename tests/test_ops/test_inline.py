"""The attention functions against their explicit N x N definitions (docs/method.md)."""
import explicit
import pytest
import torch

from mmlinattn.ops import (
    KERNELS,
    get_kernel,
    inline_attention,
    inline_attention_weights,
    linear_attention,
    softmax_attention,
)


def _qkv(b=2, h=3, n=50, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def _explicit_inline(q, k, v, kernel):
    """InL(q_i)_j = s/N phi(q_i).phi(k_j) - s/N^2 sum_t phi(q_i).phi(k_t) + 1/N, then @ v."""
    phi = get_kernel(kernel) or (lambda t: t)
    q, k = phi(q), phi(k)
    n, s = k.shape[2], q.shape[-1]**-0.5
    sim = s * q @ k.transpose(-2, -1)
    weights = sim / n - sim.sum(-1, keepdim=True) / n**2 + 1.0 / n
    return weights, weights @ v


@pytest.mark.parametrize('kernel', sorted(KERNELS))
def test_inline_equals_nxn_and_covariance_forms(kernel):
    q, k, v = _qkv()
    weights, expected = _explicit_inline(q, k, v, kernel)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    torch.testing.assert_close(inline_attention_weights(q, k, kernel=kernel), weights)
    out = inline_attention(q, k, v, kernel=kernel)
    torch.testing.assert_close(out, expected.float().to(out.dtype), rtol=1e-5, atol=1e-5)
    # The paper's expanded form, token by token: s/N sum_j (q_i.k_j) v_j + (1 - s q_i.kbar) vbar.
    phi = get_kernel(kernel) or (lambda t: t)
    pq, pk = phi(q), phi(k)
    s, n = q.shape[-1]**-0.5, q.shape[2]
    kbar, vbar = pk.mean(2), v.mean(2)
    for i in (0, n // 2, n - 1):
        qi = pq[:, :, i]  # (B, heads, d)
        dots = (qi[:, :, None, :] * pk).sum(-1)  # (B, heads, N)
        expanded_i = (s / n * (dots[..., None] * v).sum(2)
                      + (1 - s * (qi * kbar).sum(-1, keepdim=True)) * vbar)
        torch.testing.assert_close(out[:, :, i], expanded_i.to(out.dtype), rtol=1e-5, atol=1e-5)


def test_negative_weights_exist_but_rows_sum_to_one():
    q, k, _ = _qkv(n=30)
    w = inline_attention_weights(q, k)
    assert (w < 0).any()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=w.dtype))


def test_injectivity_inline_vs_linear():
    q, k, v = _qkv(n=40)
    q = q.abs() + 0.1  # positive queries: ReLU leaves them (and 2q) unchanged
    inl_1, inl_2 = inline_attention(q, k, v), inline_attention(2 * q, k, v)
    lin_1, lin_2 = linear_attention(q, k, v), linear_attention(2 * q, k, v)
    assert (inl_1 - inl_2).abs().max() > 1e-2
    torch.testing.assert_close(lin_1, lin_2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('fn', [inline_attention, linear_attention, softmax_attention])
def test_masked_padding_equals_unpadded(fn):
    q, k, v = _qkv(b=2, n=37, dtype=torch.float32)
    n_valid = (37, 23)
    mask = torch.zeros(2, 37, dtype=torch.bool)
    for i, n in enumerate(n_valid):
        mask[i, :n] = True
    out = fn(q, k, v, mask=mask)
    for i, n in enumerate(n_valid):
        ref = fn(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
        torch.testing.assert_close(out[i:i + 1, :, :n], ref, rtol=1e-5, atol=1e-5)
    # The explicit weights put nothing on padding and still sum to one.
    w = inline_attention_weights(q.double(), k.double(), mask=mask)
    assert w[1, ..., 23:].abs().max() == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=w.dtype))


def test_linear_attention_matches_nxn():
    q, k, v = _qkv()
    pq, pk = torch.relu(q), torch.relu(k)
    sim = pq @ pk.transpose(-2, -1)
    expected = sim @ v / (sim.sum(-1, keepdim=True) + 1e-6 * q.shape[2])
    torch.testing.assert_close(linear_attention(q, k, v), expected.float().double(), rtol=1e-4,
                               atol=1e-5)


def test_softmax_attention_matches_nxn():
    q, k, v = _qkv(dtype=torch.float32)
    w = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1]**-0.5, dim=-1)
    torch.testing.assert_close(softmax_attention(q, k, v), w @ v, rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_kernels_are_named():
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match='unknown attention kernel'):
        inline_attention(q, k, v, kernel='gelu')
    with pytest.raises(ValueError, match=r'\(batch, heads, tokens, head_dim\)'):
        inline_attention(q[0], k, v)
    with pytest.raises(ValueError, match='mask must be'):
        inline_attention(q, k, v, mask=torch.ones(2, 3, dtype=torch.bool))


def test_quarter_million_tokens_in_linear_memory():
    """N = 512 x 512: an N x N matrix would need 256 GiB in fp32; this needs ~100 MiB."""
    n = 512 * 512
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    out = inline_attention(q, k, v)
    assert out.shape == (1, 2, n, 16) and torch.isfinite(out).all()
    # Check a few rows against the covariance form in float64.
    qd, kd, vd = q.double(), k.double(), v.double()
    kbar, vbar = kd.mean(2, keepdim=True), vd.mean(2, keepdim=True)
    cov = kd.transpose(-2, -1) @ vd / n - kbar.transpose(-2, -1) @ vbar
    rows = torch.tensor([0, 1, n // 2, n - 1])
    expected = vbar + 16**-0.5 * qd[:, :, rows] @ cov
    torch.testing.assert_close(out[:, :, rows].double(), expected, rtol=1e-4, atol=1e-5)


def test_half_precision_large_n_and_magnitude():
    """Keys/values of magnitude 1e3 over 10^6 tokens: sum_j k_j v_j^T reaches ~1e12, far past
    fp16's 65504, while the output itself (~1e3) is representable."""
    n = 10**6
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n, 16, generator=g)
    k, v = (torch.randn(1, 1, n, 16, generator=g) * 1e3 for _ in range(2))
    k = k + 2e3  # a large mean makes the raw sums overflow for sure
    ref = inline_attention(q, k, v)
    out16 = inline_attention(q.half(), k.half(), v.half())
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
    rel = (out16.float() - ref).norm() / ref.norm()
    assert rel < 5e-3
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outbf = inline_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.isfinite(outbf).all()
    assert (outbf.float() - ref).norm() / ref.norm() < 3e-2


@pytest.mark.parametrize('masked', [False, True])
def test_chunked_reductions_equal_one_pass(monkeypatch, masked):
    """Large N is processed in cache-sized chunks; results and gradients must not change."""
    import mmlinattn.ops.inline as inline_mod

    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, n=3000, d=8, dtype=torch.float64))
    mask = torch.ones(2, 3000, dtype=torch.bool)
    mask[1, 2100:] = False
    mask = mask if masked else None
    ref = inline_attention(q, k, v, mask=mask)
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    monkeypatch.setattr(inline_mod, 'CHUNK_BYTES', 1)  # chunks of the 1024-token minimum
    assert inline_mod._chunk_size(q, 16) == 1024
    out = inline_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), (q, k, v)), grads_ref):
        torch.testing.assert_close(g, g_ref)


# -- gradients -------------------------------------------------------------------------------
def _mask(b, n):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - 3:] = False  # bottom/right padding
    mask[-1, 1] = False  # and a hole
    return mask


def _explicit_masked(q, k, v, mask, kernel):
    """Per sample: the N x N weights over that sample's valid keys, every query."""
    phi = get_kernel(kernel) or (lambda t: t)
    q, k = phi(q), phi(k)
    outs = []
    for b in range(q.shape[0]):
        keep = mask[b] if mask is not None else slice(None)
        outs.append(explicit.inline_weights(q[b], k[b][:, keep]) @ v[b][:, keep])
    return torch.stack(outs)


@pytest.mark.parametrize('kernel', sorted(KERNELS))
@pytest.mark.parametrize('masked', [False, True])
def test_inline_gradients_gradcheck_and_equal_the_explicit_form(kernel, masked):
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, n=9, d=3))
    mask = _mask(2, 9) if masked else None
    assert torch.autograd.gradcheck(
        lambda a, b, c: inline_attention(a, b, c, mask=mask, kernel=kernel), (q, k, v))
    weight = torch.randn(2, 2, 9, 3, dtype=torch.float64)
    ours = torch.autograd.grad((inline_attention(q, k, v, mask, kernel) * weight).sum(), (q, k, v))
    ref = torch.autograd.grad((_explicit_masked(q, k, v, mask, kernel) * weight).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_chunked_backward_equals_the_explicit_form(monkeypatch):
    import mmlinattn.ops.inline as inline_module

    monkeypatch.setattr(inline_module, 'CHUNK_BYTES', 64)  # 1024-token chunks: 2 of them
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, n=1100, d=2))
    mask = _mask(1, 1100)
    weight = torch.randn(1, 1, 1100, 2, dtype=torch.float64)
    ours = torch.autograd.grad((inline_attention(q, k, v, mask) * weight).sum(), (q, k, v))
    ref = torch.autograd.grad((_explicit_masked(q, k, v, mask, 'identity') * weight).sum(),
                              (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_backward_keeps_only_the_inputs_and_d_by_d_statistics():
    """q, k, v as views of one qkv tensor: backward keeps that tensor and O(d^2) more,
    also with a mask and under bf16 autocast (no masked or float32 copies)."""
    from mmlinattn.utils import record_saved_tensors

    b, h, n, d = 2, 3, 4096, 16
    for dtype in (torch.float32, torch.bfloat16):
        leaf = torch.randn(b, n, 3, h, d, dtype=dtype, requires_grad=True)
        qkv = leaf * 1  # as a Linear's output
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (b, h, n, d) views
        with record_saved_tensors() as saved:
            out = inline_attention(q, k, v, mask=_mask(b, n))
        qkv_bytes = qkv.numel() * qkv.element_size()
        assert saved.bytes <= qkv_bytes + 64 * 1024, (dtype, saved.bytes, qkv_bytes)
        out.float().sum().backward()
        assert torch.isfinite(leaf.grad).all()
