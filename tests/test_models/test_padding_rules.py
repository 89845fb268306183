"""Padded windows, stripes and patches: every backbone computes what its release (or its
documented rule) computes at sizes whose maps are not multiples of a window.

The truths are written here, token by token, independently of the models' code:
Swin's shifted-window softmax attention with the padding attended (the authors'
Agent-Swin detection backbone, MMDetection's Swin) or masked (ours); a stripe computed
on its own crop (masked) or on its crop zero-padded (attended); PVT's unpadded strided
embedding. Each backbone is run with its attentions replaced by these and compared.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from mmlinattn.models.backbones import (
    AgentCSwin,
    AgentPVT,
    AgentSwin,
    FLattenCSwin,
    FLattenSwin,
    InLineCSwin,
    InLinePVT,
    InLineSwin,
)
from mmlinattn.models.backbones.inline_cswin import CSwinBranch
from mmlinattn.models.layers import InLineAttention, WindowSoftmaxAttention

DATA = Path(__file__).resolve().parents[1] / 'data'
SMALL = dict(embed_dims=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 4, 8))


def window_attention_truth(attn: WindowSoftmaxAttention, x: torch.Tensor, pad_mask: bool
                           ) -> torch.Tensor:
    """Swin's window attention of ``x (B, H, W, C)``, one window and one token pair at a
    time: zero-pad to whole windows, roll by the shift, -100 between the shift's regions
    and (``pad_mask``) towards padded keys, relative position bias, softmax."""
    b, h, w, c = x.shape
    ws, heads = attn.window_size, attn.num_heads
    d = c // heads
    # Masked: a map within one window is not shifted (Swin's classifiers);
    # attended: shifted at every size (the detection code).
    shift = attn.shift_size if (not pad_mask or h > ws or w > ws) else 0
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    padded = torch.zeros(b, hp, wp, c)
    padded[:, :h, :w] = x
    qkv = attn.qkv(padded)
    table = attn.relative_position_bias_table

    def region(p: int, size: int) -> int:  # which of Swin's three shift slices
        return 0 if shift == 0 or p < size - ws else 1 if p < size - shift else 2

    out = torch.zeros(b, hp, wp, c)
    for wi in range(0, hp, ws):
        for wj in range(0, wp, ws):
            cells = [(wi + a, wj + e) for a in range(ws) for e in range(ws)]  # rolled frame
            src = [((i + shift) % hp, (j + shift) % wp) for i, j in cells]  # padded map
            tok = torch.stack([qkv[:, i, j] for i, j in src], 1).view(b, len(src), 3, heads, d)
            q, k, v = tok.unbind(2)
            logits = torch.einsum('bnhd,bmhd->bhnm', q * d ** -0.5, k)
            extra = torch.zeros(heads, len(cells), len(cells))
            for n, (ni, nj) in enumerate(cells):
                for m, (mi, mj) in enumerate(cells):
                    rel = (ni - mi + ws - 1) * (2 * ws - 1) + (nj - mj + ws - 1)
                    extra[:, n, m] = table[rel]
                    if (region(ni, hp), region(nj, wp)) != (region(mi, hp), region(mj, wp)):
                        extra[:, n, m] -= 100.0
                    if pad_mask and (src[m][0] >= h or src[m][1] >= w):
                        extra[:, n, m] -= 100.0
            weights = torch.softmax(logits + extra, dim=-1)
            o = torch.einsum('bhnm,bmhd->bnhd', weights, v).reshape(b, len(src), c)
            for n, (i, j) in enumerate(src):
                out[:, i, j] = o[:, n]
    return attn.proj(out[:, :h, :w])


@pytest.mark.parametrize('hw', [(5, 7), (3, 3), (8, 4)])
@pytest.mark.parametrize('shift', [0, 2])
@pytest.mark.parametrize('pad_mask', [True, False])
def test_window_softmax_attention_padding_rules(hw, shift, pad_mask):
    torch.manual_seed(0)
    attn = WindowSoftmaxAttention(12, 3, window_size=4, shift_size=shift,
                                  pad_mask=pad_mask).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        x = torch.randn(2, *hw, 12)
        torch.testing.assert_close(attn(x), window_attention_truth(attn, x, pad_mask),
                                   rtol=1e-5, atol=1e-5)


def test_the_two_padding_rules_differ():
    """Where a window holds padding the rules give different outputs (so the tests
    above can tell them apart)."""
    torch.manual_seed(0)
    attn = WindowSoftmaxAttention(12, 3, window_size=4, shift_size=2).eval()
    x = torch.randn(1, 5, 7, 12)
    with torch.no_grad():
        masked = attn(x)
        attn.pad_mask = False
        attended = attn(x)
    assert (masked - attended).abs().max() > 1e-3


@pytest.mark.parametrize('key', ['agent_swin_window_block_5x7', 'agent_swin_window_block_3x3',
                                 'agent_swin_window_block_5x7_unshifted'])
def test_window_block_equals_the_authors_detection_block(key):
    """The authors' Agent-Swin detection block (``attn_type='B'``), recorded by
    ``tests/reference_parity.py --record`` at sizes that are no multiple of its window,
    against ours with the padding attended (Agent-Swin's default)."""
    from mmlinattn.models.layers.block import TransformerBlock

    ref = json.loads((DATA / 'sibling_reference_outputs.json').read_text())[key]
    cfg = ref['config']
    attn = WindowSoftmaxAttention(cfg['dim'], cfg['num_heads'], cfg['window'], cfg['shift'],
                                  pad_mask=False)
    block = TransformerBlock(cfg['dim'], attn, mlp_ratio=4., norm_eps=1e-5).eval()
    state = {k: torch.tensor(v['values']).reshape(v['shape'])
             for k, v in ref['state_dict'].items() if not k.endswith('relative_position_index')}
    block.load_state_dict(state)
    x = torch.tensor(ref['input']['values']).reshape(ref['input']['shape'])
    h, w = cfg['hw']
    with torch.no_grad():
        out = block(x.view(x.shape[0], h, w, -1)).flatten(1, 2)
    expected = torch.tensor(ref['output']['values']).reshape(ref['output']['shape'])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _with_truth(model: torch.nn.Module, pad_mask: bool) -> int:
    """Replace every window softmax attention's forward by the truth above."""
    count = 0
    for m in model.modules():
        if isinstance(m, WindowSoftmaxAttention):
            m.forward = functools.partial(window_attention_truth, m, pad_mask=pad_mask)
            count += 1
    return count


@pytest.mark.parametrize('cls,arch,kwargs,rule', [
    # The authors' detection code attends the padding; so does Agent-Swin by default.
    (AgentSwin, dict(SMALL, attn_types='AAAB', agent_num=(4, 4, 9, 9)),
     dict(pretrain_img_size=64, agent_shapes=[(3, 3), (3, 3), (3, 3), None]), False),
    (InLineSwin, dict(SMALL, attn_types='IIIS'), {}, True),
    (FLattenSwin, dict(SMALL, attn_types='LLLS'), dict(pretrain_img_size=64), True),
])
@pytest.mark.parametrize('pad_mask', [None, True, False])
def test_swin_backbones_pad_their_windows_by_their_rule(cls, arch, kwargs, rule, pad_mask):
    """Stage 4 of a 148 x 212 image is 5 x 7, windows of 4: padding below and to the
    right, shifted blocks. ``pad_mask=None``: the family's default rule."""
    torch.manual_seed(0)
    extra = {} if pad_mask is None else dict(pad_mask=pad_mask)
    model = cls(arch, softmax_window=4, drop_path_rate=0., **kwargs, **extra).eval()
    x = torch.randn(1, 3, 148, 212)
    with torch.no_grad():
        ours = model(x)
        assert _with_truth(model, rule if pad_mask is None else pad_mask) == 2
        truth = model(x)
    assert tuple(ours[3].shape[2:]) == (5, 7)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def stripe_truth(branch: CSwinBranch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 x_mean: torch.Tensor, pad_mask: bool) -> torch.Tensor:
    """A striped or windowed branch region by region: each region's crop attended as a
    whole map of its own (masked), or the crop zero-padded to the full region first
    (attended); the branch's weights, no regions inside."""
    whole = CSwinBranch(q.shape[-1], branch.num_heads, branch.kind, None, branch.attention,
                        branch.kernel)
    whole.load_state_dict(branch.state_dict())
    whole.eval()
    b, h, w, c = q.shape
    if branch.stripe is not None:
        axis, size = branch.stripe
        rh, rw = (h, size) if axis == 0 else (size, w)
    else:
        rh, rw = (h, w) if h <= branch.window and w <= branch.window else (branch.window,) * 2
    out = torch.zeros_like(q)
    for y in range(0, h, rh):
        for x in range(0, w, rw):
            y1, x1 = min(h, y + rh), min(w, x + rw)
            crops = [t[:, y:y1, x:x1] for t in (q, k, v)]
            if not pad_mask:
                crops = [torch.nn.functional.pad(t, (0, 0, 0, rw - (x1 - x), 0, rh - (y1 - y)))
                         for t in crops]
            out[:, y:y1, x:x1] = whole(*crops, x_mean)[:, :y1 - y, :x1 - x]
    return out


@pytest.mark.parametrize('kind,stripe,window', [('softmax', (0, 4), None),
                                                ('softmax', (1, 3), None),
                                                ('inline', (0, 4), None),
                                                ('inline', None, 4)])
@pytest.mark.parametrize('pad_mask', [True, False])
def test_stripes_and_windows_padding_rules(kind, stripe, window, pad_mask):
    torch.manual_seed(0)
    branch = CSwinBranch(8, 2, kind, stripe, window=window, pad_mask=pad_mask).eval()
    q, k, v = torch.randn(3, 2, 5, 7, 8).unbind(0)
    x_mean = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(branch(q, k, v, x_mean),
                                   stripe_truth(branch, q, k, v, x_mean, pad_mask),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pad_mask', [True, False])
def test_inline_windows_padding_rules(pad_mask):
    """InLine attention in windows: a masked window equals the attention of its crop;
    an attended one, of its crop zero-padded (before the projections, as Swin pads)."""
    torch.manual_seed(0)
    attn = InLineAttention(8, 2, window_size=4, pad_mask=pad_mask).eval()
    whole = InLineAttention(8, 2).eval()
    whole.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 7, 8)
    truth = torch.zeros_like(x)
    with torch.no_grad():
        for y in range(0, 5, 4):
            for z in range(0, 7, 4):
                crop = x[:, y:y + 4, z:z + 4]
                if not pad_mask:
                    crop = torch.nn.functional.pad(crop, (0, 0, 0, 4 - crop.shape[2],
                                                          0, 4 - crop.shape[1]))
                truth[:, y:y + 4, z:z + 4] = whole(crop)[:, :min(4, 5 - y), :min(4, 7 - z)]
        torch.testing.assert_close(attn(x), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cls,arch,kwargs', [
    (InLineCSwin, dict(SMALL, attn_types='IISS'), dict(inline_window=4)),
    (AgentCSwin, dict(SMALL, attn_types='AABB', agent_num=(4, 4, 9, 9)),
     dict(pretrain_img_size=64, agent_shapes=[(3, 3), (2, 3), None, None])),
    (FLattenCSwin, dict(SMALL, attn_types='LLSS'), dict(pretrain_img_size=64)),
])
@pytest.mark.parametrize('pad_mask', [None, False])
def test_cswin_backbones_pad_their_stripes_by_their_rule(cls, arch, kwargs, pad_mask):
    """Stage 3 of a 148 x 212 image is 10 x 14 with stripes of 4: padded both ways. No
    CSwin-based detector was released; the default masks the padding."""
    torch.manual_seed(0)
    extra = {} if pad_mask is None else dict(pad_mask=pad_mask)
    model = cls(arch, split_size=4, drop_path_rate=0., **kwargs, **extra).eval()
    rule = True if pad_mask is None else pad_mask
    x = torch.randn(1, 3, 148, 212)
    with torch.no_grad():
        ours = model(x)
        replaced = 0
        for m in model.modules():
            if isinstance(m, CSwinBranch) and (m.stripe is not None or m.window is not None):
                m.forward = functools.partial(stripe_truth, m, pad_mask=rule)
                replaced += 1
        assert replaced >= 2
        truth = model(x)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_agent_pvt_drops_the_remainder_as_released():
    """The authors' PVT detection backbones embed with unpadded strided convolutions: a
    333 x 517 image gives 83 x 129 stage-1 maps, the same as its first 332 x 516 pixels.
    InLine-PVT (no released detection code) pads instead: 84 x 130."""
    torch.manual_seed(0)
    arch = dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2),
                agent_num=(4, 4, 9, 9))
    model = AgentPVT(arch, pretrain_img_size=64, agent_shapes=[(3, 3)] * 4,
                     drop_path_rate=0.).eval()
    x = torch.randn(1, 3, 333, 517)
    with torch.no_grad():
        outs = model(x)
        cropped = model(x[:, :, :332, :516])
    assert [tuple(o.shape[2:]) for o in outs] == [(83, 129), (41, 64), (20, 32), (10, 16)]
    for a, b in zip(outs, cropped):
        torch.testing.assert_close(a, b)
    inline = InLinePVT(dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2)),
                       drop_path_rate=0.).eval()
    with torch.no_grad():
        assert tuple(inline(x)[0].shape[2:]) == (84, 130)


@pytest.mark.parametrize('make', [
    lambda: AgentPVT(dict(SMALL, embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2),
                          agent_num=(4, 4, 9, 9)), pretrain_img_size=64,
                     agent_shapes=[(3, 3)] * 4, drop_path_rate=0.),
    lambda: AgentSwin(dict(SMALL, attn_types='AAAB', agent_num=(4, 4, 9, 9)),
                      pretrain_img_size=64, softmax_window=4, drop_path_rate=0.,
                      agent_shapes=[(3, 3), (3, 3), (3, 3), None]),
])
def test_chunked_equals_whole_with_the_released_padding(make):
    """Token-chunked inference keeps its equality at an odd size under the released
    rules (dropped remainders, attended window padding)."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, 3, 149, 213)
    with torch.no_grad():
        whole = model(x)
        model.chunk_tokens = 100
        chunked = model(x)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
