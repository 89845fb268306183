# Mask R-CNN + FPN with a FLatten-Swin-T backbone, 1x schedule on COCO.
# FLatten released no detector: this follows MMDetection's Swin-T recipe (AdamW lr 1e-4,
# wd 0.05, no decay on norms and position tables) with the InLine-Swin-T drop path. The
# focused linear stages (1-2) attend globally; their positional encodings, learned for
# the 56x56 and 28x28 maps at 224 px, are resized to each map (docs/sibling_attentions.md).
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_swin_t.pth> <this>
checkpoint = 'checkpoints/flatten_swin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='FLattenSwin',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'positional_encoding': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
