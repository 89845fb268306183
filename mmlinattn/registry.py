"""The mmlinattn model registry and its registration into MMDetection/MMSegmentation.

This is the only module that imports mmdet or mmseg, and only when they are
installed: the backbones themselves need nothing beyond torch, timm and mmengine.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Iterable, Optional, Sequence

from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

__all__ = [
    'MODELS', 'HOOKS', 'OPTIM_WRAPPERS', 'MODEL_WRAPPERS', 'DATA_SAMPLERS', 'FUNCTIONS',
    'register_into_openmmlab',
    'OPENMMLAB_SCOPES'
]

logger = logging.getLogger(__name__)

#: Child of mmengine's root MODELS, so ``mmlinattn.InLineSwin`` resolves from any scope.
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmlinattn',
                  locations=['mmlinattn.models'])

#: Training hooks (``mmlinattn.FiniteLossHook``, ...), child of mmengine's root HOOKS.
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmlinattn', locations=['mmlinattn.engine'])

#: Optimizer wrappers (``mmlinattn.CPUAutocastOptimWrapper``).
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmlinattn',
                          locations=['mmlinattn.engine'])

#: Model wrappers (``mmlinattn.CPUDistributedDataParallel``, ``mmlinattn.SpatialParallelWrapper``).
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope='mmlinattn',
                          locations=['mmlinattn.engine'])

#: Data samplers (``mmlinattn.SpatialGroupSampler``).
DATA_SAMPLERS = Registry('data sampler', parent=MMENGINE_DATA_SAMPLERS, scope='mmlinattn',
                         locations=['mmlinattn.engine'])

#: Functions built from configs (``mmlinattn.spatial_worker_init``).
FUNCTIONS = Registry('function', parent=MMENGINE_FUNCTIONS, scope='mmlinattn',
                     locations=['mmlinattn.engine'])

#: Downstream packages whose MODELS registries also receive our modules.
OPENMMLAB_SCOPES = ('mmdet', 'mmseg')


def register_into_openmmlab(modules: Iterable[type], kind: str = 'MODELS',
                            names: Optional[Sequence[str]] = None) -> list[str]:
    """Register ``modules`` in mmdet's and mmseg's ``kind`` registry where those import.

    A config with ``default_scope='mmdet'`` (or ``'mmseg'``) then builds
    ``dict(type='InLineSwin')`` directly. ``names`` (one module only): every name
    it is registered under (default: its class name). Returns the scopes
    registered into; a package that is absent, or fails to import (e.g. mmcv not
    compiled), is skipped with a debug message.
    """
    modules = list(modules)
    if names is not None and len(modules) != 1:
        raise ValueError('names need exactly one module')
    done = []
    for scope in OPENMMLAB_SCOPES:
        try:
            if importlib.util.find_spec(scope) is None:
                continue
            registry = getattr(importlib.import_module(f'{scope}.registry'), kind)
        except Exception as exc:  # noqa: BLE001 - an unusable optional package is skipped
            logger.debug('not registering into %s: %s', scope, exc)
            continue
        for module in modules:
            for name in names or (module.__name__, ):
                registry.register_module(name=name, module=module, force=True)
        done.append(scope)
    return done
