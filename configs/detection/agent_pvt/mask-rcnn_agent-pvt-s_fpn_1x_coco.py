# Mask R-CNN + FPN with an Agent-PVT-S backbone, 1x schedule on COCO.
# As the authors' detector (Agent-Attention/downstream/detection,
# agent_pvt_s_mrcnn_1x_12-16-28-28): 12x12, 16x16, 28x28, 28x28 agents (the
# classifier's 3x3, 4x4, 7x7, 7x7 biases resized), drop path 0.1, AdamW lr 2e-4,
# wd 1e-4 (norms and position tables without decay, as our PVT configs). Dataset,
# schedule and runtime as the InLine-PVT configs (MMDetection's).
_base_ = '../inline_pvt/mask-rcnn_inline-pvt-t_fpn_1x_coco.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released agent_pvt_s.pth> <this>
checkpoint = 'checkpoints/agent_pvt_s_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        arch='small',
        agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)],
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        out_norm=False,  # the authors' downstream Agent-PVT has no output norms
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))

optim_wrapper = dict(optimizer=dict(lr=0.0002))
