"""Checkpoint handling: safe loading, key conversion and clear mismatch errors.

Two kinds of files reach us:

* Released InLine checkpoints (untrusted, from the internet). They pickle the
  state dict under ``model`` next to optimizer state and a yacs ``CfgNode``.
  :func:`safe_load` reads them with an unpickler that rebuilds tensors and
  plain containers only; every other pickled global becomes an inert
  :class:`UntrustedObject` that is never imported or called.
* Checkpoints written by mmengine's Runner during our own training. torch >= 2.6
  loads with ``weights_only=True`` and mmengine 0.10.7 does not say otherwise,
  so :func:`allow_runner_checkpoint_types` allow-lists exactly the mmengine and
  numpy types those files hold (``torch.serialization.add_safe_globals``);
  anything else is still refused by torch.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import types
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

__all__ = [
    'UntrustedObject', 'CheckpointMismatchError', 'safe_load', 'extract_state_dict',
    'load_state_dict_checked', 'allow_runner_checkpoint_types', 'DERIVED_BUFFER_SUFFIXES',
    'drop_derived_buffers'
]

logger = logging.getLogger(__name__)

# Buffers the reference models saved that are functions of the architecture,
# not learned: our models recompute them, so they are dropped when loading.
DERIVED_BUFFER_SUFFIXES = ('relative_position_index', 'attn_mask')

PathLike = Union[str, os.PathLike]


class UntrustedObject:
    """Inert stand-in for a pickled object of a type we do not trust.

    Holds what the pickle would have passed to the real type (``args``,
    ``state``, items) as plain data; no code of the original type runs.
    """

    qualname = 'unknown'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: list = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Iterable) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f'<untrusted {self.qualname}>'


def _is_safe_global(module: str, name: str) -> bool:
    if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2',
                                             '_rebuild_parameter'):
        return True
    if module == 'collections' and name == 'OrderedDict':
        return True
    if module == 'torch' and name == 'Size':
        return True
    if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    return module == 'builtins' and name in ('set', 'frozenset', 'tuple', 'list', 'dict')


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and containers; turns every other global into a stand-in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if _is_safe_global(module, name):
            return super().find_class(module, name)
        qualname = f'{module}.{name}'
        self.refused.add(qualname)
        _REFUSED_LOG.add(qualname)
        return type(f'Untrusted[{qualname}]', (UntrustedObject, ), {'qualname': qualname})


_REFUSED_LOG: set[str] = set()


def _restricted_pickle_module() -> types.ModuleType:
    module = types.ModuleType('mmlinattn_restricted_pickle')
    module.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    module.__dict__['UnpicklingError'] = pickle.UnpicklingError
    return module


def safe_load(path: Union[PathLike, io.BytesIO], map_location: Any = 'cpu') -> Any:
    """Load a torch checkpoint without importing or calling anything but tensor rebuilds.

    Objects of other types come back as :class:`UntrustedObject` stand-ins
    (their names are logged), so a released checkpoint's ``model`` entry loads
    while its pickled config object stays inert.
    """
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    _REFUSED_LOG.clear()
    # weights_only=False is required for torch to use our pickle_module; the
    # restriction is ours: _RestrictedUnpickler resolves no untrusted global.
    obj = torch.load(path, map_location=map_location, pickle_module=_restricted_pickle_module(),
                     weights_only=False)
    if _REFUSED_LOG:
        logger.info('safe_load(%s): kept %d untrusted pickled type(s) inert: %s', path,
                    len(_REFUSED_LOG), ', '.join(sorted(_REFUSED_LOG)))
    return obj


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``model``/``state_dict`` entry, or itself.

    ``module.`` prefixes (DataParallel) are stripped. Raises ``ValueError`` when
    no tensor dictionary is found.
    """
    sd = checkpoint
    if isinstance(sd, Mapping):
        for key in ('state_dict', 'model', 'model_ema'):
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError('checkpoint holds no state dict (looked for a "state_dict" or "model" '
                         'entry of tensors, or a plain dict of tensors)')
    out: dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k[len('module.'):] if k.startswith('module.') else k] = v
    return out


def drop_derived_buffers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove buffers that our models recompute (see :data:`DERIVED_BUFFER_SUFFIXES`)."""
    return OrderedDict((k, v) for k, v in state_dict.items()
                       if not k.endswith(DERIVED_BUFFER_SUFFIXES))


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose tensors do not fit the model."""


def load_state_dict_checked(model: nn.Module,
                            state_dict: Mapping[str, torch.Tensor],
                            strict: bool = False,
                            source: str = 'checkpoint',
                            allow_missing: Optional[Callable[[str], bool]] = None
                            ) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``model`` and explain any misfit.

    Shape mismatches always raise :class:`CheckpointMismatchError` listing each
    key with both shapes. With ``strict`` any missing or unexpected key raises
    too, except missing keys accepted by ``allow_missing``. Returns
    ``(missing, unexpected)``.
    """
    own = model.state_dict()
    mismatched = [f'  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    hard_missing = [k for k in missing if not (allow_missing and allow_missing(k))]
    problems = []
    if mismatched:
        problems.append(f'{len(mismatched)} shape mismatch(es):\n' + '\n'.join(mismatched))
    if strict and hard_missing:
        problems.append(f'{len(hard_missing)} key(s) missing from the {source}: '
                        + _abbrev(hard_missing))
    if strict and unexpected:
        problems.append(f'{len(unexpected)} unexpected key(s) in the {source}: '
                        + _abbrev(unexpected))
    if problems:
        raise CheckpointMismatchError(
            f'{source} does not fit {type(model).__name__}:\n' + '\n'.join(problems))
    model.load_state_dict(state_dict, strict=False)
    return missing, unexpected


def _abbrev(keys: list[str], limit: int = 12) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


_RUNNER_TYPES_ALLOWED = False


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as runner checkpoints use it, and nothing else.

    mmengine's ``HistoryBuffer`` pickles its statistics methods (``min``, ``max``,
    ``mean``, ``current``) as ``getattr(HistoryBuffer, name)``. Only that form is
    honoured; any other ``getattr`` in a file is refused.
    """
    from mmengine.logging import HistoryBuffer

    # The defaults are registered lazily (on the first HistoryBuffer), so name them.
    allowed = {'min', 'max', 'mean', 'current', *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refused getattr({obj!r}, {name!r}) in a checkpoint: only HistoryBuffer statistics '
        'methods are allowed')


def allow_runner_checkpoint_types() -> None:
    """Allow-list, for ``torch.load(weights_only=True)``, what mmengine runners pickle.

    mmengine's Runner stores its ``MessageHub`` state (``HistoryBuffer``
    objects holding numpy arrays and numpy scalars, and their statistics methods
    by ``getattr``) in every checkpoint. Exactly these types are added to torch's
    safe globals, with ``getattr`` narrowed to :func:`_history_buffer_getattr`;
    any other pickled object in a file is still refused by torch.
    """
    global _RUNNER_TYPES_ALLOWED
    if _RUNNER_TYPES_ALLOWED:
        return
    import numpy as np
    from mmengine.logging import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    safe: list[Any] = [HistoryBuffer, _reconstruct, scalar, np.ndarray, np.dtype,
                       (_history_buffer_getattr, 'builtins.getattr')]
    # numpy pickles some dtypes through their classes (np.dtypes.Float64DType, ...).
    safe += [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                         np.int32, np.int16, np.int8, np.uint8, np.bool_)]
    torch.serialization.add_safe_globals(safe)
    _RUNNER_TYPES_ALLOWED = True
