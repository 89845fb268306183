"""Checkpoints written by mmengine's Runner: what they pickle, and a safe loader for them.

A runner checkpoint holds ``meta``, ``state_dict``, ``optimizer``,
``param_schedulers`` and the ``message_hub`` state (mmengine ``HistoryBuffer``
objects with numpy arrays and scalars, and their statistics methods pickled as
``getattr(HistoryBuffer, name)``). Two ways to read them:

* :func:`load_runner_checkpoint` reads them with mmlinattn's own reader (see
  :mod:`.reader`), trusting exactly those types; :func:`use_safe_checkpoint_loader`
  makes it mmengine's loader for local files, so ``load_from`` and ``resume`` in
  our tools never reach ``torch.load``.
* :func:`allow_runner_checkpoint_types` allow-lists the same types for
  ``torch.load(weights_only=True)`` (torch >= 2.6's default), for users who call
  torch themselves.
"""
from __future__ import annotations

import logging
import os
import pickle
from functools import cache
from typing import Any, Union

from .reader import MapLocation, read_checkpoint, relocate
from .safetensors_io import is_safetensors, read_safetensors
from .state_dict import extract_state_dict

__all__ = ['allow_runner_checkpoint_types', 'load_runner_checkpoint', 'use_safe_checkpoint_loader']

logger = logging.getLogger(__name__)


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


def _numpy_core() -> Any:
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _numpy_dtype_classes() -> list[type]:
    import numpy as np

    # numpy pickles dtypes through their classes (np.dtypes.Float64DType, ...).
    return [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                                        np.int16, np.int8, np.uint8, np.bool_)]


class _NumpyArrayName:
    """What the name ``numpy.ndarray`` resolves to: an argument of ``_reconstruct``, never
    called (``ndarray(shape)`` would allocate whatever the file asks)."""

    def __repr__(self) -> str:
        return 'numpy.ndarray'


_NDARRAY = _NumpyArrayName()


def _empty_ndarray(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` as numpy's own pickles call it: an empty array, filled by BUILD.

    Any other shape would allocate what the file asks before reading any data.
    """
    import numpy as np

    if subtype is not _NDARRAY or shape not in ((0, ), 0):
        raise pickle.UnpicklingError(f'numpy _reconstruct({subtype!r:.40}, {shape!r:.40}) is '
                                     'not how numpy pickles arrays')
    return _numpy_core()._reconstruct(np.ndarray, (0, ), dtype)


def _check_history_buffer_state(state: Any) -> None:
    """HistoryBuffer's ``__setstate__`` merges ``statistics_methods`` into a class-wide table:
    only its own methods (as the narrowed ``getattr`` returns them) may go there."""
    from mmengine.logging import HistoryBuffer

    methods = state.get('statistics_methods', {}) if isinstance(state, dict) else None
    if not isinstance(methods, dict) or not all(
            type(k) is str and getattr(HistoryBuffer, k, None) is v for k, v in methods.items()):
        raise pickle.UnpicklingError('HistoryBuffer state with foreign statistics methods')


@cache
def _runner_globals() -> tuple[dict[tuple[str, str], Any], dict[type, Any]]:
    """Trusted names of runner checkpoints for our reader, and the types whose state numpy sets."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    core = _numpy_core()
    names: dict[tuple[str, str], Any] = {
        ('mmengine.logging.history_buffer', 'HistoryBuffer'): HistoryBuffer,
        ('builtins', 'getattr'): _history_buffer_getattr,
        ('numpy', 'ndarray'): _NDARRAY,
        ('numpy', 'dtype'): np.dtype,
    }
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        names[(module, '_reconstruct')] = _empty_ndarray
        names[(module, 'scalar')] = core.scalar
    dtype_classes = _numpy_dtype_classes()
    for cls in dtype_classes:
        names[(cls.__module__, cls.__name__)] = cls
    build_types = {cls: None for cls in (np.ndarray, np.dtype, *dtype_classes)}
    build_types[HistoryBuffer] = _check_history_buffer_state
    return names, build_types


def load_runner_checkpoint(filename: Union[str, os.PathLike],
                           map_location: MapLocation = None) -> Any:
    """Read a checkpoint for mmengine (``load_from``, ``resume``) without ``torch.load``.

    Tensors, containers and the runner's own types are rebuilt; any other
    pickled object stays an inert stand-in (its name is logged); TorchScript
    archives and malformed files are refused (see :mod:`.reader`).
    ``map_location`` as in ``torch.load``. A safetensors file gives
    ``{'state_dict': ..., 'meta': {'safetensors': metadata}}`` (weights only). A file
    with no state dict in it raises :class:`~.errors.NoStateDictError`.
    """
    path = os.path.expanduser(os.fspath(filename))
    if is_safetensors(path):  # weights only: what load_from needs, not what resume needs
        state, metadata = read_safetensors(path)
        return relocate(dict(state_dict=state, meta=dict(safetensors=metadata)), map_location)
    names, build_types = _runner_globals()
    obj, refused = read_checkpoint(path, names, build_types)
    if refused:
        logger.warning('%s: kept %d pickled type(s) inert: %s', filename, len(refused),
                       ', '.join(sorted(refused)))
    # mmengine would load a file without weights as an all-missing state dict, with only
    # a warning: refuse it here, naming the file.
    extract_state_dict(obj, source=path)
    return relocate(obj, map_location)


def use_safe_checkpoint_loader() -> None:
    """Make :func:`load_runner_checkpoint` mmengine's loader for local checkpoint files.

    Affects every ``CheckpointLoader.load_checkpoint`` of a local path in this
    process (``load_from``, ``resume``, ``Pretrained`` init of mmengine modules).
    Remote schemes (``http://``, ``s3://``, ...) keep mmengine's loaders, which
    call ``torch.load`` with torch's ``weights_only`` default.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes='', loader=_mmengine_local_loader, force=True)


def _mmengine_local_loader(filename: str, map_location: MapLocation = None) -> Any:
    return load_runner_checkpoint(filename, map_location)


_RUNNER_TYPES_ALLOWED = False


def allow_runner_checkpoint_types() -> None:
    """Allow-list, for ``torch.load(weights_only=True)``, what mmengine runners pickle.

    Exactly the runner's types are added to torch's safe globals, with
    ``getattr`` narrowed to :func:`_history_buffer_getattr`; any other pickled
    object in a file is still refused by torch.
    """
    global _RUNNER_TYPES_ALLOWED
    if _RUNNER_TYPES_ALLOWED:
        return
    import numpy as np
    import torch
    from mmengine.logging import HistoryBuffer

    core = _numpy_core()
    safe: list[Any] = [HistoryBuffer, core._reconstruct, core.scalar, np.ndarray, np.dtype,
                       (_history_buffer_getattr, 'builtins.getattr')]
    safe += _numpy_dtype_classes()
    torch.serialization.add_safe_globals(safe)
    _RUNNER_TYPES_ALLOWED = True
