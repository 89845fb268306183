"""Token-chunked inference equals the ordinary forward, and holds less memory.

Odd map sizes and tiny bands (one row) put band edges, halo rows, padding and
window rows everywhere; every family with global InLine stages, and the
windowed variants, are compared with the same model's ordinary forward.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlinattn.benchmark.memory import MemoryWatch
from mmlinattn.models.backbones import (
    AgentDeiT,
    AgentPVT,
    AgentSwin,
    FLattenPVT,
    FLattenSwin,
    InLineCSwin,
    InLineDeiT,
    InLinePVT,
    InLineSwin,
)
from mmlinattn.models.backbones.base import chunked_inference
from mmlinattn.models.layers import chunked_block, conv2d_rows, conv_out_rows, fill_rows
from mmlinattn.models.layers.chunked import RowsBeforeWrite
from mmlinattn.ops import InLineSums, inline_attention, inline_readout
from mmlinattn.registry import MODELS
from mmlinattn.utils.spill import spill_maps

CASES = {
    'pvt': (InLinePVT, dict(arch='tiny', depths=(1, 2, 1, 1))),
    'pvt-window5': (InLinePVT, dict(arch='tiny', depths=(1, 1, 1, 1), inline_window=5)),
    'swin': (InLineSwin, dict(depths=(1, 2, 1, 2))),
    'swin-window6': (InLineSwin, dict(depths=(1, 1, 1, 2), inline_window=6)),
    'cswin': (InLineCSwin, dict(depths=(1, 1, 2, 1))),
    'cswin-window4': (InLineCSwin, dict(depths=(1, 1, 1, 1), inline_window=4)),
    'deit': (InLineDeiT, dict(arch='tiny', out_indices=(0, 1, 2, 3))),
    'deit-kernel-relu': (InLineDeiT, dict(arch='tiny', out_indices=(0, 1, 2, 3),
                                          kernel='relu')),
    # Focused linear attention in two passes (its positional encoding resized row by
    # row, a 2-row halo); agent attention in three (pooled agents, the online softmax
    # over keys, the queries), with grids that do not divide the maps.
    'flatten-swin': (FLattenSwin, dict(depths=(1, 2, 1, 2))),
    'flatten-pvt': (FLattenPVT, dict(arch='tiny', depths=(1, 2, 1, 1))),
    'agent-swin': (AgentSwin, dict(depths=(1, 1, 1, 2),
                                   agent_shapes=[(4, 5), (3, 3), (4, 4), None])),
    'agent-pvt': (AgentPVT, dict(arch='tiny', depths=(1, 2, 1, 1))),
    # Agent attention with a class token: a key of every agent, added to the online
    # softmax with the first band, and its own readout after the passes.
    'agent-deit': (AgentDeiT, dict(arch='tiny', out_indices=(0, 1, 2, 3), agent_shape=(3, 4))),
}


def _eval(name: str) -> nn.Module:
    torch.manual_seed(0)
    cls, kwargs = CASES[name]
    model = cls(**kwargs)
    if cls in (InLineDeiT, AgentDeiT):
        model.blocks = model.blocks[:4]  # four blocks are enough, and fast
        model.num_stages = 4
    return model.eval()


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('chunk_tokens', [1, 13, 150])
def test_chunked_equals_ordinary(name: str, chunk_tokens: int) -> None:
    model = _eval(name)
    x = torch.randn(2, 3, 75, 93)  # stage maps 19x24, 10x12, 5x6, 3x3: odd and uneven
    with torch.no_grad():
        expected = model(x)
        with chunked_inference(model, chunk_tokens):
            got = model(x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def _first_block(model: nn.Module) -> nn.Module:
    for name in ('block1', 'stage1'):
        if hasattr(model, name):
            return getattr(model, name)[0]
    return model.layers[0].blocks[0]


@pytest.mark.parametrize('name', ['pvt', 'pvt-window5', 'swin-window6', 'cswin',
                                  'flatten-pvt', 'agent-pvt', 'agent-swin'])
@pytest.mark.parametrize('chunk_tokens', [1, 13, 50])
def test_block_written_over_its_input_gives_the_same_values(name: str,
                                                           chunk_tokens: int) -> None:
    # In place, a band's halo rows above it come from the copies kept before the band
    # above overwrote them (FLatten's 2-row halo over 1-row bands reaches two bands up).
    model = _eval(name)
    block = _first_block(model)
    torch.manual_seed(1)
    x = torch.randn(2, 19, 24, block.norm1.normalized_shape[0])
    with torch.no_grad():
        expected = chunked_block(block, x, chunk_tokens)
        mine = x.clone()
        got = chunked_block(block, mine, chunk_tokens, inplace=True)
    assert got.data_ptr() == mine.data_ptr()  # one map: the output took the input's place
    assert torch.equal(got, expected)
    assert not torch.equal(x, expected)


def test_rows_before_write_keeps_the_rows_a_band_still_reads() -> None:
    grid = torch.arange(10.).view(1, 10, 1, 1).clone()
    rows = RowsBeforeWrite(grid, halo=3)
    rows.write(0, 1, -grid[:, 0:1])
    rows.write(1, 2, -grid[:, 1:2])
    assert rows.read(0, 5).flatten().tolist() == [0, 1, 2, 3, 4]
    rows.write(2, 6, torch.full((1, 4, 1, 1), -1.))
    assert rows.read(3, 7).flatten().tolist() == [3, 4, 5, 6]
    with pytest.raises(RuntimeError, match='overwritten'):
        rows.read(2, 7)
    with pytest.raises(RuntimeError, match='in order'):
        rows.write(7, 8, grid[:, 7:8])


def test_a_stage_of_blocks_spills_one_map(tmp_path) -> None:
    # Each stage of InLine blocks spills its embedding's map (which the blocks then
    # overwrite in turn) and its NCHW output: not one more map per block.
    model = InLinePVT(arch='tiny', depths=(2, 2, 2, 2)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = model(x)
        with chunked_inference(model, 64), spill_maps(str(tmp_path), min_bytes=1) as store:
            got = model(x)
            maps = store.spilled_bytes
    stages = sum(2 * o.numel() * 4 for o in expected)
    assert maps == stages
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_chunked_path_runs_and_is_not_the_ordinary_one() -> None:
    # The bands really are used: a block's pieces see band-sized inputs.
    model = _eval('pvt')
    seen = []
    model.block1[0].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad(), chunked_inference(model, 24):
        model(torch.randn(1, 3, 75, 93))
    assert seen and max(seen) == 24  # one 24-token row of the 19x24 map at a time


@pytest.mark.parametrize('name', ['flatten-pvt', 'agent-pvt'])
def test_sibling_attentions_run_in_bands(name: str) -> None:
    model = _eval(name)
    seen = []
    model.block1[0].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1:3]))
    with torch.no_grad(), chunked_inference(model, 24):
        model(torch.randn(1, 3, 75, 93))
    assert seen and max(s[0] for s in seen) == 1  # one row of the 19x24 map at a time


def test_agent_deit_runs_in_bands_with_its_class_token() -> None:
    model = _eval('agent-deit')
    seen = []
    model.blocks[1].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad(), chunked_inference(model, 6):
        model(torch.randn(1, 3, 75, 93))  # a 5x6 patch grid
    # The class token alone, then the grid one 6-token row at a time.
    assert seen == [(1, 1, 192)] + [(1, 1, 6, 192)] * 5


def test_chunking_only_for_inference() -> None:
    model = _eval('pvt')
    model.chunk_tokens = 7
    x = torch.randn(1, 3, 64, 64)
    out = model(x)  # autograd on: the ordinary forward, so gradients flow
    assert out[0].requires_grad and not model.chunking
    model.train()
    with torch.no_grad():
        assert not model.chunking
    model.eval()
    with torch.no_grad():
        assert model.chunking


def test_chunk_tokens_from_config_and_context_restores() -> None:
    model = MODELS.build(dict(type='mmlinattn.InLinePVT', arch='tiny', depths=(1, 1, 1, 1),
                              chunk_tokens=4096))
    assert model.chunk_tokens == 4096
    assert MODELS.build(dict(type='mmlinattn.InLinePVT', depths=(1, 1, 1, 1),
                             chunk_tokens=True)).chunk_tokens == 65536
    with chunked_inference(model, None):
        assert model.chunk_tokens is None
    assert model.chunk_tokens == 4096
    for bad in (0, -5, 2.5, 'many'):
        with pytest.raises(ValueError, match='chunk_tokens'):
            InLinePVT(depths=(1, 1, 1, 1), chunk_tokens=bad)
    with pytest.raises(ValueError, match='no InLine backbone'), \
            chunked_inference(nn.Linear(2, 2)):
        pass


def test_chunked_forward_holds_less_memory() -> None:
    model = InLinePVT(arch='tiny', depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 768, 768)
    peaks = {}
    for chunk in (None, 4096):
        model.chunk_tokens = chunk
        model(x[:, :, :64, :64])  # warm up allocations outside the measurement
        with torch.no_grad(), MemoryWatch(interval_s=0.001) as watch:
            out = model(x)
        del out
        peaks[chunk] = watch.peak - watch.start
    # Ordinary: the MLP's 8x hidden map of stage 1 (9 MiB x 8; its GELU is applied inside
    # fc1's product, so one such map, not two) dominates; chunked: the maps themselves
    # plus one band (measured 116 and 72 MB).
    assert peaks[4096] < 0.7 * peaks[None], peaks


@pytest.mark.parametrize('kernel,stride,padding', [(7, 4, 2), (3, 2, 1), (4, 4, 0)])
def test_conv2d_rows_equals_conv(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride, padding)
    x = torch.randn(2, 3, 37, 29)
    expected = conv(x)
    height = conv_out_rows(conv, x.shape[2])
    assert height == expected.shape[2]
    for rows in (1, 2, 5):
        got = fill_rows(height, rows, lambda r0, r1: conv2d_rows(conv, x, r0, r1), dim=2)
        torch.testing.assert_close(got, expected)


def test_inline_sums_over_chunks_equal_one_call() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 50) > 0.3
    sums = InLineSums()
    for start in range(0, 50, 7):
        sums.add(k[:, :, start:start + 7], v[:, :, start:start + 7], mask[:, start:start + 7])
    cov, vbar = sums.readout(8 ** -0.5)
    torch.testing.assert_close(inline_readout(q, cov, vbar), inline_attention(q, k, v, mask))
