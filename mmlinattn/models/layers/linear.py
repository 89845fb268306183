"""``nn.Linear`` whose CPU inference goes through oneDNN (:func:`mmlinattn.ops.linear`)."""
from __future__ import annotations

from torch import Tensor, nn

from ...ops.dense import linear

__all__ = ['Linear']


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys, same initialisation) whose
    forward is :func:`mmlinattn.ops.dense.linear`: oneDNN on the CPU where no gradient
    is needed, ``F.linear`` otherwise. ``(..., in_features)`` -> ``(..., out_features)``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
