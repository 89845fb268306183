"""``class_argmax`` gives ``argmax(dim=0)``'s labels exactly, ties and NaN included."""
import pytest
import torch

from mmlinattn.ops import class_argmax


def test_equals_argmax_on_scores_full_of_ties() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(150, 24, 40, generator=g)
    assert torch.equal(class_argmax(scores), scores.argmax(dim=0))
    # Scores on a coarse grid tie often, with the first class and with later ones: the
    # first of the tied classes wins, as in argmax.
    coarse = (scores * 2).round()
    coarse[0, :4] = coarse[:, :4].amax(dim=0)
    assert torch.equal(class_argmax(coarse), coarse.argmax(dim=0))
    assert (class_argmax(coarse)[:4] == 0).all()
    # A view of an upsampled band (not contiguous), as the tiles pass it.
    band = torch.randn(1, 19, 12, 50, generator=g)[0, :, 2:10, 3:45]
    assert torch.equal(class_argmax(band), band.argmax(dim=0))


def test_nan_single_class_and_bad_shapes() -> None:
    scores = torch.randn(5, 3, 3)
    scores[3, 1, 1] = float('nan')
    assert torch.equal(class_argmax(scores), scores.argmax(dim=0))
    assert class_argmax(scores)[1, 1] == 3
    assert torch.equal(class_argmax(torch.randn(1, 4, 4)), torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r'needs a \(classes, ...\) tensor'):
        class_argmax(torch.empty(0, 3))
