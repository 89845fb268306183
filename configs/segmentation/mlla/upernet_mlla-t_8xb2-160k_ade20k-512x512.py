# UperNet with an MLLA-T backbone, 160k iterations of 512x512 crops on ADE20K.
# The authors' segmenter (MLLA/downstream/segmentation) is MLLA-B with AdamW lr 6e-5,
# wd 0.01, no decay on norms; this is the same recipe for the T model with
# MMSegmentation's Swin-T drop path (0.3).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released mlla_t.pth> <this>
checkpoint = 'checkpoints/mlla_t_in1k.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
