# Semantic FPN with an Agent-PVT-S backbone, 40k iterations on ADE20K 512x512.
# As the authors' segmenter (Agent-Attention/downstream/segmentation,
# fpn_agent_pvt_s_12-16-28-28): 12x12, 16x16, 28x28, 28x28 agents, drop path 0.1,
# AdamW lr 2e-4, wd 1e-4 (norms and position tables without decay, as our PVT
# configs), poly decay with power 0.9.
_base_ = '../inline_pvt/fpn_inline-pvt-t_4xb4-40k_ade20k-512x512.py'

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
