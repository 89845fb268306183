# UperNet with a FLatten-PVTv2-B0 backbone (the released one), 160k iterations of
# 512x512 crops on ADE20K: the FLatten-PVT-S UperNet recipe with the backbone swapped.
_base_ = '../flatten_pvt/upernet_flatten-pvt-s_8xb2-160k_ade20k-512x512.py'

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
    decode_head=dict(in_channels=[32, 64, 160, 256], channels=256),
    auxiliary_head=dict(in_channels=160, channels=128))
