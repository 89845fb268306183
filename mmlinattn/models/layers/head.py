"""The ImageNet classification head the released models put on a backbone."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .weight_init import init_transformer_weights

__all__ = ['ClassifierHead']


class ClassifierHead(nn.Module):
    """Mixin for ``Classifier(ClassifierHead, Backbone)``: ``head`` on pooled last-stage features.

    The subclass builds the backbone with its last stage only and no output
    norms, then calls :meth:`_add_head`, and defines ``forward_features``
    (``(B, 3, H, W)`` -> the features :meth:`pool` reduces).
    """

    head: nn.Module

    def _add_head(self, dim: int, num_classes: int, norm_eps: Optional[float]) -> None:
        """``norm`` (when ``norm_eps`` is given; PVT has none) and ``head`` of ``dim`` inputs."""
        self.num_classes = num_classes
        if norm_eps is not None:
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        # The backbone initialised itself already; only the new modules need it.
        for module in (getattr(self, 'norm', None), self.head):
            if module is not None:
                module.apply(init_transformer_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def pool(self, x: Tensor) -> Tensor:
        """Mean over the ``(B, h, w, C)`` map -> ``(B, C)``."""
        return x.mean(dim=(1, 2))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x))
