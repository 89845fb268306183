"""Mixed precision on the CPU, where mmengine's AmpOptimWrapper refuses to run."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import OPTIM_WRAPPERS
from ..utils.cpu import EMULATED_BF16_NOTE, cpu_has_native_bf16

__all__ = ['CPUAutocastOptimWrapper']


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward passes run under CPU autocast (bfloat16 by default).

    bfloat16 has float32's exponent range, so no loss scaling is needed. This is
    what ``tools/train.py --amp`` selects when no GPU is visible; on a GPU it
    selects mmengine's ``AmpOptimWrapper`` (fp16 with dynamic loss scaling).
    """

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        self.cast_dtype = getattr(torch, dtype)
        if dtype == 'bfloat16' and not cpu_has_native_bf16():
            print_log(f'CPUAutocastOptimWrapper: {EMULATED_BF16_NOTE}', logger='current',
                      level=logging.WARNING)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
