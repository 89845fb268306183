# Mask R-CNN + FPN with an InLine-CSwin-T backbone, 1x on COCO. Dataset, schedule and
# optimiser (AdamW, lr 1e-4, wd 0.05, no decay on norms) from MMDetection's Swin-T config.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released inline_cswin_t.pth> <this>
checkpoint = 'checkpoints/inline_cswin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='InLineCSwin',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
