"""Optimizer wrappers: no step on non-finite values, and mixed precision on the CPU.

:class:`FiniteOptimWrapper` checks, before every optimizer step, the loss and every
gradient on every rank (one all-reduce of one flag a rank): when one is not finite
anywhere, every rank stops together (``nonfinite='stop'``, the default) before the
weights change, with a message naming the iteration, the rank, the loss terms or
parameters; or every rank skips the step (``nonfinite='skip'``) and says so.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import OPTIM_WRAPPERS
from ..utils.cpu import EMULATED_BF16_NOTE, cpu_has_native_bf16

__all__ = ['CPUAutocastOptimWrapper', 'FiniteOptimWrapper', 'FiniteStepMixin']


def _ranks_flagging(flag: bool) -> list[int]:
    """The ranks whose ``flag`` is set (every rank learns them: one all-reduce)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size())
    flags[dist.get_rank()] = float(flag)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


class FiniteStepMixin:
    """Checks the loss and the gradients before each optimizer step (see the module's
    note). ``param_names`` (id of a parameter -> name), ``loss_terms`` (the parsed loss
    terms of the iteration) and ``iteration`` are filled in by
    :class:`~mmlinattn.engine.hooks.FiniteLossHook` to make the messages precise."""

    nonfinite: str = 'stop'

    def _init_finite(self, nonfinite: str) -> None:
        if nonfinite not in ('stop', 'skip'):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.param_names: dict[int, str] = {}
        self.loss_terms: dict[str, float] = {}
        self.iteration: Optional[int] = None
        self.skipped_steps = 0
        self._loss_value: Optional[float] = None

    def update_params(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._loss_value = float(loss.detach().sum()) if loss.numel() else 0.0
        super().update_params(loss, *args, **kwargs)  # type: ignore[misc]

    def _local_problem(self) -> Optional[tuple[str, str]]:
        """What is not finite here: ``('loss', 'its terms')`` or ``('gradient', 'of
        these parameters')``, else None."""
        if self._loss_value is not None and not math.isfinite(self._loss_value):
            bad = {k: v for k, v in self.loss_terms.items() if not math.isfinite(v)}
            terms = ', '.join(f'{k}={v}' for k, v in bad.items()) or f'loss={self._loss_value}'
            return 'loss', terms
        names = []
        for group in self.optimizer.param_groups:  # type: ignore[attr-defined]
            for p in group['params']:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    names.append(self.param_names.get(id(p), f'a parameter of shape '
                                                      f'{tuple(p.shape)}'))
        if names:
            more = f' and {len(names) - 3} more' if len(names) > 3 else ''
            return 'gradient', f'of {", ".join(names[:3])}{more}'
        return None

    def step(self, **kwargs: Any) -> None:
        import torch.distributed as dist
        problem = self._local_problem()
        ranks = _ranks_flagging(problem is not None)
        self._loss_value = None
        if not ranks:
            super().step(**kwargs)  # type: ignore[misc]
            return
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        where = f'iteration {self.iteration}' if self.iteration is not None else 'this step'
        others = [r for r in ranks if r != rank]
        if problem is not None:
            message = f'non-finite {problem[0]} at {where} on rank {rank} ({problem[1]})'
            if others:
                message += f'; also on rank(s) {", ".join(map(str, others))}'
        else:
            message = (f'non-finite values at {where} on rank(s) '
                       f'{", ".join(map(str, others))} (rank {rank} is finite)')
        if self.nonfinite == 'skip':
            self.skipped_steps += 1
            print_log(f'{message}; every rank skips this optimizer step '
                      f'({self.skipped_steps} skipped so far)', logger='current',
                      level=logging.WARNING)
            return
        raise FloatingPointError(
            f'{message}; every rank stopped before the optimizer step (the weights are '
            "those of the previous step; the last checkpoint is kept). Lower the learning "
            'rate, clip gradients (optim_wrapper.clip_grad), check the batch, or set '
            "optim_wrapper.nonfinite='skip'")


@OPTIM_WRAPPERS.register_module()
class FiniteOptimWrapper(FiniteStepMixin, OptimWrapper):
    """mmengine's ``OptimWrapper`` (same arguments) that never steps on a non-finite
    loss or gradient of any rank. ``nonfinite``: ``'stop'`` or ``'skip'``."""

    def __init__(self, *args: Any, nonfinite: str = 'stop', **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_finite(nonfinite)


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(FiniteStepMixin, OptimWrapper):
    """``OptimWrapper`` whose forward passes run under CPU autocast (bfloat16 by default).

    bfloat16 has float32's exponent range, so no loss scaling is needed. This is
    what ``tools/train.py --amp`` selects when no GPU is visible; on a GPU it
    selects mmengine's ``AmpOptimWrapper`` (fp16 with dynamic loss scaling). Like
    :class:`FiniteOptimWrapper`, it never steps on non-finite values.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', nonfinite: str = 'stop',
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_finite(nonfinite)
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        self.cast_dtype = getattr(torch, dtype)
        from ..ops.mmcv_autocast import float32_mmcv_ops
        float32_mmcv_ops()  # a detector's NMS and RoIAlign under CPU autocast
        if dtype == 'bfloat16' and not cpu_has_native_bf16():
            print_log(f'CPUAutocastOptimWrapper: {EMULATED_BF16_NOTE}', logger='current',
                      level=logging.WARNING)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
