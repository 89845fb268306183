# UperNet with a FLatten-CSwin-T backbone, 160k iterations of 512x512 crops on ADE20K (the
# InLine-CSwin-T UperNet recipe with the backbone swapped; the authors released none).
_base_ = '../inline_cswin/upernet_inline-cswin-t_8xb2-160k_ade20k-512x512.py'

# Converted ImageNet weights: python tools/convert_checkpoint.py <released flatten_cswin_t.pth> <this>
checkpoint = 'checkpoints/flatten_cswin_t_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='FLattenCSwin',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
