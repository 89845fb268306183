# Faster R-CNN + FPN with an InLine-PVT-S backbone, 1x schedule on COCO (boxes only).
# Optimiser as MMDetection's PVT configs (AdamW, lr 1e-4, wd 1e-4), with no weight
# decay on norms and position embeddings.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py'
]

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released inline_pvt_s.pth> <this>
checkpoint = 'checkpoints/inline_pvt_s_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='InLinePVT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001),
    paramwise_cfg=dict(custom_keys={
        'pos_embed': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))
