"""fast_cpu_heads: channels-last convolutions and oneDNN Linear layers for mmdet/mmseg
heads, inside a block only, with the values of the default kernels."""
from __future__ import annotations

import torch
from torch import nn

from mmlinattn.engine import head_kernels
from mmlinattn.engine.head_kernels import fast_cpu_heads
from mmlinattn.ops.dense import onednn_available


def _head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 7, 5)).eval()


def _float64(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = _head().double()
    ref.load_state_dict(head.state_dict())
    with torch.no_grad():
        return ref(x.double())


def test_values_match_the_default_kernels_and_float64() -> None:
    head = _head()
    x = torch.randn(3, 16, 6, 7)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    with torch.no_grad():
        plain = head(x)
        with fast_cpu_heads(head, None, head) as changed:  # a module given twice counts once
            assert changed == 3
            assert head[0].weight.is_contiguous(memory_format=torch.channels_last)
            assert not head[0].weight.is_contiguous()
            fast = head(x)
    exact = _float64(head, x)
    scale = exact.abs().max()
    assert (fast.double() - exact).abs().max() <= 2e-6 * scale
    assert (plain.double() - exact).abs().max() <= 2e-6 * scale
    # Restored: the same layout and values, nothing left on the modules.
    assert head[0].weight.is_contiguous()
    assert 'forward' not in head[5].__dict__
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]) and v.is_contiguous(), k


def test_linear_layers_run_through_onednn() -> None:
    if not onednn_available():
        return
    head = _head()
    x = torch.randn(2, 16, 6, 7)

    def products(fn) -> int:
        with torch.profiler.profile() as prof, torch.no_grad():
            fn()
        return sum(e.count for e in prof.key_averages() if '_linear_pointwise' in e.key)
    with fast_cpu_heads(head):
        assert products(lambda: head(x)) == 1
    assert products(lambda: head(x)) == 0


def test_restored_when_the_block_raises() -> None:
    head = _head()
    try:
        with fast_cpu_heads(head):
            raise KeyError('inside')
    except KeyError:
        pass
    assert head[0].weight.is_contiguous() and 'forward' not in head[5].__dict__


def test_nothing_changes_while_exporting(monkeypatch) -> None:
    monkeypatch.setattr(head_kernels, 'exporting', lambda: True)
    head = _head()
    with fast_cpu_heads(head) as changed:
        assert changed == 0 and head[0].weight.is_contiguous()
        assert 'forward' not in head[5].__dict__
