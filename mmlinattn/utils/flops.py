"""FLOPs counted at the operator level with ``torch.utils.flop_counter``.

Module-level counters (fvcore, mmengine's) miss products that are not
``nn.Linear``/``nn.Conv`` modules, and torch's own counter has no formula for
the CPU kernel of ``scaled_dot_product_attention``; both would make softmax
attention look free. We add that formula, so every matmul of every attention
variant is counted. FLOPs here are floating-point operations (a multiply-add
is 2), as torch counts them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['sdpa_flops', 'count_flops']


def sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
               out_shape: Any = None, **kwargs: Any) -> int:
    """``Q K^T`` and ``A V``: ``2 * B * heads * Lq * Lk * (d + dv)`` (any leading dims)."""
    *lead, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    batch = 1
    for n in lead:
        batch *= n
    return 2 * batch * lq * lk * (d + dv)


def _custom_mapping() -> dict:
    mapping = {}
    aten = torch.ops.aten
    for name in ('_scaled_dot_product_flash_attention_for_cpu', ):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = sdpa_flops
    return mapping


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any
                ) -> tuple[int, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` once and count its FLOPs.

    Returns ``(total, per_module)`` where ``per_module`` maps module paths (as
    torch's counter names them, e.g. ``'MaskRCNN.backbone'``) to their totals.
    """
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn(*args, **kwargs)
    per_module: dict[str, int] = defaultdict(int)
    for module, ops in counter.get_flop_counts().items():
        per_module[module] = int(sum(ops.values()))
    return int(counter.get_total_flops()), dict(per_module)
