# Semantic FPN with a FLatten-PVT-S backbone, 40k iterations on ADE20K 512x512.
# FLatten released no segmenter: the InLine-PVT recipe (the PVT papers': AdamW lr 1e-4,
# wd 1e-4, poly decay with power 0.9).
_base_ = '../inline_pvt/fpn_inline-pvt-t_4xb4-40k_ade20k-512x512.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_pvt_s.pth> <this>
checkpoint = 'checkpoints/flatten_pvt_s_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='FLattenPVT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'pos_embed': dict(decay_mult=0.),
    'positional_encoding': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.)
}))
