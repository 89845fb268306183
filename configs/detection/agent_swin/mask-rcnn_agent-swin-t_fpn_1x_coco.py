# Mask R-CNN + FPN with an Agent-Swin-T backbone, 1x schedule on COCO.
# As the authors' detector (Agent-Attention/downstream/detection, agent_swin_t_mrcnn_1x):
# global agent attention in stages 1-3 with 9x9, 12x12, 14x14 agents (the classifier's
# 3x3, 4x4, 7x7 biases resized), drop path 0.1, AdamW lr 1e-4 wd 0.05 without decay on
# norms and the agent biases. Dataset, schedule and runtime are MMDetection's Swin-T ones.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released agent_swin_t.pth> <this>
checkpoint = 'checkpoints/agent_swin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentSwin',
        arch='tiny',
        agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)],
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            **{f'{name}_bias': dict(decay_mult=0.) for name in ('an', 'na', 'ah', 'aw', 'ha', 'wa')}
        }))
