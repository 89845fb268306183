"""The OpenMMLab side of mmlinattn.

Hooks (non-finite loss, channel checks) and the CPU autocast optimizer wrapper,
registered in the mmlinattn, mmdet and mmseg registries; model wrappers for
distributed training (``CPUDistributedDataParallel``, ``SpatialParallelWrapper`` with
``SpatialGroupSampler``: :mod:`.spatial`); building models and reading weights
(:mod:`.build`); ONNX export (:mod:`.deploy`); whole-image inference on large images
(:mod:`.large_image`), from image files read by regions into pyramidal outputs
(:mod:`.large_files`); what the train/test tools share (:mod:`.launch`).
"""
from ..registry import register_into_openmmlab
from .distributed import CPUDistributedDataParallel
from .hooks import FiniteLossHook, ModelSanityHook, check_feature_channels
from .optim import CPUAutocastOptimWrapper
from .spatial import (
    SpatialGroupSampler,
    SpatialParallelWrapper,
    configure_spatial_parallel,
    spatial_worker_init,
)

register_into_openmmlab((FiniteLossHook, ModelSanityHook), kind='HOOKS')
register_into_openmmlab((CPUAutocastOptimWrapper, ), kind='OPTIM_WRAPPERS')

__all__ = [
    'FiniteLossHook', 'ModelSanityHook', 'check_feature_channels', 'CPUAutocastOptimWrapper',
    'CPUDistributedDataParallel', 'SpatialParallelWrapper', 'SpatialGroupSampler',
    'spatial_worker_init', 'configure_spatial_parallel'
]
