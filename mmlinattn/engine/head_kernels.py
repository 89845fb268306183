"""Faster CPU kernels for mmdet's detection heads in tiled inference, same layers.

After the backbone, a gigapixel detection spends most of its time in mmdet's heads
(the RPN over the image, the RoI heads per tile), whose layers run PyTorch's defaults
on the CPU:

* their ``nn.Linear`` layers (the box head's shared fully connected layers, 12544 ->
  1024 over thousands of regions a tile) go through MKL in float32, at half oneDNN's
  speed on an AMD EPYC (:mod:`mmlinattn.ops.dense`);
* their 3x3 convolutions take NCHW weights and maps, which oneDNN reorders into its
  blocked layout on every call; with the weights channels-last it reads and writes the
  maps channels-last directly: a 256 -> 256 3x3 convolution on a 544 x 624 map ran
  863 instead of 1125 ms (464 against 356 GFLOP/s; 2 threads, float32).

:func:`fast_cpu_heads` switches both on for the modules given, inside a ``with``
block, and restores them after: the parameters keep their values (only their strides
change), the state dict is untouched, and outside the block nothing differs. Results
differ from the defaults' by the order of float32 sums (a few ulps) and do not depend
on the size of the region computed. Measured and left out: an FPN neck whose outputs
are written into NCHW maps (the transposing copy, 0.31 s for one 256-channel stride-4
map of a tile, ate the convolutions' gain) and Semantic FPN's decoder on whole crops
(72.3 against 72.5 s of tiles at 8192^2, no gain). Semantic FPN by levels
(:mod:`.fpn_levels`) uses it: in bf16 its convolutions ran 43.4 -> 37.6 s at 8192^2
(float32 unchanged, 87.1 against 88.0 s); the labels read the logits as NCHW float32
bands.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..ops.dense import linear
from ..ops.tracing import exporting
from ..utils.attributes import patched_attributes

__all__ = ['fast_cpu_heads']


def _onednn_forward(layer: nn.Linear) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        return linear(x, layer.weight, layer.bias)
    return forward


@contextlib.contextmanager
def fast_cpu_heads(*modules: Optional[nn.Module]) -> Iterator[int]:
    """Within the block, the CPU 2-D convolutions of ``modules`` (``None`` skipped) hold
    channels-last weights and their plain ``nn.Linear`` layers run through
    :func:`mmlinattn.ops.linear`; yields how many layers changed. A no-op while
    exporting a graph and for layers not on the CPU."""
    if exporting():
        yield 0
        return
    seen: set[int] = set()
    convs: list[tuple[nn.Conv2d, Tensor]] = []
    linears: list[nn.Linear] = []
    for module in modules:
        for m in (module.modules() if module is not None else ()):
            weight = getattr(m, 'weight', None)
            if id(m) in seen or not isinstance(weight, Tensor) or weight.device.type != 'cpu':
                continue
            seen.add(id(m))
            if isinstance(m, nn.Conv2d):
                convs.append((m, weight.data))
            elif type(m) is nn.Linear and 'forward' not in m.__dict__:
                linears.append(m)
    try:
        for m, w in convs:
            m.weight.data = w.contiguous(memory_format=torch.channels_last)
        with patched_attributes((m, 'forward', _onednn_forward(m)) for m in linears):
            yield len(convs) + len(linears)
    finally:
        for m, w in convs:
            m.weight.data = w
