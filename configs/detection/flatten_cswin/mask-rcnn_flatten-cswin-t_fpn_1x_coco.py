# Mask R-CNN + FPN with a FLatten-CSwin-T backbone (focused stages global, the positional encodings resized to each map), 1x on COCO.
# The authors released no detector for it: the InLine-CSwin-T recipe (MMDetection's
# Swin-T dataset, schedule and optimiser: AdamW, lr 1e-4, wd 0.05) with the backbone swapped.
_base_ = '../inline_cswin/mask-rcnn_inline-cswin-t_fpn_1x_coco.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_cswin_t.pth> <this>
checkpoint = 'checkpoints/flatten_cswin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='FLattenCSwin',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
