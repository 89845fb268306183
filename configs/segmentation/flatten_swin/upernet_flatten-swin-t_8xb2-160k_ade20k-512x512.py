# UperNet with a FLatten-Swin-T backbone, 160k iterations of 512x512 crops on ADE20K.
# FLatten released no segmenter: this follows MMSegmentation's Swin-T recipe (AdamW lr
# 6e-5, wd 0.01, no decay on norms and position tables, warm-up then poly).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_swin_t.pth> <this>
checkpoint = 'checkpoints/flatten_swin_t_in1k.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='FLattenSwin',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'positional_encoding': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
