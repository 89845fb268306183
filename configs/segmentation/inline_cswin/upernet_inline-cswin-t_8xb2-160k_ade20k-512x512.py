# UperNet with an InLine-CSwin-T backbone, 160k iterations of 512x512 crops on ADE20K
# (the InLine-Swin-T UperNet recipe with the backbone swapped).
_base_ = '../inline_swin/upernet_inline-swin-t_8xb2-160k_ade20k-512x512.py'

checkpoint = 'checkpoints/inline_cswin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='InLineCSwin',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
