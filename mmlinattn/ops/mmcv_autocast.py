"""mmcv's CPU kernels under bf16 autocast.

mmcv's compiled CPU operators (NMS, RoIAlign, ...) take float32 tensors only and fail
on the bfloat16 ones a CPU autocast region hands them ("expected scalar type Float but
found BFloat16"): detectors could not run ``--dtype bf16`` or ``--amp`` on the CPU.
:func:`float32_mmcv_ops` makes the operators mmdet's heads call compute in float32
(their floating inputs cast up, autocast off inside), as autocast itself does for the
operators on its float32 list. Outside autocast nothing changes: the inputs are
already float32 and the original function runs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ['float32_mmcv_ops', 'in_float32']

#: (module, function name, whether the result goes back to the input's dtype) of the
#: mmcv operators mmdet's heads call, looked up by name in their modules
#: (``batched_nms`` finds ``nms`` there, ``RoIAlign`` ``roi_align``). Pooled features
#: go back to the features' dtype (mmdet writes them into a tensor of it); boxes and
#: scores stay float32 (bf16 would round a coordinate of 1000 px to 4 px).
_OPERATORS = (('mmcv.ops.nms', 'nms', False), ('mmcv.ops.nms', 'soft_nms', False),
              ('mmcv.ops.roi_align', 'roi_align', True))


def in_float32(fn: Callable[..., Any], restore: bool = False) -> Callable[..., Any]:
    """``fn`` computing in float32 when called inside a CPU autocast region; with
    ``restore`` its tensor result goes back to the first floating input's dtype."""
    if getattr(fn, '_float32_under_autocast', False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_autocast_enabled('cpu'):
            return fn(*args, **kwargs)

        def up(v: Any) -> Any:
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        with torch.autocast('cpu', enabled=False):
            out = fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                     None)
        if restore and first is not None and isinstance(out, torch.Tensor):
            out = out.to(first.dtype)
        return out
    wrapper._float32_under_autocast = True  # type: ignore[attr-defined]
    return wrapper


@functools.lru_cache(maxsize=1)
def float32_mmcv_ops() -> list[str]:
    """Install :func:`in_float32` on mmcv's operators (once); returns their names."""
    import importlib
    done = []
    for module_name, name, restore in _OPERATORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # mmcv without its compiled operators
            continue
        if hasattr(module, name):
            setattr(module, name, in_float32(getattr(module, name), restore))
            done.append(f'{module_name}.{name}')
    return done
