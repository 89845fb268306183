"""Helpers shared by the tools: operator-level FLOP counting, autograd's saved bytes."""
from .flops import count_flops, sdpa_flops
from .saved_tensors import SavedTensors, record_saved_tensors

__all__ = ['count_flops', 'sdpa_flops', 'SavedTensors', 'record_saved_tensors']
