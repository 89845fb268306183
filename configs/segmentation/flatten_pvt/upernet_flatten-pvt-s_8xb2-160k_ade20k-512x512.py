# UperNet with a FLatten-PVT-S backbone, 160k iterations of 512x512 crops on ADE20K.
# FLatten released no segmenter: MMSegmentation's Swin-T UperNet recipe (AdamW lr 6e-5,
# wd 0.01, linear warm-up then poly decay) with the backbone swapped, drop path 0.1 (as
# the PVT-S detectors), no decay on norms and position tables.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_pvt_s.pth> <this>
checkpoint = 'checkpoints/flatten_pvt_s_in1k.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='FLattenPVT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'positional_encoding': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
