# UperNet with an Agent-Swin-T backbone, 160k iterations of 512x512 crops on ADE20K.
# As the authors' segmenter (Agent-Attention/downstream/segmentation, upernet_agent_swin_t):
# 9x9, 12x12, 14x14 agents in the agent stages, drop path 0.3, AdamW lr 6e-5 wd 0.01
# without decay on norms and the agent biases. Dataset and schedule are MMSegmentation's
# Swin-T ones.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released agent_swin_t.pth> <this>
checkpoint = 'checkpoints/agent_swin_t_in1k.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='AgentSwin',
        arch='tiny',
        agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)],
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            **{f'{name}_bias': dict(decay_mult=0.) for name in ('an', 'na', 'ah', 'aw', 'ha', 'wa')}
        }))
