"""The per-sample depthwise 3x3 convolution of InLine's local residual."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .tracing import exporting

__all__ = ['dynamic_depthwise_conv3x3']


def dynamic_depthwise_conv3x3(x: Tensor, taps: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Convolve each sample's channels with that sample's own 3x3 taps.

    Args:
        x: feature map ``(B, H, W, C)`` (channels last, as the attention blocks hold it).
        taps: ``(B, C, 3, 3)``, one row-major 3x3 kernel per sample and channel.
        valid: optional ``(B, H, W)`` bool; invalid positions are treated as zeros,
            which is the zero padding at the border of the valid region when
            padding sits at the bottom/right.

    Returns:
        ``(B, H, W, C)``: zero padding of 1 at the map border, no bias.
    """
    b, h, w, c = x.shape
    if taps.shape != (b, c, 3, 3):
        raise ValueError(f'taps must be (B, C, 3, 3) = ({b}, {c}, 3, 3); got {tuple(taps.shape)}')
    if valid is not None:
        x = x * valid[..., None].to(x.dtype)
    if exporting():
        # ONNX's Conv takes its group count as a constant attribute, but here it is
        # B * C with B the number of windows, which varies with the size. Nine shifted
        # multiply-adds are the same convolution with nothing fixed.
        xp = F.pad(x, (0, 0, 1, 1, 1, 1))
        taps = taps.to(x.dtype)
        return sum(xp[:, i:i + h, j:j + w] * taps[:, None, None, :, i, j]
                   for i in range(3) for j in range(3))
    # One grouped convolution over all samples: the batch folds into channels. Kept
    # channels-last, (1, h, w, b*c) in memory, which for b == 1 is x itself: no copy.
    x = x.permute(1, 2, 0, 3).reshape(1, h, w, b * c).permute(0, 3, 1, 2)
    out = F.conv2d(x, taps.reshape(b * c, 1, 3, 3).to(x.dtype), padding=1, groups=b * c)
    return out.permute(0, 2, 3, 1).reshape(h, w, b, c).permute(2, 0, 1, 3)
