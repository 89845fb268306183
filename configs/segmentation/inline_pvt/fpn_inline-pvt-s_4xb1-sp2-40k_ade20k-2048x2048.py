# Semantic FPN + InLine-PVT-S trained on 2048 x 2048 crops, each image's rows split over
# two processes (spatial parallelism: docs/spatial_parallel.md). With 4 processes,
#   bash tools/dist_train.sh configs/segmentation/inline_pvt/fpn_inline-pvt-s_4xb1-sp2-40k_ade20k-2048x2048.py 4
# trains 2 images a step, each on 2 ranks; each rank holds about half of an image's
# activations. ADE20K images are resized up to about 2048 px on the short side here.
_base_ = './fpn_inline-pvt-s_4xb4-40k_ade20k-512x512.py'

crop_size = (2048, 2048)
spatial_parallel = dict(size=2)
model = dict(data_preprocessor=dict(size=crop_size))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(8192, 2048), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(8192, 2048), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(batch_size=1, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
