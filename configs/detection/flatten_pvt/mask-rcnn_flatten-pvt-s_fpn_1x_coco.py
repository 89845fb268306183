# Mask R-CNN + FPN with a FLatten-PVT-S backbone, 1x schedule on COCO.
# FLatten released no detector: the InLine-PVT recipe (MMDetection's PVT optimiser,
# AdamW lr 1e-4, wd 1e-4, no decay on norms and position tables), with the focused
# linear attention's positional encodings resized to each map like the position tables.
_base_ = '../inline_pvt/mask-rcnn_inline-pvt-t_fpn_1x_coco.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_pvt_s.pth> <this>
checkpoint = 'checkpoints/flatten_pvt_s_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='FLattenPVT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'pos_embed': dict(decay_mult=0.),
    'positional_encoding': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.)
}))
