"""The OpenMMLab side of mmlinattn.

Hooks (non-finite loss, channel checks, atomic checkpoints with exact resume:
:mod:`.resume`) and optimizer wrappers (no step on non-finite values, CPU autocast),
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
from .optim import CPUAutocastOptimWrapper, FiniteOptimWrapper
from .resume import ResumableCheckpointHook
from .spatial import (
    SpatialGroupSampler,
    SpatialParallelWrapper,
    configure_spatial_parallel,
    spatial_worker_init,
)

register_into_openmmlab((FiniteLossHook, ModelSanityHook, ResumableCheckpointHook),
                        kind='HOOKS')
register_into_openmmlab((CPUAutocastOptimWrapper, FiniteOptimWrapper), kind='OPTIM_WRAPPERS')

__all__ = [
    'FiniteLossHook', 'ModelSanityHook', 'check_feature_channels', 'CPUAutocastOptimWrapper',
    'FiniteOptimWrapper', 'ResumableCheckpointHook',
    'CPUDistributedDataParallel', 'SpatialParallelWrapper', 'SpatialGroupSampler',
    'spatial_worker_init', 'configure_spatial_parallel'
]
