# Mask R-CNN + FPN with an Agent-DeiT-S backbone (384 wide, 6 heads, global agent
# attention with 49 agents), 1x on COCO. Blocks 3, 5, 7 and 11 feed a simple feature
# pyramid (strides 4-32, 384 channels each). The authors released no DeiT detector: the
# InLine-CSwin-T recipe (MMDetection's Swin-T dataset, schedule, AdamW) with this backbone.
_base_ = '../inline_cswin/mask-rcnn_inline-cswin-t_fpn_1x_coco.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released agent_deit_s.pth> <this>
checkpoint = 'checkpoints/agent_deit_s_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentDeiT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(3, 5, 7, 11),
        pyramid=True,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[384, 384, 384, 384]))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
