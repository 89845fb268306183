"""Parsing of the released models' per-stage attention strings (``IIIS``, ``IIMS2``,
``AAMB2``, ``LLSS``)."""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ['parse_attn_types']


def parse_attn_types(attn_types: str, depths: Sequence[int], letters: str = 'IS'
                     ) -> list[list[str]]:
    """Per-block attention letters for each stage.

    One letter per stage, from ``letters`` (the linear attention's letter first, the
    softmax one second: ``'IS'`` InLine, ``'AB'`` Agent, ``'LS'`` FLatten) or ``M``:
    the stage's first k blocks take the first letter and the rest the second, where
    k is the number at the end of the string (``'IIMS2'``: stage 3 has 2 InLine blocks).

    >>> parse_attn_types('IMS1', [2, 3, 1])
    [['I', 'I'], ['I', 'S', 'S'], ['S']]
    >>> parse_attn_types('AAMB2', [1, 1, 3, 1], letters='AB')
    [['A'], ['A'], ['A', 'A', 'B'], ['B']]
    """
    if len(letters) != 2 or 'M' in letters:
        raise ValueError(f"letters must be two letters other than 'M', got {letters!r}")
    match = re.match(rf'^([{letters}M]+?)(\d*)$', attn_types)
    if match is None:
        raise ValueError(f"attn_types {attn_types!r} must be letters {'/'.join(letters)}/M, one "
                         f"per stage, optionally followed by the number of {letters[0]} blocks "
                         "of 'M' stages")
    stages, count = match.groups()
    if len(stages) != len(depths):
        raise ValueError(f'attn_types {attn_types!r} names {len(stages)} stages but depths '
                         f'{list(depths)} has {len(depths)}')
    if ('M' in stages) != bool(count):
        raise ValueError(f"attn_types {attn_types!r}: 'M' needs a trailing block count and a "
                         "count needs an 'M' stage")
    result = []
    for letter, depth in zip(stages, depths):
        if letter == 'M':
            k = int(count)
            if k > depth:
                raise ValueError(f'attn_types {attn_types!r}: {k} {letters[0]} blocks in a '
                                 f'stage of {depth}')
            result.append([letters[0]] * k + [letters[1]] * (depth - k))
        else:
            result.append([letter] * depth)
    return result
