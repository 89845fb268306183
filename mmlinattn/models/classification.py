"""The released ImageNet-1k InLine models, registered in timm.

Built from the backbone classes (same stages, blocks and attention) plus the
reference head, so that their learnable parameters match the released state
dicts key for key and a released checkpoint loads and computes the same logits::

    import timm, mmlinattn
    model = timm.create_model('inline_swin_tiny')
    mmlinattn.models.load_released(model, 'inline_swin_t.pth')
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from mmengine.logging import print_log
from timm.models import register_model
from torch import Tensor, nn

from ..checkpoint import (
    adapt_position_tables,
    drop_derived_buffers,
    extract_state_dict,
    load_state_dict_checked,
    safe_load,
)
from .backbones import InLineCSwin, InLinePVT, InLineSwin, InLineViT
from .backbones.base import init_transformer_weights

__all__ = [
    'InLineSwinClassifier', 'InLinePVTClassifier', 'InLineCSwinClassifier', 'InLineViTClassifier',
    'load_released', 'CLASSIFIERS', 'ReleasedModel'
]


class _ClassifierHead(nn.Module):
    """Shared by the classifiers: a ``head`` on pooled features of the last stage."""

    head: nn.Module

    def _add_head(self, dim: int, num_classes: int, norm_eps: Optional[float]) -> None:
        self.num_classes = num_classes
        if norm_eps is not None:  # the released final norm (PVT has none)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        # The backbone initialised itself already; only the new modules need it.
        for module in (getattr(self, 'norm', None), self.head):
            if module is not None:
                module.apply(init_transformer_weights)

    def pool(self, x: Tensor) -> Tensor:
        """Mean over the ``(B, h, w, C)`` map."""
        return x.mean(dim=(1, 2))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x))


class InLineSwinClassifier(_ClassifierHead, InLineSwin):
    """InLine-Swin with the reference head: final ``norm``, token mean, ``head``."""

    def __init__(self, arch: str = 'tiny', num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(arch, out_indices=(-1, ), out_norm=False, **kwargs)
        self._add_head(self.num_features[-1], num_classes, norm_eps=1e-5)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> normed last-stage tokens ``(B, H/32, W/32, C)``."""
        return self.norm(self.forward_stages(x)[-1])


class InLinePVTClassifier(_ClassifierHead, InLinePVT):
    """InLine-PVT with the reference head: token mean of the last stage, ``head`` (no norm)."""

    def __init__(self, arch: str = 'tiny', num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(arch, out_indices=(-1, ), out_norm=False, **kwargs)
        self._add_head(self.num_features[-1], num_classes, norm_eps=None)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[-1]


class InLineCSwinClassifier(_ClassifierHead, InLineCSwin):
    """InLine-CSwin with the reference head: final ``norm``, token mean, ``head``."""

    def __init__(self, arch: str = 'tiny', num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(arch, out_indices=(-1, ), out_norm=False, **kwargs)
        self._add_head(self.num_features[-1], num_classes, norm_eps=1e-5)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.forward_stages(x)[-1])


class InLineViTClassifier(_ClassifierHead, InLineViT):
    """InLine-DeiT: final ``norm``, class token, ``head``."""

    def __init__(self, arch: str = 'tiny', num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(arch, out_indices=(-1, ), pyramid=False, out_norm=False, **kwargs)
        self._add_head(self.embed_dims, num_classes, norm_eps=1e-6)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> normed tokens ``(B, 1 + h*w, C)``."""
        return self.norm(self.forward_tokens(x)[0])

    def pool(self, x: Tensor) -> Tensor:
        """The class token."""
        return x[:, 0]


def load_released(model: nn.Module, checkpoint: str, strict: bool = True) -> nn.Module:
    """Load a released InLine checkpoint (read safely) into a classification model.

    Derived buffers in the file (``relative_position_index``, ``attn_mask``) are
    ignored; position tables learned for another window or grid are interpolated
    (e.g. 224 px weights into a 384 px model, logged); any other missing,
    unexpected or mis-shaped key raises
    :class:`~mmlinattn.checkpoint.CheckpointMismatchError`.
    """
    state = drop_derived_buffers(extract_state_dict(safe_load(checkpoint), source=checkpoint))
    state, resized = adapt_position_tables(
        state, model.state_dict(), getattr(model, 'pos_embed_interpolation', 'bicubic'))
    for note in resized:
        print_log(f'{type(model).__name__}: resized {note} from {checkpoint}', logger='current')
    load_state_dict_checked(model, state, strict=strict, source=checkpoint)
    return model


def _cfg(**kwargs: Any) -> dict:
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
               interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv='patch_embed.proj', classifier='head',
               license='see https://github.com/LeapLabTHU/InLine')
    cfg.update(kwargs)
    return cfg


class ReleasedModel(NamedTuple):
    """One released ImageNet-1k model: how to build it and its timm ``pretrained_cfg``."""

    cls: type
    arch: str
    drop_path_rate: float  # of the reference training config
    image_size: int = 224
    crop_pct: float = 0.9
    #: Constructor arguments that differ from the arch's defaults (``(name, value)`` pairs).
    options: tuple[tuple[str, Any], ...] = ()


def _create(spec: ReleasedModel, pretrained: bool, **kwargs: Any) -> nn.Module:
    # timm passes its own bookkeeping kwargs to entry points.
    overlay = kwargs.pop('pretrained_cfg_overlay', None) or {}
    if kwargs.pop('features_only', False):
        raise ValueError(
            f'{spec.cls.__name__}: features_only is not supported by the timm entry points; for '
            f'feature maps build the backbone ({spec.cls.__mro__[2].__name__}(arch='
            f'{spec.arch!r}, out_indices=...)), which returns NCHW maps of the chosen stages')
    for key in ('pretrained_cfg', 'cache_dir'):
        kwargs.pop(key, None)
    kwargs = {'drop_path_rate': spec.drop_path_rate, **dict(spec.options), **kwargs}
    model = spec.cls(kwargs.pop('arch', spec.arch), **kwargs)  # an arch dict may replace it
    first_conv = {InLinePVTClassifier: 'patch_embed1.proj',
                  InLineCSwinClassifier: 'stage1_conv_embed.0'}.get(spec.cls, 'patch_embed.proj')
    size = spec.image_size
    grid = size // (16 if spec.cls is InLineViTClassifier else 32)
    model.pretrained_cfg = model.default_cfg = _cfg(
        first_conv=first_conv, input_size=(3, size, size), pool_size=(grid, grid),
        crop_pct=spec.crop_pct)
    if pretrained:
        file = overlay.get('file')
        if not file:
            raise ValueError(
                'released InLine weights are not downloadable from here: download them from '
                'https://github.com/LeapLabTHU/InLine and pass '
                "pretrained_cfg_overlay=dict(file='path/to/ckpt.pth') to timm.create_model")
        load_released(model, file)
    return model


CLASSIFIERS: dict[str, ReleasedModel] = {
    'inline_swin_tiny': ReleasedModel(InLineSwinClassifier, 'tiny', 0.2),
    'inline_swin_small': ReleasedModel(InLineSwinClassifier, 'small', 0.3),
    'inline_swin_base': ReleasedModel(InLineSwinClassifier, 'base', 0.5),
    # The reference's 384 px fine-tuning: window 96 (InLine stages stay global),
    # softmax windows max(7, 96 // 8) = 12; evaluated without a centre crop.
    'inline_swin_base_384': ReleasedModel(InLineSwinClassifier, 'base', 0.5, 384, 1.0,
                                          (('softmax_window', 12), )),
    'inline_pvt_tiny': ReleasedModel(InLinePVTClassifier, 'tiny', 0.1),
    'inline_pvt_small': ReleasedModel(InLinePVTClassifier, 'small', 0.1),
    'inline_pvt_medium': ReleasedModel(InLinePVTClassifier, 'medium', 0.3),
    'inline_pvt_large': ReleasedModel(InLinePVTClassifier, 'large', 0.3),
    'inline_cswin_tiny': ReleasedModel(InLineCSwinClassifier, 'tiny', 0.2),
    'inline_cswin_small': ReleasedModel(InLineCSwinClassifier, 'small', 0.4),
    'inline_cswin_base': ReleasedModel(InLineCSwinClassifier, 'base', 0.5),
    # 384 px: softmax stripes 12 (InLine split sizes 96-48 equal the maps: global).
    'inline_cswin_base_384': ReleasedModel(InLineCSwinClassifier, 'base', 0.7, 384, 1.0,
                                           (('split_size', 12), )),
    # The InLine-DeiT models' image sides are those of their position embeddings.
    'inline_deit_tiny': ReleasedModel(InLineViTClassifier, 'tiny', 0.1, 224),
    'inline_deit_small': ReleasedModel(InLineViTClassifier, 'small', 0.1, 288),
    'inline_deit_base': ReleasedModel(InLineViTClassifier, 'base', 0.1, 448),
}


def _entry_point(name: str) -> Callable[..., nn.Module]:
    spec = CLASSIFIERS[name]

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(spec, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f'{name}: released ImageNet-1k layout ({spec.cls.__name__}, arch '
                      f'{spec.arch!r}, {spec.image_size} px).')
    return create


def _register_all() -> None:
    import timm.models

    for name in CLASSIFIERS:
        if name not in timm.models.list_models(name):
            register_model(_entry_point(name))


_register_all()
