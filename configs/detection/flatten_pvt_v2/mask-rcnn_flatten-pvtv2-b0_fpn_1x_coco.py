# Mask R-CNN + FPN with a FLatten-PVTv2-B0 backbone (the released one; B1-B4 are archs),
# 1x on COCO. FLatten released no detector: the FLatten-PVT recipe (MMDetection's PVT
# dataset, schedule and optimiser) with the backbone swapped.
_base_ = '../flatten_pvt/mask-rcnn_flatten-pvt-s_fpn_1x_coco.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_pvt_v2_b0.pth> <this>
checkpoint = 'checkpoints/flatten_pvt_v2_b0_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='FLattenPVTv2',
        arch='b0',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[32, 64, 160, 256]))
