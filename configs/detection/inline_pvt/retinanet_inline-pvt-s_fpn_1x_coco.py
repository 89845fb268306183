_base_ = './retinanet_inline-pvt-t_fpn_1x_coco.py'

checkpoint = 'checkpoints/inline_pvt_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='small', drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
