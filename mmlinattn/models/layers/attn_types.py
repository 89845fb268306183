"""Parsing of the released models' attention-type strings (``IIIS``, ``IIMS2``)."""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ['parse_attn_types']

_PATTERN = re.compile(r'^([ISM]+?)(\d*)$')


def parse_attn_types(attn_types: str, depths: Sequence[int]) -> list[list[str]]:
    """Per-block attention letters (``'I'`` InLine, ``'S'`` softmax) for each stage.

    One letter per stage; ``M`` means the stage's first k blocks are InLine and
    the rest softmax, where k is the number at the end of the string
    (``'IIMS2'``: stage 3 has 2 InLine blocks).

    >>> parse_attn_types('IMS1', [2, 3, 1])
    [['I', 'I'], ['I', 'S', 'S'], ['S']]
    """
    match = _PATTERN.match(attn_types)
    if match is None:
        raise ValueError(f"attn_types {attn_types!r} must be letters I/S/M, one per stage, "
                         "optionally followed by the number of InLine blocks of 'M' stages")
    letters, count = match.groups()
    if len(letters) != len(depths):
        raise ValueError(f'attn_types {attn_types!r} names {len(letters)} stages but depths '
                         f'{list(depths)} has {len(depths)}')
    if ('M' in letters) != bool(count):
        raise ValueError(f"attn_types {attn_types!r}: 'M' needs a trailing block count and a "
                         "count needs an 'M' stage")
    result = []
    for letter, depth in zip(letters, depths):
        if letter == 'M':
            k = int(count)
            if k > depth:
                raise ValueError(f'attn_types {attn_types!r}: {k} InLine blocks in a stage of '
                                 f'{depth}')
            result.append(['I'] * k + ['S'] * (depth - k))
        else:
            result.append([letter] * depth)
    return result
