# UperNet with an Agent-PVT-S backbone, 160k iterations of 512x512 crops on ADE20K.
# The authors segment with Agent-PVT through Semantic FPN only (the fpn_ config beside
# this one); for UperNet we keep their downstream agents (12x12, 16x16, 28x28, 28x28)
# and drop path 0.1, and take MMSegmentation's Swin-T UperNet recipe (AdamW lr 6e-5,
# wd 0.01, linear warm-up then poly decay), without decay on norms, position tables and
# the agent biases.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmlinattn'], allow_failed_imports=False)

# Converted ImageNet weights: python tools/convert_checkpoint.py <released agent_pvt_s.pth> <this>
checkpoint = 'checkpoints/agent_pvt_s_in1k.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        arch='small',
        agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)],
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        out_norm=False,  # the authors' downstream Agent-PVT has no output norms
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            **{f'{name}_bias': dict(decay_mult=0.) for name in ('an', 'na', 'ah', 'aw', 'ha', 'wa')}
        }))
