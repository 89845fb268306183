# Semantic FPN + InLine-PVT-S trained as the 512x512 config, tested on every image at its
# own full resolution (no test resize), whole: one exact global-attention forward per
# image rather than mmseg's sliding window. At test time the backbone runs token-chunked
# (chunk_tokens: 2^16 tokens a band; training is unaffected), so memory stays a small
# multiple of one feature map at any image size (docs/large_images.md). For single images
# larger than the neck and head can hold at once: tools/infer_large.py.
_base_ = './fpn_inline-pvt-s_4xb4-40k_ade20k-512x512.py'

model = dict(backbone=dict(chunk_tokens=65536), test_cfg=dict(mode='whole'))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
