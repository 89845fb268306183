"""State dicts out of loaded checkpoints, and into models with clear errors."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .errors import CheckpointMismatchError, NoStateDictError
from .unpickler import UntrustedObject

__all__ = [
    'DERIVED_BUFFER_SUFFIXES', 'extract_state_dict', 'drop_derived_buffers',
    'load_state_dict_checked', 'check_checkpoint_fits'
]

# Buffers the reference models saved that are functions of the architecture,
# not learned: our models recompute them, so they are dropped when loading.
DERIVED_BUFFER_SUFFIXES = ('relative_position_index', 'attn_mask', 'rope.rotations')


def extract_state_dict(checkpoint: Any, source: str = 'checkpoint') -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``state_dict``/``model``/``model_ema`` entry, or itself.

    ``module.`` prefixes (DataParallel) are stripped. Raises :class:`NoStateDictError`
    (a ``ValueError`` too) when no tensor dictionary is found, and
    :class:`CheckpointMismatchError` when an
    entry is a tensor in a form the safe reader does not rebuild (it would
    otherwise vanish silently).
    """
    sd = checkpoint
    if isinstance(sd, Mapping):
        for key in ('state_dict', 'model', 'model_ema'):
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NoStateDictError(source, 'looked for a "state_dict" or "model" entry of tensors, '
                               f'or a plain dict of tensors; found {_describe(checkpoint)}')
    unreadable = [f'{k} ({v.qualname})' for k, v in sd.items() if isinstance(v, UntrustedObject)]
    if unreadable:
        raise CheckpointMismatchError(
            f'{source}: {len(unreadable)} state-dict entr(y/ies) are stored in a form the safe '
            'reader does not rebuild (quantized, sparse, nested or custom tensors): '
            + _abbrev(unreadable))
    out: dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k[len('module.'):] if k.startswith('module.') else k] = v
    return out


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f'a dict with keys {_abbrev([str(k) for k in obj], 6)}'
    return f'a {type(obj).__name__}'


def drop_derived_buffers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove buffers that our models recompute (see :data:`DERIVED_BUFFER_SUFFIXES`)."""
    return OrderedDict((k, v) for k, v in state_dict.items()
                       if not k.endswith(DERIVED_BUFFER_SUFFIXES))


def check_checkpoint_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                          source: str, min_fraction: float = 0.5) -> None:
    """Raise :class:`CheckpointMismatchError` when (almost) none of the model's keys are found.

    A checkpoint of another family, or of a detector whose backbone prefix was
    not recognised, would otherwise "load" with every weight left random.
    """
    own = model.state_dict()
    found = [k for k in own if k in state_dict]
    if len(found) >= min_fraction * len(own):
        return
    raise CheckpointMismatchError(
        f'{source} does not look like weights of {type(model).__name__}: only {len(found)} of '
        f"the model's {len(own)} keys are in it ({len(state_dict)} keys in the checkpoint, e.g. "
        f'{_abbrev(list(state_dict), 4)}; the model expects e.g. {_abbrev(list(own), 4)}). '
        'Check that the checkpoint is of this backbone family, or pass init_cfg\'s "prefix" '
        '(e.g. prefix="backbone.") for a detector or segmenter checkpoint')


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
