# Mask R-CNN + FPN with an InLine-Swin-T backbone, 1x schedule on COCO.
# Dataset, schedule, runtime and the optimiser (AdamW, lr 1e-4, wd 0.05, no decay
# on norms and position tables) come from MMDetection's own Swin-T config.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released inline_swin_t.pth> <this>
checkpoint = 'checkpoints/inline_swin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='InLineSwin',
        arch='tiny',
        inline_window=None,  # global InLine attention in stages 1-3 (linear cost)
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
