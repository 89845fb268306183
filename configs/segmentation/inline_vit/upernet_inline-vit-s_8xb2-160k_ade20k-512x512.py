# Older name of ../inline_deit/upernet_inline-deit-s_8xb2-160k_ade20k-512x512.py (the same
# model: InLine-DeiT-S is a plain ViT); kept so that existing commands keep working.
_base_ = '../inline_deit/upernet_inline-deit-s_8xb2-160k_ade20k-512x512.py'
