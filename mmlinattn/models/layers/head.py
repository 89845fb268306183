"""The ImageNet classification head the released models put on a backbone."""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from torch import Tensor, nn

from .linear import Linear
from .weight_init import init_transformer_weights

__all__ = ['ClassifierHead']


class ClassifierHead(nn.Module):
    """Mixin for ``Classifier(ClassifierHead, Backbone)``: ``head`` on pooled last-stage features.

    It builds the backbone with its last stage only and no output norms, then
    the released head: a final LayerNorm ``norm`` (eps :attr:`head_norm_eps`; none
    when None), the token mean (:meth:`pool`) and the Linear ``head``. A family
    whose head differs overrides :meth:`forward_features` / :meth:`pool`.
    """

    head: nn.Module
    #: eps of the final ``norm``; None: the released model has no final norm.
    head_norm_eps: ClassVar[Optional[float]] = 1e-5

    def __init__(self, arch: Union[str, dict] = 'tiny', num_classes: int = 1000,
                 **kwargs: Any) -> None:
        super().__init__(arch, out_indices=(-1, ), out_norm=False, **kwargs)
        self._add_head(self.num_features[-1], num_classes, self.head_norm_eps)

    def _add_head(self, dim: int, num_classes: int, norm_eps: Optional[float]) -> None:
        """``norm`` (when ``norm_eps`` is given; PVT has none) and ``head`` of ``dim`` inputs."""
        self.num_classes = num_classes
        if norm_eps is not None:
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = Linear(dim, num_classes) if num_classes else nn.Identity()
        # The backbone initialised itself already; only the new modules need it.
        for module in (getattr(self, 'norm', None), self.head):
            if module is not None:
                module.apply(init_transformer_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the last stage's tokens ``(B, h, w, C)``, through ``norm``."""
        out = self.forward_stages(x)[-1]
        return self.norm(out) if self.head_norm_eps is not None else out

    def pool(self, x: Tensor) -> Tensor:
        """Mean over the ``(B, h, w, C)`` map -> ``(B, C)``."""
        return x.mean(dim=(1, 2))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x))
