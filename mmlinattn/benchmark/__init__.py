"""High-resolution benchmark: attention operators, backbones and whole models.

``tools/benchmark.py`` is the command line; :func:`run_sweep` and
:func:`write_outputs` are the library behind it.
"""
from .contenders import (
    ATTENTION_CONTENDERS,
    BACKBONE_CONTENDERS,
    DEFAULT_BACKBONES,
    Contender,
    get_contender,
)
from .runner import SweepConfig, default_mem_limit_gib, environment, run_sweep, write_outputs

__all__ = [
    'ATTENTION_CONTENDERS', 'BACKBONE_CONTENDERS', 'DEFAULT_BACKBONES', 'Contender',
    'get_contender', 'SweepConfig', 'default_mem_limit_gib', 'environment', 'run_sweep',
    'write_outputs'
]
