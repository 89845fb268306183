_base_ = './fpn_inline-pvt-t_4xb4-40k_ade20k-512x512.py'

checkpoint = 'checkpoints/inline_pvt_m_in1k.pth'
model = dict(
    backbone=dict(
        arch='medium', drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
