"""The errors of checkpoint handling; each names the file it is about."""
from __future__ import annotations

__all__ = [
    'CheckpointError', 'CheckpointFormatError', 'UnsafeCheckpointError', 'CheckpointMismatchError',
    'NoStateDictError', 'WeightsOnlyError'
]


class CheckpointError(RuntimeError):
    """Base of every checkpoint error of mmlinattn: catch this one to catch them all."""


class CheckpointFormatError(CheckpointError):
    """A file that cannot be read as a torch checkpoint: empty, truncated, corrupt,
    another format, or declaring more data than it holds."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f'{path}: not a readable torch checkpoint: {problem}')
        self.path = path
        self.problem = problem


class UnsafeCheckpointError(CheckpointError):
    """A file that carries code (a TorchScript archive); refused before anything is parsed."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f'{path}: refused: {problem}')
        self.path = path
        self.problem = problem


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose tensors do not fit the model."""


class NoStateDictError(CheckpointError, ValueError):
    """A readable file that holds no state dict (no ``state_dict``/``model`` entry of
    tensors, nor a plain dict of tensors). Also a ``ValueError``, as it was before."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f'{path}: holds no state dict: {problem}')
        self.path = path
        self.problem = problem


class WeightsOnlyError(CheckpointError):
    """A weights-only file (safetensors) where a runner checkpoint is needed (``resume``:
    the optimizer, scheduler and iteration are not in it)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f'{path}: {problem}')
        self.path = path
        self.problem = problem
