_base_ = './mask-rcnn_inline-swin-t_fpn_ms-crop-3x_coco.py'

checkpoint = 'checkpoints/inline_swin_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='small', drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
