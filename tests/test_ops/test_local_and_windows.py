"""The local residual and the attention modules against explicit computations."""
import explicit
import pytest
import torch
import torch.nn.functional as F

from mmlinattn.models.layers import InLineAttention, LocalResidual, WindowSoftmaxAttention
from mmlinattn.ops import dynamic_depthwise_conv3x3, pad_to_multiple, window_merge, window_partition


def test_dynamic_depthwise_conv_per_sample():
    x = torch.randn(3, 6, 7, 5)
    taps = torch.randn(3, 5, 3, 3)
    out = dynamic_depthwise_conv3x3(x, taps)
    for b in range(3):
        ref = F.conv2d(x[b].permute(2, 0, 1)[None], taps[b][:, None], padding=1, groups=5)
        torch.testing.assert_close(out[b], ref[0].permute(1, 2, 0), rtol=1e-5, atol=1e-5)


def test_local_residual_tap_layout():
    """Output channel c*9 + t of the tap MLP is tap t (row-major) of channel c."""
    res = LocalResidual(dim=4, num_heads=2)
    mean = torch.randn(1, 4)
    raw = res[2](res[1](res[0](mean[..., None])))[0, :, 0]
    taps = res.taps(mean)
    assert taps[0, 2, 1, 0] == raw[2 * 9 + 3]
    v = torch.zeros(1, 5, 5, 4)
    v[0, 2, 2] = 1.0  # a unit impulse reproduces each channel's kernel, flipped
    out = res(v, mean)
    torch.testing.assert_close(out[0, 1:4, 1:4].permute(2, 0, 1), taps[0].flip(-1, -2))


def test_window_partition_roundtrip_and_padding():
    x = torch.randn(2, 10, 13, 3)
    xp = pad_to_multiple(x, 4)
    assert xp.shape == (2, 12, 16, 3)
    assert torch.equal(window_merge(window_partition(xp, 4), 12, 16), xp)
    with pytest.raises(ValueError, match='not a multiple'):
        window_partition(x, 4)


def test_inline_attention_module_equals_explicit():
    torch.manual_seed(0)
    attn = InLineAttention(16, 2)
    x = torch.randn(2, 5, 7, 16)
    torch.testing.assert_close(attn(x), explicit.inline_map(attn, x), rtol=1e-4, atol=1e-4)


def test_windowed_inline_attends_within_each_window_with_padding_masked():
    torch.manual_seed(0)
    attn = InLineAttention(16, 2, window_size=4)
    x = torch.randn(1, 6, 9, 16)  # padded to 8 x 12: full, partial and corner windows
    out = attn(x)
    assert out.shape == x.shape
    for r0, r1 in ((0, 4), (4, 6)):
        for c0, c1 in ((0, 4), (4, 8), (8, 9)):
            region = x[:, r0:r1, c0:c1]
            torch.testing.assert_close(out[:, r0:r1, c0:c1], explicit.inline_map(attn, region),
                                       rtol=1e-4, atol=1e-4)


def test_window_covering_the_map_is_one_region():
    """A map inside the window is attended whole; one side past it makes windows again."""
    torch.manual_seed(0)
    attn = InLineAttention(16, 2, window_size=8)
    x = torch.randn(2, 8, 6, 16)
    torch.testing.assert_close(attn(x), explicit.inline_map(attn, x), rtol=1e-4, atol=1e-4)
    x = torch.randn(1, 9, 6, 16)  # 9 rows > 8: windows of 8x8, rows 0-7 and row 8 (padded)
    out = attn(x)
    for rows, cols in explicit.regions(9, 6, 8, 8):
        torch.testing.assert_close(out[:, rows, cols], explicit.inline_map(attn, x[:, rows, cols]),
                                   rtol=1e-4, atol=1e-4)


def test_class_token_takes_part_in_attention_but_not_in_the_local_term():
    """DeiT's path: N counts the class token, the 3x3 term runs on the patch map only."""
    torch.manual_seed(0)
    attn = InLineAttention(16, 2)
    tokens = torch.randn(2, 1 + 3 * 5, 16)
    torch.testing.assert_close(attn.forward_tokens(tokens, (3, 5), num_prefix=1),
                               explicit.inline_tokens(attn, tokens, (3, 5), num_prefix=1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('operator', ['linear', 'softmax'])
def test_ablation_operators_share_the_layout(operator):
    inl = InLineAttention(16, 2)
    other = InLineAttention(16, 2, operator=operator)
    other.load_state_dict(inl.state_dict())
    x = torch.randn(1, 4, 5, 16)
    assert other(x).shape == x.shape
    assert not torch.allclose(other(x), inl(x))


def _explicit_window_softmax(attn: WindowSoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
    """Unshifted window attention on one window-sized map, with the relative position bias."""
    b, h, w, c = x.shape
    heads, d, ws = attn.num_heads, c // attn.num_heads, attn.window_size
    t = x.reshape(b, h * w, c)
    q, k, v = attn.qkv(t).split(c, dim=-1)
    coords = [(i, j) for i in range(h) for j in range(w)]
    bias = torch.empty(heads, len(coords), len(coords))
    for a, (i1, j1) in enumerate(coords):
        for z, (i2, j2) in enumerate(coords):
            bias[:, a, z] = attn.relative_position_bias_table[(i1 - i2 + ws - 1) * (2 * ws - 1)
                                                              + (j1 - j2 + ws - 1)]
    out = torch.empty_like(q)
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        logits = d**-0.5 * q[..., sl] @ k[..., sl].transpose(-2, -1) + bias[i]
        out[..., sl] = logits.softmax(-1) @ v[..., sl]
    return attn.proj(out).reshape(b, h, w, c)


def test_window_softmax_padding_is_masked():
    torch.manual_seed(0)
    attn = WindowSoftmaxAttention(16, 2, window_size=4)
    x = torch.randn(1, 6, 5, 16)
    out = attn(x)
    for r0, r1 in ((0, 4), (4, 6)):
        for c0, c1 in ((0, 4), (4, 5)):
            torch.testing.assert_close(out[:, r0:r1, c0:c1],
                                       _explicit_window_softmax(attn, x[:, r0:r1, c0:c1]),
                                       rtol=1e-4, atol=1e-4)


def test_shifted_window_softmax_equals_unshifted_on_rolled_regions():
    """A shifted block equals the unshifted one applied to the rolled map where no region
    boundary is crossed: the interior window of a 3x3-window map, rolled by the shift."""
    torch.manual_seed(0)
    plain = WindowSoftmaxAttention(16, 2, window_size=4)
    shifted = WindowSoftmaxAttention(16, 2, window_size=4, shift_size=2)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(1, 12, 12, 16)
    out = shifted(x)
    # Window (1, 1) of the rolled map covers original rows/cols 6..9: all one region.
    expected = _explicit_window_softmax(plain, x[:, 6:10, 6:10])
    torch.testing.assert_close(out[:, 6:10, 6:10], expected, rtol=1e-4, atol=1e-4)
    # A token near the bottom-right border may not see wrapped-around tokens from the top-left.
    x2 = x.clone()
    x2[:, :2, :2] += 10.0  # top-left corner, wrapped next to the bottom-right by the roll
    torch.testing.assert_close(shifted(x2)[:, 10:, 10:], out[:, 10:, 10:], rtol=1e-4, atol=1e-4)
