"""One declaration per backbone family, read by every registry and tool.

Each backbone module ends with ``register_family(BackboneFamily(...))``. That one
call puts the backbone in the ``mmlinattn`` registry and in mmdet's and mmseg's
(under its name and any old names), registers the family's released ImageNet
models in timm, and makes the family known to ``tools/convert_checkpoint.py``
(by the key prefixes of its released checkpoints) and to the benchmark (its
contenders). Nothing else keeps a list of families: :data:`FAMILIES` is the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from ..registry import MODELS, register_into_openmmlab

__all__ = ['BackboneFamily', 'ReleasedModel', 'BenchmarkVariant', 'FAMILIES', 'register_family',
           'unregister_family', 'detect_family', 'find_family']

StateDictConverter = Callable[[Mapping[str, Tensor]], dict]


@dataclass(frozen=True)
class ReleasedModel:
    """One released ImageNet-1k model: its timm name, its file and how to build it."""

    #: timm model name, e.g. ``inline_swin_tiny``.
    name: str
    #: Stem of the released checkpoint file, e.g. ``inline_swin_t`` (``inline_swin_t.pth``).
    file: str
    arch: str
    #: Of the reference training config (timm users fine-tune with it).
    drop_path_rate: float
    #: Input side in px (224, or the position-embedding side of the DeiT models).
    image_size: int = 224
    #: timm's evaluation centre crop.
    crop_pct: float = 0.9
    #: Constructor arguments that differ from the arch's defaults (``(name, value)`` pairs).
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class BenchmarkVariant:
    """A backbone configuration the benchmark offers as a contender."""

    name: str
    description: str
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class BackboneFamily:
    """Everything the registries and tools need to know about one backbone family.

    The arch table and the checkpoint converter are the backbone's own
    (``backbone.arch_settings``, ``backbone.convert_checkpoint``), so they are
    declared once, on the class.
    """

    #: Short name: ``swin``, ``pvt``, ``cswin``, ``deit`` (``--family`` of the converter).
    name: str
    #: The :class:`~mmlinattn.models.backbones.InLineBackbone` subclass.
    backbone: type
    #: ``Classifier(ClassifierHead, backbone)`` with the released head.
    classifier: type
    #: A released (classification) state dict of this family has a key starting with
    #: one of these.
    key_prefixes: tuple[str, ...]
    #: The first convolution's module path in the classifier (timm's ``first_conv``).
    first_conv: str
    released: tuple[ReleasedModel, ...] = ()
    #: Stride of the features the classifier pools (timm's ``pool_size`` = side / stride).
    feature_stride: int = 32
    benchmark: tuple[BenchmarkVariant, ...] = ()
    #: Earlier registry names of the backbone, still accepted in configs.
    aliases: tuple[str, ...] = ()
    #: Families on the same base model share key prefixes (InLine-, Agent- and
    #: FLatten-Swin all start with ``layers.``); then a released state dict of this
    #: family, and no other, has a key containing one of these (``.attn.an_bias``).
    key_markers: tuple[str, ...] = ()

    def identifies(self, keys: list[str]) -> bool:
        """Whether ``keys`` are a state dict of this family (by prefixes and markers)."""
        if not any(k.startswith(self.key_prefixes) for k in keys):
            return False
        return not self.key_markers or any(m in k for k in keys for m in self.key_markers)

    @property
    def archs(self) -> Mapping[str, dict]:
        return self.backbone.arch_settings

    @property
    def convert(self) -> StateDictConverter:
        return self.backbone.convert_checkpoint


#: Every registered family by name, in registration order.
FAMILIES: dict[str, BackboneFamily] = {}


def _check(spec: BackboneFamily) -> None:
    cls = spec.backbone
    for attr in ('arch_settings', 'convert_checkpoint'):
        if getattr(cls, attr, None) is None:
            raise TypeError(f'{cls.__name__} must declare {attr} to form a backbone family')
    if not issubclass(spec.classifier, cls):
        raise TypeError(f'{spec.classifier.__name__} must subclass {cls.__name__}')
    if not spec.key_prefixes:
        raise ValueError(f'family {spec.name!r}: key_prefixes must name at least one prefix')
    for model in spec.released:
        if model.arch not in spec.archs:
            raise ValueError(f'{model.name}: arch {model.arch!r} is not in '
                             f'{cls.__name__}.arch_settings ({sorted(spec.archs)})')
    for other in FAMILIES.values():
        if other.name == spec.name:
            continue
        clash = set(spec.key_prefixes) & set(other.key_prefixes)
        told_apart = spec.key_markers and other.key_markers and \
            not set(spec.key_markers) & set(other.key_markers)
        if clash and not told_apart:
            raise ValueError(f'family {spec.name!r} shares key prefixes {sorted(clash)} with '
                             f'{other.name!r}; checkpoints could not be told apart (give both '
                             'distinct key_markers)')


#: Layers built on the family specs (the timm classifiers, :mod:`.classification`) are
#: told of every family registered or removed: ``(on_register, on_unregister)`` pairs.
#: They subscribe through :func:`add_family_listener`, so this module imports none of them.
_LISTENERS: list[tuple[Callable[[BackboneFamily], None], Callable[[BackboneFamily], None]]] = []


def add_family_listener(on_register: Callable[[BackboneFamily], None],
                        on_unregister: Callable[[BackboneFamily], None]) -> None:
    """Call ``on_register`` for every family registered so far and from now on, and
    ``on_unregister`` for every family removed."""
    _LISTENERS.append((on_register, on_unregister))
    for spec in list(FAMILIES.values()):
        on_register(spec)


def register_family(spec: BackboneFamily) -> BackboneFamily:
    """Register ``spec`` everywhere (see the module docstring); returns it.

    Registering a family of the same name again replaces it (module reloads).
    """
    _check(spec)
    names = (spec.backbone.__name__, ) + tuple(spec.aliases)
    for name in names:
        MODELS.register_module(name=name, module=spec.backbone, force=True)
    register_into_openmmlab([spec.backbone], names=names)
    FAMILIES[spec.name] = spec
    for on_register, _ in _LISTENERS:
        on_register(spec)
    return spec


def unregister_family(name: str) -> None:
    """Remove a family registered by :func:`register_family` (tests of toy families)."""
    spec = FAMILIES.pop(name)
    names = (spec.backbone.__name__, ) + tuple(spec.aliases)
    for registry in [MODELS] + _openmmlab_model_registries():
        for n in names:
            if registry._module_dict.get(n) is spec.backbone:
                registry._module_dict.pop(n)
    for _, on_unregister in _LISTENERS:
        on_unregister(spec)


def _openmmlab_model_registries() -> list:
    import importlib
    import sys

    return [importlib.import_module(f'{scope}.registry').MODELS for scope in ('mmdet', 'mmseg')
            if f'{scope}.registry' in sys.modules]


def find_family(name_or_class: Any) -> BackboneFamily:
    """The family of a name (``swin``), backbone or classifier class, or backbone name."""
    for spec in FAMILIES.values():
        if name_or_class in (spec.name, spec.backbone, spec.classifier) or \
                name_or_class in (spec.backbone.__name__, ) + spec.aliases:
            return spec
    raise KeyError(f'no backbone family {name_or_class!r}; known: {sorted(FAMILIES)}')


def detect_family(keys: list[str]) -> Optional[BackboneFamily]:
    """The family whose released key prefixes (and markers) occur in ``keys`` (None if
    none does).

    Raises ValueError when keys of several families occur (a merged or foreign file).
    """
    found = [spec for spec in FAMILIES.values() if spec.identifies(keys)]
    if len(found) > 1:
        raise ValueError('checkpoint keys match several families: ' + ', '.join(
            f'{s.name} ({", ".join(s.key_prefixes)})' for s in found))
    return found[0] if found else None
