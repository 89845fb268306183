"""High-resolution benchmark: attention operators, backbones and whole models.

``tools/benchmark.py`` is the command line. :mod:`.contenders` says what can be
timed, :mod:`.worker` times one case in its own process, :mod:`.memory` watches
its memory, :mod:`.runner` runs a sweep of cases, :mod:`.max_size` searches the largest
input that fits a memory limit and :mod:`.report` writes the tables, plots and JSON.
"""
from .contenders import (
    ATTENTION_CONTENDERS,
    DEFAULT_BACKBONES,
    MMDET_CONTENDERS,
    Contender,
    backbone_contenders,
    get_contender,
)
from .max_size import find_max_sizes, search_max_size
from .report import write_outputs
from .runner import SweepConfig, default_mem_limit_gib, environment, run_sweep

__all__ = [
    'ATTENTION_CONTENDERS', 'MMDET_CONTENDERS', 'DEFAULT_BACKBONES', 'Contender',
    'backbone_contenders', 'get_contender', 'SweepConfig', 'default_mem_limit_gib',
    'environment', 'run_sweep', 'write_outputs', 'find_max_sizes', 'search_max_size'
]
