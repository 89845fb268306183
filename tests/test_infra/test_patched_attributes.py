"""patched_attributes: what an instance held itself comes back, whatever happens."""
from __future__ import annotations

import pytest

from mmlinattn.utils.attributes import patched_attributes


class Layer:
    def forward(self) -> str:
        return 'class'


def test_a_method_is_shadowed_then_the_class_one_shows_again() -> None:
    layer = Layer()
    with patched_attributes([(layer, 'forward', lambda: 'patched')]) as n:
        assert n == 1 and layer.forward() == 'patched'
    assert layer.forward() == 'class' and 'forward' not in vars(layer)


def test_an_own_attribute_and_nested_patches_come_back_in_order() -> None:
    layer = Layer()
    layer.forward = lambda: 'own'
    with patched_attributes([(layer, 'forward', lambda: 'outer')]):
        with patched_attributes([(layer, 'forward', lambda: 'inner')]):
            assert layer.forward() == 'inner'
        assert layer.forward() == 'outer'
    assert layer.forward() == 'own'


def test_restored_when_the_block_raises_or_a_patch_fails() -> None:
    layer, other = Layer(), Layer()
    with pytest.raises(RuntimeError, match='boom'), \
            patched_attributes([(layer, 'forward', lambda: 'patched')]):
        raise RuntimeError('boom')
    assert 'forward' not in vars(layer)

    def patches():
        yield layer, 'forward', lambda: 'patched'
        raise ValueError('no value for the second')
        yield other, 'forward', None  # pragma: no cover

    with pytest.raises(ValueError, match='second'), patched_attributes(patches()):
        pass  # pragma: no cover
    assert 'forward' not in vars(layer) and layer.forward() == 'class'
