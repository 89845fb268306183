"""The OpenMMLab backbone contract of every family, and their attention paths."""
import explicit
import pytest
import torch

from mmlinattn.models import (
    CSWIN_ARCHS,
    DEIT_ARCHS,
    PVT_ARCHS,
    SWIN_ARCHS,
    InLineCSwin,
    InLineDeiT,
    InLinePVT,
    InLineSwin,
)
from mmlinattn.models.backbones.inline_cswin import CSwinBranch
from mmlinattn.models.layers import parse_attn_types

ALL_ARCHS = [(InLineSwin, a) for a in SWIN_ARCHS] + [(InLinePVT, a) for a in PVT_ARCHS]


def _channels(model):
    return model.num_features


@pytest.mark.parametrize('cls,arch', ALL_ARCHS)
def test_every_arch_forward_backward_at_224(cls, arch):
    model = cls(arch, drop_path_rate=0.)
    outs = model(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, c, 56 // 2**i, 56 // 2**i)
                                             for i, c in enumerate(_channels(model))]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('cls', [InLineSwin, InLinePVT])
@pytest.mark.parametrize('hw', [(190, 250), (33, 65), (64, 64)])
def test_any_input_size(cls, hw):
    model = cls('tiny', embed_dims=32 if cls is InLineSwin else (32, 64, 96, 128),
                num_heads=(1, 2, 4, 4) if cls is InLinePVT else (1, 2, 4, 8))
    x = torch.randn(2, 3, *hw, requires_grad=True)
    outs = model(x)
    for i, o in enumerate(outs):
        stride = 4 * 2**i
        assert o.shape[-2:] == (-(-hw[0] // stride), -(-hw[1] // stride)), (i, o.shape)
        assert o.is_contiguous()
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all()


def test_windowed_inline_swin_attends_each_window_of_its_stage_maps():
    """Stage 1 of a 200x180 input is 50x45: 7x7 windows, the last row and column cut."""
    torch.manual_seed(0)
    model = InLineSwin('tiny', embed_dims=32, num_heads=(1, 2, 4, 8), drop_path_rate=0.,
                       inline_window=7)
    attn = model.layers[0].blocks[1].attn
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    model(torch.randn(1, 3, 200, 180))
    x, out = seen['x'], seen['out']
    assert x.shape[1:3] == (50, 45)
    for rows, cols in explicit.regions(50, 45, 7, 7):
        torch.testing.assert_close(out[:, rows, cols], explicit.inline_map(attn, x[:, rows, cols]),
                                   rtol=1e-4, atol=1e-4)
    small = InLineSwin('tiny', embed_dims=32, num_heads=(1, 2, 4, 8), inline_window=7)
    assert [o.shape[-1] for o in small(torch.randn(1, 3, 97, 101))] == [26, 13, 7, 4]


@pytest.mark.parametrize('cls', [InLineSwin, InLinePVT])
def test_out_indices_and_norms(cls):
    model = cls('tiny', out_indices=(1, 3))
    outs = model(torch.randn(1, 3, 64, 96))
    assert len(outs) == 2 and outs[0].shape[1] == model.num_features[1]
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3') and not hasattr(model, 'norm0')
    with pytest.raises(ValueError, match='out_indices'):
        cls('tiny', out_indices=(4, ))


@pytest.mark.parametrize('cls', [InLineSwin, InLinePVT])
def test_frozen_stages_stay_frozen(cls):
    model = cls('tiny', frozen_stages=2)
    model.train()
    stem = model.patch_embed if cls is InLineSwin else model.patch_embed1
    assert not any(p.requires_grad for p in stem.parameters())
    for i in range(2):
        for m in model._stage_modules(i):
            assert not m.training
            assert not any(p.requires_grad for p in m.parameters())
    for m in model._stage_modules(2):
        assert m.training and all(p.requires_grad for p in m.parameters())
    if cls is InLinePVT:
        assert not model.pos_embed1.requires_grad and model.pos_embed3.requires_grad
    assert model.train() is model  # chaining works, unlike mmdet's Swin


@pytest.mark.parametrize('cls', [InLineSwin, InLinePVT])
def test_with_cp_matches_without(cls):
    torch.manual_seed(0)
    ref = cls('tiny', drop_path_rate=0.)
    cp = cls('tiny', drop_path_rate=0., with_cp=True)
    cp.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    outs_ref, outs_cp = ref(x), cp(x)
    for a, b in zip(outs_ref, outs_cp):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in outs_ref).backward()
    sum(o.sum() for o in outs_cp).backward()
    for (name, p), q in zip(ref.named_parameters(), cp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='unknown InLineSwin arch'):
        InLineSwin('huge')
    with pytest.raises(ValueError, match='attn_types'):
        InLineSwin('tiny', attn_types='IIS')
    for cls in (InLineSwin, InLineCSwin, InLinePVT):
        with pytest.raises(ValueError, match='one entry per stage'):
            cls('tiny', num_heads=(2, 4, 8))
    with pytest.raises(ValueError, match='3 channels'):
        InLineSwin('tiny')(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError):
        InLinePVT('tiny', window=7)


def test_parse_attn_types():
    assert parse_attn_types('IIMS2', (2, 2, 4, 2))[2] == ['I', 'I', 'S', 'S']
    assert parse_attn_types('IIIS', (1, 1, 1, 2))[3] == ['S', 'S']
    with pytest.raises(ValueError):
        parse_attn_types('IIMS', (2, 2, 2, 2))


def test_swin_layouts_match_the_release():
    tiny = InLineSwin('tiny')
    blocks = [type(b.attn).__name__ for layer in tiny.layers for b in layer.blocks]
    assert blocks.count('WindowSoftmaxAttention') == 2
    base = InLineSwin('base')
    stage3 = [type(b.attn).__name__ for b in base.layers[2].blocks]
    assert stage3[:2] == ['InLineAttention'] * 2 and set(stage3[2:]) == {'WindowSoftmaxAttention'}
    shifts = [b.attn.shift_size for b in base.layers[2].blocks[2:]]
    assert shifts[:4] == [0, 3, 0, 3]



# -- InLine-CSwin and InLine-DeiT -----------------------------------------------------------
@pytest.mark.parametrize('arch', sorted(CSWIN_ARCHS))
def test_cswin_every_arch_at_224(arch):
    model = InLineCSwin(arch, drop_path_rate=0.)
    outs = model(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, c, 56 // 2**i, 56 // 2**i)
                                             for i, c in enumerate(model.num_features)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('arch', sorted(DEIT_ARCHS))
def test_deit_every_arch_at_its_size(arch):
    model = InLineDeiT(arch, drop_path_rate=0.)
    size = {'tiny': 224, 'small': 288, 'base': 448}[arch] // 2
    outs = model(torch.randn(1, 3, size, size))
    g = size // 16
    assert [tuple(o.shape[-2:]) for o in outs] == [(4 * g, 4 * g), (2 * g, 2 * g), (g, g),
                                                  (-(-g // 2), -(-g // 2))]
    assert {o.shape[1] for o in outs} == {model.embed_dims}
    sum(o.mean() for o in outs).backward()
    assert model.pos_embed.grad is not None and model.cls_token.grad is not None


@pytest.mark.parametrize('hw', [(190, 250), (33, 65)])
def test_cswin_and_deit_any_input_size(hw):
    cswin = InLineCSwin('tiny', depths=(1, 1, 2, 1))
    # The released stem is a 7x7 stride-4 convolution with padding 2, then 3x3 stride-2 merges.
    side = [[(s - 3) // 4 + 1 for s in hw]]
    for _ in range(3):
        side.append([-(-s // 2) for s in side[-1]])
    for i, o in enumerate(cswin(torch.randn(1, 3, *hw))):
        assert list(o.shape[-2:]) == side[i], i
    deit = InLineDeiT('tiny', out_indices=(0, 1, 2, 3))
    outs = deit(torch.randn(1, 3, *hw))
    g = (-(-hw[0] // 16), -(-hw[1] // 16))
    assert outs[2].shape[-2:] == g and outs[0].shape[-2:] == (4 * g[0], 4 * g[1])


def test_cswin_softmax_stripes_mask_their_padding():
    """Stripes 4 wide on a 10-wide map: the last covers columns 8-9 (+2 padded); each
    stripe equals explicit attention over its own columns, with LePE inside it."""
    torch.manual_seed(0)
    branch = CSwinBranch(8, 2, 'softmax', (0, 4))
    q, k, v = (torch.randn(2, 5, 10, 8) for _ in range(3))
    x_mean = torch.randn(2, 8)
    expected = explicit.cswin_branch(branch, q, k, v, x_mean, explicit.regions(5, 10, 5, 4))
    torch.testing.assert_close(branch(q, k, v, x_mean), expected, rtol=1e-4, atol=1e-4)
    rows = CSwinBranch(8, 2, 'softmax', (1, 2))  # full-width stripes 2 high: rows 0-1, 2-3, 4
    rows.load_state_dict(branch.state_dict())
    expected = explicit.cswin_branch(rows, q, k, v, x_mean, explicit.regions(5, 10, 2, 10))
    torch.testing.assert_close(rows(q, k, v, x_mean), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('window,hw', [(None, (5, 7)), (4, (6, 9))])
def test_cswin_inline_branch_equals_explicit(window, hw):
    """InLine over the map (or windows), LePE, and the local term with taps from the
    block input's mean (not the attention input's, as in Swin/PVT)."""
    torch.manual_seed(0)
    branch = CSwinBranch(8, 2, 'inline', window=window)
    q, k, v = (torch.randn(2, *hw, 8) for _ in range(3))
    x_mean = torch.randn(2, 8)
    tiles = explicit.regions(*hw, window, window) if window else None
    torch.testing.assert_close(branch(q, k, v, x_mean),
                               explicit.cswin_branch(branch, q, k, v, x_mean, tiles),
                               rtol=1e-4, atol=1e-4)


def test_cswin_inline_window_reaches_its_blocks():
    model = InLineCSwin('tiny', depths=(1, 1, 1, 1), inline_window=8, kernel='relu')
    branch = model.stage1[0].attns[0]
    assert (branch.window, branch.kernel) == (8, 'relu')
    assert model(torch.randn(1, 3, 70, 50))[0].shape[-2:] == (17, 12)


def test_deit_refuses_windows_with_the_reason():
    with pytest.raises(ValueError, match='class token attends to every patch'):
        InLineDeiT('tiny', inline_window=7)


@pytest.mark.parametrize('cls', [InLineCSwin, InLineDeiT])
def test_cswin_deit_frozen_stages_and_with_cp(cls):
    kwargs = dict(depths=(1, 1, 2, 1)) if cls is InLineCSwin else {}
    model = cls('tiny', frozen_stages=2, **kwargs)
    model.train()
    for m in model._stem_modules() + model._stage_modules(0) + model._stage_modules(1):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert all(p.requires_grad for p in model._stage_modules(2)[0].parameters())
    torch.manual_seed(0)
    ref = cls('tiny', drop_path_rate=0., **kwargs)
    cp = cls('tiny', drop_path_rate=0., with_cp=True, **kwargs)
    cp.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    a, b = ref(x), cp(x)
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w)
    sum(o.sum() for o in a).backward()
    sum(o.sum() for o in b).backward()
    for p, q in zip(ref.parameters(), cp.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


FAMILIES = ['InLinePVT', 'AgentPVT', 'FLattenPVT', 'FLattenPVTv2', 'InLineSwin', 'AgentSwin',
            'FLattenSwin', 'InLineCSwin', 'AgentCSwin', 'FLattenCSwin', 'InLineDeiT', 'AgentDeiT',
            'MLLA']


@pytest.mark.parametrize('name', FAMILIES)
def test_every_family_passes_the_layout_and_the_contract_on_by_name(name):
    """Each family reads its own arguments and passes the layout and the contract on by
    name: every one of them must arrive where it acts, none swapped with another."""
    from timm.layers import DropPath

    import mmlinattn.models as models

    cls = getattr(models, name)
    deit = 'DeiT' in name
    out_indices = (2, 5, 8, 11) if deit else (1, 3)
    model = cls(in_channels=4, drop_path_rate=0.25, out_indices=out_indices, frozen_stages=1,
                with_cp=True, chunk_tokens=8192)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 4
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == \
        pytest.approx(0.25)
    assert model.out_indices == out_indices and model.frozen_stages == 1
    assert model.with_cp is True and model.chunk_tokens == 8192
    assert not any(p.requires_grad for p in model._stem_modules()[0].parameters())
    with pytest.raises(TypeError, match="'out_indice'"):  # a misspelt key is named
        cls(out_indice=(0, 1))
