"""``class_argmax`` gives ``argmax(dim=0)``'s labels exactly, ties and NaN included;
``upsampled_class_argmax`` gives those of the whole upsampled band, upsampling only the
classes that can win."""
import pytest
import torch
import torch.nn.functional as F

from mmlinattn.ops import class_argmax, upsampled_class_argmax
from mmlinattn.ops.labels import _contenders


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


def _upsampled_labels(logits: torch.Tensor, stride: int) -> torch.Tensor:
    h, w = logits.shape[2:]
    return class_argmax(F.interpolate(logits, size=(h * stride, w * stride), mode='bilinear',
                                      align_corners=False)[0])


def _fields(classes: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Smooth per-class scores, a few classes ahead of the others (as a decode head's)."""
    coarse = torch.randn(1, classes, max(1, h // 6), max(1, w // 6), generator=g) * 2
    coarse = coarse + torch.randn(1, classes, 1, 1, generator=g) * 4
    return F.interpolate(coarse, size=(h, w), mode='bilinear', align_corners=False)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('stride', [1, 2, 3, 4])
def test_upsampled_labels_equal_the_whole_bands(dtype, stride) -> None:
    g = torch.Generator().manual_seed(stride)
    cases = [_fields(150, 34, 70, g),  # a band: smooth, most classes never win
             torch.randn(1, 20, 9, 23, generator=g),  # noise: many contenders
             torch.randint(0, 3, (1, 30, 7, 29), generator=g).float(),  # ties everywhere
             _fields(12, 1, 40, g), _fields(12, 6, 1, g)]  # one row, one column
    for logits in cases:
        logits = logits.to(dtype)
        ref = _upsampled_labels(logits, stride)
        for block in (1, 3, 32):  # block borders everywhere, and a few
            assert torch.equal(upsampled_class_argmax(logits, stride, block), ref)
    # Pruning happened: the smooth band's blocks keep few of the 150 classes.
    kept = [int(_contenders(cases[0][0, :, :, a:a + 34].to(dtype)).sum()) for a in (0, 32)]
    assert max(kept) < 40


def test_upsampled_labels_with_nan_infinity_and_bad_shapes() -> None:
    logits = _fields(8, 5, 9, torch.Generator().manual_seed(0))
    logits[0, 5, 2, 3] = float('nan')
    assert torch.equal(upsampled_class_argmax(logits, 4, 2), _upsampled_labels(logits, 4))
    logits[0, 5, 2:4, 3:5] = float('inf')  # a whole window: no finite bound there
    logits[0, 2, 0, 0] = float('-inf')
    assert torch.equal(upsampled_class_argmax(logits, 4, 2), _upsampled_labels(logits, 4))
    alone = torch.zeros(1, 3, 2, 2)
    alone[0, 1] = float('inf')  # the block's only window: no finite bound at all
    assert (upsampled_class_argmax(alone, 4) == 1).all()
    with pytest.raises(ValueError, match=r'needs \(1, C, h, w\) logits'):
        upsampled_class_argmax(torch.randn(3, 5, 5), 4)
