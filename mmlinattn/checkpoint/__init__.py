"""Checkpoint handling: safe reading, state-dict extraction and adaptation, clear errors.

Two kinds of files reach us:

* Released InLine checkpoints and other downloads (untrusted). :func:`safe_load`
  reads them with mmlinattn's own reader (:mod:`.reader`): no code in a file runs,
  TorchScript archives are refused, declared sizes are checked against the file,
  and every pickled type other than tensors and plain containers becomes an inert
  :class:`UntrustedObject` (the released files pickle a yacs ``CfgNode``).
* Checkpoints written by mmengine's Runner during our own training
  (:mod:`.runner`): read by the same reader trusting the runner's own types.

* safetensors files (:mod:`.safetensors_io`): no pickle at all; the header is
  checked, then the tensors are memory-mapped. ``safe_load`` and the runner's
  loader read them by name or by their header; the converter writes them.

Errors: :class:`CheckpointFormatError` (not a readable checkpoint, pickled or
safetensors), :class:`UnsafeCheckpointError` (carries code),
:class:`NoStateDictError` (readable, but no tensors to load),
:class:`WeightsOnlyError` (a safetensors file where ``resume`` needs a runner
checkpoint), :class:`CheckpointMismatchError` (does not fit the model); all are
:class:`CheckpointError`, each naming the file.
"""
from .adapt import adapt_position_tables
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    NoStateDictError,
    UnsafeCheckpointError,
    WeightsOnlyError,
)
from .reader import read_checkpoint, relocate, safe_load
from .runner import (
    allow_runner_checkpoint_types,
    load_runner_checkpoint,
    use_safe_checkpoint_loader,
)
from .safetensors_io import (
    is_safetensors,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)
from .state_dict import (
    DERIVED_BUFFER_SUFFIXES,
    check_checkpoint_fits,
    drop_derived_buffers,
    extract_state_dict,
    load_state_dict_checked,
)
from .unpickler import UntrustedObject

__all__ = [
    'UntrustedObject', 'CheckpointError', 'CheckpointFormatError', 'UnsafeCheckpointError',
    'CheckpointMismatchError', 'read_checkpoint', 'safe_load', 'relocate', 'extract_state_dict',
    'load_state_dict_checked', 'check_checkpoint_fits', 'allow_runner_checkpoint_types',
    'load_runner_checkpoint', 'use_safe_checkpoint_loader', 'adapt_position_tables',
    'DERIVED_BUFFER_SUFFIXES', 'drop_derived_buffers', 'NoStateDictError', 'WeightsOnlyError',
    'is_safetensors', 'read_safetensors', 'read_safetensors_metadata', 'write_safetensors'
]
