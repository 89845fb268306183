"""InLine's local residual: 3x3 taps predicted from the mean token, applied to v."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ...ops import dynamic_depthwise_conv3x3
from ...parallel import current_group, halo_rows

__all__ = ['LocalResidual', 'masked_mean']


def masked_mean(x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean over the token axis of ``(B, N, C)``; with ``valid (B, N)`` only valid tokens count."""
    if valid is None:
        return x.mean(dim=1)
    m = valid[..., None].to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class LocalResidual(nn.Sequential):
    """Per-sample, per-channel 3x3 depthwise convolution of v with predicted taps.

    ``Conv1d(C, C, 1, groups=heads) -> GELU -> Conv1d(C, 9C, 1, groups=heads)``
    maps the mean token ``(B, C)`` to taps; output channel ``c * 9 + t`` is tap
    ``t`` (row-major 3x3) of channel ``c``. It subclasses ``nn.Sequential`` so
    its parameters are named ``0.*`` and ``2.*`` as in the released checkpoints.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        super().__init__(
            nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads),
            nn.GELU(),
            nn.Conv1d(dim, dim * 9, kernel_size=1, groups=num_heads),
        )
        self.dim = dim

    def taps(self, mean_token: Tensor) -> Tensor:
        """``(B, C)`` mean token -> ``(B, C, 3, 3)`` taps."""
        r = super().forward(mean_token[..., None])  # (B, 9C, 1)
        return r.view(mean_token.shape[0], self.dim, 3, 3)

    def forward(self, v: Tensor, mean_token: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Local term for a value map.

        Args:
            v: ``(B, H, W, C)`` values of the attended region.
            mean_token: ``(B, C)`` mean of the attention input over that region.
            valid: optional ``(B, H, W)`` bool; invalid positions act as zero padding.

        Returns:
            ``(B, H, W, C)``. Spatially sharded (:mod:`mmlinattn.parallel`), ``v`` is
            this rank's rows of the map and one row of each neighbour is fetched.
        """
        g = current_group()
        if g is None:
            return dynamic_depthwise_conv3x3(v, self.taps(mean_token), valid)
        if valid is not None:
            raise ValueError('a padded (masked) region cannot be spatially sharded; its '
                             'attention runs on the gathered map')
        band = halo_rows(v, 1, 1, 1, g)
        return dynamic_depthwise_conv3x3(band, self.taps(mean_token))[:, 1:-1]
