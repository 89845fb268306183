"""Distributed data parallel on CPU-only machines (gloo), for torchrun without GPUs."""
from __future__ import annotations

from typing import Any

from mmengine.model import MMDistributedDataParallel

from ..registry import MODEL_WRAPPERS

__all__ = ['CPUDistributedDataParallel']


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for a module on the CPU.

    mmengine's runner always passes ``device_ids=[LOCAL_RANK]``, which torch
    rejects for CPU modules; this wrapper drops it. ``tools/train.py`` selects
    it (with the gloo backend) when launched distributed without a GPU.
    """

    def __init__(self, module: Any, **kwargs: Any) -> None:
        if next(module.parameters()).device.type == 'cpu':
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        super().__init__(module=module, **kwargs)
