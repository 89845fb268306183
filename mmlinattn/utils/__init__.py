"""Helpers shared by the tools: operator-level FLOP counting."""
from .flops import count_flops, sdpa_flops

__all__ = ['count_flops', 'sdpa_flops']
