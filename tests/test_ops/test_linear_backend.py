"""Linear layers through oneDNN on the CPU: the same values and gradients as ``F.linear``
(checked against float64), the path really taken where it should be and never where a
traced or exported graph needs the portable ``F.linear``."""
import pytest
import torch
import torch.nn.functional as F

from mmlinattn.models.layers import Linear, Mlp
from mmlinattn.ops import linear, set_linear_backend
from mmlinattn.ops.dense import onednn_linear_applies
from mmlinattn.utils.cpu import cpu_has_native_bf16

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason='PyTorch built without oneDNN')


def _onednn_calls(fn) -> int:
    """How many times ``fn()`` runs oneDNN's inner product (by the profiler's record)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == 'mkldnn::_linear_pointwise')


def _with_aten(fn):
    """``fn()`` with the ``aten`` backend (``F.linear``), the backend restored after."""
    set_linear_backend('aten')
    try:
        return fn()
    finally:
        set_linear_backend(None)


def _inputs(rows: int = 300, cin: int = 48, cout: int = 80):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, rows, cin, generator=g), torch.randn(cout, cin, generator=g) / 7,
            torch.randn(cout, generator=g))


@pytest.mark.parametrize('activation', ['none', 'gelu'])
def test_fp32_inference_goes_through_onednn_and_equals_the_float64_product(activation) -> None:
    x, w, b = _inputs()
    truth = F.linear(x.double(), w.double(), b.double())
    truth = F.gelu(truth) if activation == 'gelu' else truth
    with torch.no_grad():
        assert _onednn_calls(lambda: linear(x, w, b, activation)) == 1
        out = linear(x, w, b, activation)
    assert out.dtype == torch.float32 and out.shape == (2, 300, 80)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    # Rows computed apart give the same bits as rows computed together (chunked bands,
    # spatial ranks).
    with torch.no_grad():
        assert torch.equal(linear(x[:, 100:237], w, b, activation), out[:, 100:237])


@pytest.mark.skipif(not cpu_has_native_bf16(), reason='bf16 is emulated on this CPU')
def test_under_bf16_autocast_it_runs_in_bf16_like_f_linear() -> None:
    x, w, b = _inputs()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert _onednn_calls(lambda: linear(x, w, b)) == 1
        out = linear(x, w, b, 'gelu')
        stock = F.gelu(F.linear(x, w, b))
    assert out.dtype == stock.dtype == torch.bfloat16
    # The bias and the GELU are applied to the fp32 sums and rounded to bf16 once: within
    # one bf16 ulp of the float64 value. F.linear rounds the product to bf16 before the
    # GELU, so it is further off.
    truth = F.gelu(F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double()))
    ulp = truth.abs().clamp_min(2.0**-10) * 2.0**-7
    assert ((out.double() - truth).abs() <= ulp).all()
    assert (out.double() - truth).abs().mean() < (stock.double() - truth).abs().mean()


def test_traced_graphs_and_the_aten_backend_take_f_linear() -> None:
    x, w, b = _inputs()
    layer = Linear(48, 80)
    with torch.no_grad():
        assert onednn_linear_applies(x, layer.weight, layer.bias)
        fast = layer(x)
        # A traced (exported) graph holds the portable operator, not oneDNN's.
        graph = str(torch.jit.trace(layer, x).graph)
        assert 'aten::linear' in graph and 'mkldnn' not in graph
        assert not _with_aten(lambda: onednn_linear_applies(x, layer.weight, layer.bias))
        assert _with_aten(lambda: _onednn_calls(lambda: layer(x))) == 0
        stock = _with_aten(lambda: layer(x))
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-6)
    # float64 is not oneDNN's: F.linear.
    assert not onednn_linear_applies(x.double(), w.double())
    with pytest.raises(ValueError, match='linear backend must be one of'):
        set_linear_backend('mkl')
    with pytest.raises(ValueError, match='activation must be one of'):
        linear(x, w, b, 'relu6')


def test_mlp_inference_fuses_the_gelu_and_keeps_the_values() -> None:
    mlp = Mlp(32, 128).eval()
    x = torch.randn(1, 9, 11, 32)
    with torch.no_grad():
        assert _onednn_calls(lambda: mlp(x)) == 2  # fc1 (with its GELU) and fc2
        out = mlp(x)
        truth = F.linear(F.gelu(F.linear(x.double(), mlp.fc1.weight.double(),
                                          mlp.fc1.bias.double())),
                         mlp.fc2.weight.double(), mlp.fc2.bias.double())
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-6)
    # Training still stores one hidden tensor and gives the same output.
    mlp.train()
    torch.testing.assert_close(mlp(x), out, rtol=1e-5, atol=1e-6)


def _grads(layer_fn, x: torch.Tensor, params) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    out = layer_fn(x)
    g = torch.Generator().manual_seed(1)
    wide = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(wide) * torch.randn(out.shape, generator=g).to(wide)).sum().backward()
    grads = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    return [out.detach()] + grads


def test_training_runs_forward_and_backward_through_onednn_with_the_same_gradients() -> None:
    layer, mlp = Linear(48, 80), Mlp(48, 96)
    x = torch.randn(2, 300, 48)
    for fn, params in ((layer, list(layer.parameters())), (mlp, list(mlp.parameters()))):
        # Forward, the input's and the weights' gradients: all products in oneDNN.
        calls = _onednn_calls(lambda fn=fn, params=params: _grads(fn, x, params))
        assert calls == (3 if fn is layer else 6), calls
        fast = _grads(fn, x, params)
        stock = _with_aten(lambda fn=fn, params=params: _grads(fn, x, params))
        for p in params:  # float64 truth of the same layer
            p.data = p.data.double()
        truth = _grads(fn, x.double(), params)
        for p in params:
            p.data = p.data.float()
        for a, b, t in zip(fast, stock, truth):
            # fp32 sums of up to 600 products: within 2e-6 of the largest value's scale.
            assert a.shape == t.shape
            scale = 2e-6 * t.abs().max().item()
            torch.testing.assert_close(a.double(), t, rtol=0, atol=scale)
            torch.testing.assert_close(a, b, rtol=0, atol=scale)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason='bf16 is emulated on this CPU')
def test_bf16_training_gradients_match_f_linear_under_autocast() -> None:
    mlp = Mlp(48, 96)
    params = list(mlp.parameters())
    x = torch.randn(2, 300, 48)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast = _grads(mlp, x, params)
        stock = _with_aten(lambda: _grads(mlp, x, params))
    for a, b in zip(fast, stock):
        assert a.dtype == b.dtype
        # Both round bf16 products of the same inputs: within a few bf16 ulps of each other
        # relative to the gradient's scale.
        assert (a.float() - b.float()).abs().max() <= 2.0**-6 * b.float().abs().max()
