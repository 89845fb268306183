"""What training keeps for backward: the MLP's recomputed GELU and the InLine block."""
import pytest
import torch
import torch.nn.functional as F

from mmlinattn.models.layers import InLineAttention, Mlp, TransformerBlock
from mmlinattn.utils import record_saved_tensors


def _layer_by_layer(mlp, x):
    return mlp.fc2(F.gelu(mlp.fc1(x)))


def test_mlp_gradients_gradcheck_and_equal_layer_by_layer():
    torch.manual_seed(0)
    mlp = Mlp(6, 10).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    assert torch.autograd.gradcheck(lambda *_: mlp(x), params)
    weight = torch.randn(2, 3, 6, dtype=torch.float64)
    ours = torch.autograd.grad((mlp(x) * weight).sum(), params)
    ref = torch.autograd.grad((_layer_by_layer(mlp, x) * weight).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_mlp_under_bf16_autocast_matches_the_layers_under_autocast():
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(4, 50, 32, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours, ref = mlp(x), _layer_by_layer(mlp, x)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours.float().square().sum(), (x, mlp.fc1.weight))
    g_ref = torch.autograd.grad(ref.float().square().sum(), (x, mlp.fc1.weight))
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_mlp_keeps_one_hidden_tensor():
    mlp = Mlp(16, 64)
    x = torch.randn(1, 1000, 16, requires_grad=True)
    with record_saved_tensors(exclude=mlp.parameters()) as saved:
        mlp(x)
    # x (16 wide) and fc1's output (64 wide), float32: not the GELU's output too.
    assert saved.bytes == 1000 * (16 + 64) * 4


@pytest.mark.parametrize('window', [None, 7])
def test_inline_block_saves_at_most_12_token_widths(window):
    """InLine-Swin's block (MLP ratio 4): LayerNorm inputs 2C, attention 5C (its input,
    qkv, the projection's input) with one more C per window copy, MLP 5C."""
    block = TransformerBlock(96, InLineAttention(96, 3, window_size=window), mlp_ratio=4)
    x = torch.randn(1, 62, 62, 96, requires_grad=True)
    with record_saved_tensors(exclude=block.parameters()) as saved:
        block(x)
    per_token = saved.bytes / (62 * 62) / (4 * 96)
    assert per_token <= (12.2 if window is None else 14.3), per_token
