"""Helpers shared by the tools: FLOP counting, autograd's saved bytes, CPU features."""
from .cpu import EMULATED_BF16_NOTE, cpu_has_native_bf16
from .flops import count_flops, sdpa_flops
from .saved_tensors import SavedTensors, record_saved_tensors

__all__ = ['count_flops', 'sdpa_flops', 'SavedTensors', 'record_saved_tensors',
           'cpu_has_native_bf16', 'EMULATED_BF16_NOTE']
