"""mmengine extensions: hooks registered in the mmlinattn, mmdet and mmseg HOOKS registries."""
from ..registry import register_into_openmmlab
from .distributed import CPUDistributedDataParallel
from .hooks import FiniteLossHook, ModelSanityHook, check_feature_channels
from .optim import CPUAutocastOptimWrapper

register_into_openmmlab((FiniteLossHook, ModelSanityHook), kind='HOOKS')
register_into_openmmlab((CPUAutocastOptimWrapper, ), kind='OPTIM_WRAPPERS')

__all__ = [
    'FiniteLossHook', 'ModelSanityHook', 'check_feature_channels', 'CPUAutocastOptimWrapper',
    'CPUDistributedDataParallel'
]
