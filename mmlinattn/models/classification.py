"""The released ImageNet-1k InLine models in timm, and loading their checkpoints.

Each family's classifier (its backbone plus the reference head, declared next to
the backbone) is registered under the timm names of its
:attr:`~mmlinattn.models.family.BackboneFamily.released` models, so that learnable
parameters match the released state dicts key for key and a released checkpoint
loads and computes the same logits::

    import timm, mmlinattn
    model = timm.create_model('inline_swin_tiny')
    mmlinattn.models.load_released(model, 'inline_swin_t.pth')
"""
from __future__ import annotations

from typing import Any, Callable

from mmengine.logging import print_log
from torch import nn

from ..checkpoint import (
    adapt_position_tables,
    drop_derived_buffers,
    extract_state_dict,
    load_state_dict_checked,
    safe_load,
)
from .family import BackboneFamily, ReleasedModel, add_family_listener

__all__ = ['load_released', 'register_released', 'unregister_released', 'CLASSIFIERS']

#: timm name -> (family, released model), filled by :func:`register_released`.
CLASSIFIERS: dict[str, tuple[BackboneFamily, ReleasedModel]] = {}


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


def _pretrained_cfg(family: BackboneFamily, released: ReleasedModel) -> dict:
    size = released.image_size
    grid = size // family.feature_stride
    return dict(num_classes=1000, input_size=(3, size, size), pool_size=(grid, grid),
                crop_pct=released.crop_pct, interpolation='bicubic',
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv=family.first_conv, classifier='head',
                license='see https://github.com/LeapLabTHU/InLine')


def create_released(family: BackboneFamily, released: ReleasedModel, pretrained: bool = False,
                    **kwargs: Any) -> nn.Module:
    """The classifier of ``released``; ``kwargs`` override its constructor arguments (an
    ``arch`` dict may replace the released arch)."""
    overlay = kwargs.pop('pretrained_cfg_overlay', None) or {}
    if kwargs.pop('features_only', False):
        raise ValueError(
            f'{released.name}: features_only is not supported by the timm entry points; for '
            f'feature maps build the backbone ({family.backbone.__name__}(arch='
            f'{released.arch!r}, out_indices=...)), which returns NCHW maps of the chosen '
            'stages')
    for key in ('pretrained_cfg', 'cache_dir'):  # timm's own bookkeeping
        kwargs.pop(key, None)
    kwargs = {'drop_path_rate': released.drop_path_rate, **dict(released.options), **kwargs}
    model = family.classifier(kwargs.pop('arch', released.arch), **kwargs)
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(family, released)
    if pretrained:
        file = overlay.get('file')
        if not file:
            raise ValueError(
                'released InLine weights are not downloadable from here: download them from '
                'https://github.com/LeapLabTHU/InLine and pass '
                "pretrained_cfg_overlay=dict(file='path/to/ckpt.pth') to timm.create_model")
        load_released(model, file)
    return model


def _entry_point(family: BackboneFamily, released: ReleasedModel) -> Callable[..., nn.Module]:

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_released(family, released, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = released.name
    create.__module__ = __name__
    create.__doc__ = (f'{released.name}: released ImageNet-1k layout '
                      f'({family.classifier.__name__}, arch {released.arch!r}, '
                      f'{released.image_size} px).')
    return create


def register_released(family: BackboneFamily, released: ReleasedModel) -> None:
    """Register ``released`` as a timm model (replacing an earlier registration)."""
    from timm.models import register_model

    unregister_released(released.name)
    # timm lists the name in this module's __all__; the module holds the entry point too.
    globals()[released.name] = register_model(_entry_point(family, released))
    CLASSIFIERS[released.name] = (family, released)


def unregister_released(name: str) -> None:
    """Remove the timm model ``name`` if we registered it."""
    from timm.models import _registry

    if CLASSIFIERS.pop(name, None) is None:
        return
    # timm has no public removal; this is what its own re-registration does, plus the
    # entry point itself.
    _registry._clear_model_entries(name)
    _registry._model_entrypoints.pop(name, None)
    globals().pop(name, None)
    if name in __all__:
        __all__.remove(name)


def _register_family(family: BackboneFamily) -> None:
    for model in family.released:
        register_released(family, model)


def _unregister_family(family: BackboneFamily) -> None:
    for model in family.released:
        unregister_released(model.name)


# Every family's released models become timm models, including families registered
# before this module was imported (the backbones register on import).
add_family_listener(_register_family, _unregister_family)
