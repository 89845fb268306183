# Mask R-CNN + FPN with an MLLA-T backbone, 1x schedule on COCO.
# As the authors' detector (MLLA/downstream/detection, mlla_t_mrcnn_1x): drop path 0.1,
# AdamW lr 1e-4 wd 0.05 without decay on norms. The RoPE is computed for each map, so
# any image size works. Dataset, schedule and runtime are MMDetection's Swin-T ones.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released mlla_t.pth> <this>
checkpoint = 'checkpoints/mlla_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
