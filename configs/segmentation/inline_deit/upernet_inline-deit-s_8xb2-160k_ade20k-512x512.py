# UperNet with an InLine-DeiT-S backbone (320 wide, 10 heads, global InLine attention) on
# ADE20K 512x512, 160k iterations. Blocks 3, 5, 7 and 11 feed a simple feature pyramid (strides 4-32, 320 channels each).
_base_ = '../inline_swin/upernet_inline-swin-t_8xb2-160k_ade20k-512x512.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released inline_deit_s.pth> <this>
checkpoint = 'checkpoints/inline_deit_s_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='InLineDeiT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(3, 5, 7, 11),
        pyramid=True,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[320, 320, 320, 320]),
    auxiliary_head=dict(in_channels=320))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
