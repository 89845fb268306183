"""Pretrained weights: the wrong model is refused, position tables adapt, with_cp keeps its word."""
import pytest
import timm
import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger

import mmlinattn  # noqa: F401  (registers the timm models)
from mmlinattn.checkpoint import CheckpointMismatchError, adapt_position_tables
from mmlinattn.models import InLinePVT, InLineSwin, InLineViT, load_released

SMALL_SWIN = dict(embed_dims=16, num_heads=(1, 2, 2, 4), depths=(1, 1, 2, 2))
SMALL_PVT = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1))


def _pretrained(cls, path, **kwargs):
    model = cls(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model


# -- the wrong model ------------------------------------------------------------------------
def test_checkpoint_of_another_family_is_refused(tmp_path):
    path = tmp_path / 'swin.pth'
    torch.save(InLineSwin('tiny', **SMALL_SWIN).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        _pretrained(InLinePVT, path, arch='tiny', **SMALL_PVT)
    message = str(info.value)
    assert str(path) in message and 'InLinePVT' in message and 'does not look like' in message


def test_detector_checkpoint_without_backbone_keys_is_refused(tmp_path):
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': {'neck.lateral_convs.0.conv.weight': torch.zeros(4, 4, 1, 1),
                               'rpn_head.rpn_conv.weight': torch.zeros(4, 4, 3, 3)}}, path)
    with pytest.raises(CheckpointMismatchError, match='prefix'):
        _pretrained(InLineSwin, path, arch='tiny', **SMALL_SWIN)


def test_partial_checkpoint_of_the_right_family_still_loads(tmp_path):
    """A classification checkpoint lacks the per-stage output norms; that is fine."""
    src = timm.create_model('inline_swin_tiny', **SMALL_SWIN)
    path = tmp_path / 'released.pth'
    torch.save({'model': src.state_dict()}, path)
    backbone = _pretrained(InLineSwin, path, arch='tiny', **SMALL_SWIN)
    torch.testing.assert_close(backbone.norm3.weight, src.norm.weight)


# -- relative position tables (Swin) --------------------------------------------------------
def test_swin_relative_tables_interpolate_to_the_configured_window(tmp_path):
    src = timm.create_model('inline_swin_base', **SMALL_SWIN)
    key = 'layers.3.blocks.0.attn.relative_position_bias_table'
    table = src.state_dict()[key]
    assert table.shape == (13 * 13, 4)
    with torch.no_grad():  # a constant per head stays that constant at any window
        src.layers[3].blocks[0].attn.relative_position_bias_table.copy_(
            torch.arange(4.).expand(169, 4))
    path = tmp_path / 'swin_b_224.pth'
    torch.save({'model': src.state_dict()}, path)
    logger = MMLogger.get_instance('adapt_test', log_file=str(tmp_path / 'log.txt'))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MMLogger, 'get_current_instance', classmethod(lambda cls: logger))
        backbone = _pretrained(InLineSwin, path, arch='base', softmax_window=12, **SMALL_SWIN)
    resized = backbone.state_dict()[key]
    assert resized.shape == (23 * 23, 4)
    torch.testing.assert_close(resized, torch.arange(4.).expand(23 * 23, 4))
    assert f'resized {key}: (169, 4) -> (529, 4) (bicubic)' in (tmp_path / 'log.txt').read_text()


def test_relative_table_interpolation_follows_mmdet_convention():
    """Per head, the (2w-1) x (2w-1) grid resized bicubically (mmdet's Swin loader)."""
    table = torch.randn(13 * 13, 3)
    out, notes = adapt_position_tables({'a.relative_position_bias_table': table},
                                       {'a.relative_position_bias_table': torch.zeros(529, 3)})
    expected = F.interpolate(table.permute(1, 0).reshape(1, 3, 13, 13), size=(23, 23),
                             mode='bicubic').reshape(3, 529).permute(1, 0)
    torch.testing.assert_close(out['a.relative_position_bias_table'], expected)
    assert len(notes) == 1


def test_released_224_weights_load_into_the_384_classifier(tmp_path):
    src = timm.create_model('inline_swin_base', **SMALL_SWIN)
    path = tmp_path / 'swin_b_224.pth'
    torch.save({'model': src.state_dict()}, path)
    model = load_released(timm.create_model('inline_swin_base_384', **SMALL_SWIN), str(path))
    assert model.state_dict()['layers.3.blocks.1.attn.relative_position_bias_table'].shape == \
        (529, 4)
    torch.testing.assert_close(model.head.weight, src.head.weight)


# -- absolute position embeddings (PVT, ViT) ------------------------------------------------
@pytest.mark.parametrize('cls,kwargs,size', [
    (InLinePVT, dict(arch='tiny', **SMALL_PVT), 320),
    (InLineViT, dict(arch=dict(embed_dims=32, depth=4, num_heads=2), out_indices=(0, 1, 2, 3)),
     288),
])
def test_pos_embed_resized_on_load_computes_what_the_model_computes_at_run_time(
        tmp_path, cls, kwargs, size):
    """Weights from 224 px loaded into ``pretrain_img_size=size``: at a ``size`` input the
    model gives the output of the 224 px model, which resizes its embeddings per forward."""
    def build(pretrain, **extra):
        args = dict(kwargs, **extra)
        if cls is InLineViT:
            args['arch'] = dict(kwargs['arch'], pretrain_img_size=pretrain)
        else:
            args['pretrain_img_size'] = pretrain
        return cls(drop_path_rate=0., **args)

    src = build(224).eval()
    path = tmp_path / 'pretrained.pth'
    torch.save(src.state_dict(), path)
    dst = build(size, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    dst.init_weights()
    name = 'pos_embed1' if cls is InLinePVT else 'pos_embed'
    assert getattr(dst, name).shape != getattr(src, name).shape
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for a, b in zip(src(x), dst.eval()(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- the 384 px layouts ---------------------------------------------------------------------
@pytest.mark.parametrize('name,base', [('inline_swin_base_384', 'inline_swin_base'),
                                       ('inline_cswin_base_384', 'inline_cswin_base')])
def test_384_layouts_are_registered(name, base):
    small = dict(embed_dims=16, depths=(1, 1, 3, 1), num_heads=(2, 2, 4, 4))
    model = timm.create_model(name, **small).eval()
    ref = timm.create_model(base, **small).state_dict()
    assert model.pretrained_cfg['input_size'] == (3, 384, 384)
    assert model.pretrained_cfg['crop_pct'] == 1.0
    own = model.state_dict()
    assert set(own) == set(ref)
    # Only Swin's softmax tables grow (window 12: 23^2 rows); CSwin has none (LePE is a conv).
    grown = {k for k in own if own[k].shape != ref[k].shape}
    assert all(k.endswith('relative_position_bias_table') and own[k].shape[0] == 529
               for k in grown)
    assert bool(grown) == name.startswith('inline_swin')
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


# -- with_cp checkpoints every block it is asked to -----------------------------------------
def _bytes_saved_inside(block, model, x):
    """Bytes autograd saves for backward while ``block`` runs its forward in ``model(x)``."""
    inside, saved = [False], []

    def pack(t):
        if inside[0]:
            saved.append(t.numel() * t.element_size())
        return t

    pre = block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    post = block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        pre.remove()
        post.remove()
    return sum(saved)


@pytest.mark.parametrize('cls,kwargs,first_trainable', [
    (InLineSwin, dict(arch='tiny', **SMALL_SWIN), lambda m: m.layers[1].blocks[0]),
    (InLineViT, dict(arch=dict(embed_dims=32, depth=4, num_heads=2, pretrain_img_size=128),
                     out_indices=(0, 1, 2, 3)), lambda m: m.blocks[1]),
])
def test_with_cp_checkpoints_the_first_block_after_frozen_stages(cls, kwargs, first_trainable):
    """Its input needs no gradient (the stages before are frozen), its weights do: without
    checkpointing it would keep every activation for them."""
    x = torch.randn(1, 3, 128, 128)
    saved = {}
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = cls(frozen_stages=1, with_cp=with_cp, drop_path_rate=0., **kwargs).train()
        saved[with_cp] = _bytes_saved_inside(first_trainable(model), model, x)
    assert saved[False] > 50_000  # its activations: several maps of its tokens
    # Checkpointed, autograd keeps nothing of the block itself (its input is kept by the
    # checkpoint, outside the hook's view); a small fraction allows for any bookkeeping.
    assert saved[True] < 0.05 * saved[False], saved
