# UperNet with an Agent-DeiT-S backbone (384 wide, 6 heads, global agent attention with
# 49 agents) on ADE20K 512x512, 160k iterations: the InLine-DeiT-S recipe with the
# backbone swapped. Blocks 3, 5, 7 and 11 feed a simple feature pyramid.
_base_ = '../inline_deit/upernet_inline-deit-s_8xb2-160k_ade20k-512x512.py'

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
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
