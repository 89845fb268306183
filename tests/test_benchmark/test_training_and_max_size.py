"""Training steps and the max-size search of the benchmark, on tiny sizes (never timings)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmlinattn.benchmark import SweepConfig, run_sweep, search_max_size, write_outputs
from mmlinattn.benchmark.max_size import find_max_sizes
from mmlinattn.benchmark.worker import measure

REPO = Path(__file__).resolve().parents[2]
SPEC = dict(batch=1, device='cpu', dtype='fp32', compile=False, threads=None, warmup=1,
            repeats=1, budget_s=60, flops=True, mem_limit_gib=8)


def _fake_probe(limit_mib, mib_per_kpx2=20.0, calls=None):
    """Memory grows with the pixels, as a backbone's does: fits below ``limit_mib``."""
    def probe(size):
        mib = 100 + mib_per_kpx2 * (size / 1000)**2 * 1000
        if calls is not None:
            calls.append(size)
        ok = mib <= limit_mib
        return ok, dict(status='ok' if ok else 'oom', peak_mem_mib=mib if ok else None)
    return probe


def _largest_fitting(limit_mib, mib_per_kpx2=20.0, multiple=32):
    size = multiple
    while 100 + mib_per_kpx2 * ((size + multiple) / 1000)**2 * 1000 <= limit_mib:
        size += multiple
    return size


@pytest.mark.parametrize('limit_mib,start', [(16 * 1024, 512), (16 * 1024, 8192),
                                             (300, 512), (90, 512)])
def test_bisection_finds_the_largest_multiple_of_32(limit_mib, start):
    calls = []
    found = search_max_size(_fake_probe(limit_mib, calls=calls), start, 8192)
    if limit_mib < 100 + 20 * (32 / 1000)**2 * 1000:
        assert found['max_size'] is None and found['first_failure'] == 32
        return
    expected = _largest_fitting(limit_mib)
    assert found['max_size'] == expected and found['first_failure'] == expected + 32
    assert not found['capped'] and len(calls) <= 12  # doubling, then bisection
    assert [p['size'] for p in found['probes']] == calls
    assert all(p['size'] % 32 == 0 for p in found['probes'])


def test_bisection_stops_at_its_limit():
    found = search_max_size(_fake_probe(10**9), 512, 4010)  # 4010: not a multiple of 32
    assert found['max_size'] == 4000 and found['capped'] and found['first_failure'] is None


def test_coarser_search_steps():
    found = search_max_size(_fake_probe(100_000), 1024, 8192, multiple=1024)
    assert found['max_size'] % 1024 == 0
    assert found['first_failure'] == found['max_size'] + 1024
    assert found['max_size'] == 2048 <= _largest_fitting(100_000) < found['first_failure']
    with pytest.raises(ValueError, match='multiple of 32'):
        find_max_sizes(SweepConfig(level='backbone', contenders=('inline-pvt-t', ), sizes=()),
                       multiple=100)


def test_a_training_step_is_forward_backward_and_optimizer_step():
    import torch

    result = measure(dict(SPEC, level='backbone', contender='inline-pvt-t', size=64,
                          mode='train'))
    assert result['status'] == 'ok', result
    assert result['latency_ms'] > 0 and result['peak_mem_mib'] > 0 and 'gflops' not in result
    # The step trains: AdamW moved the weights (checked in-process on the same builder).
    from mmlinattn.benchmark.worker import _prepare
    step, _, module = _prepare(dict(SPEC, level='backbone', contender='inline-pvt-t', size=64,
                                    mode='train'))
    before = module.patch_embed1.proj.weight.detach().clone()
    step()
    assert not torch.equal(before, module.patch_embed1.proj.weight)
    assert all(p.grad is None for p in module.parameters())  # zeroed for the next step


def test_with_cp_is_asked_of_each_contender_and_refused_where_missing(tmp_path):
    cfg = SweepConfig(level='backbone', contenders=['inline-pvt-t', 'pvt-t (mmdet)'], sizes=[64],
                      repeats=1, budget_s=60, flops=False, mode='train', with_cp='both')
    results = run_sweep(cfg)
    by = {c['contender']: c for c in results}
    assert set(by) == {'inline-pvt-t', 'inline-pvt-t +cp', 'pvt-t (mmdet)', 'pvt-t (mmdet) +cp'}
    assert by['inline-pvt-t +cp']['status'] == 'ok' and by['inline-pvt-t +cp']['with_cp']
    assert by['pvt-t (mmdet) +cp']['status'] in ('unavailable', )
    assert 'no activation checkpointing' in by['pvt-t (mmdet) +cp']['error']
    write_outputs([(cfg, results)], str(tmp_path))
    md = (tmp_path / 'results.md').read_text()
    assert 'backbone level, training' in md and '**Training step (forward, backward' in md
    assert '| inline-pvt-t +cp |' in md


def test_model_level_training_step_of_a_shipped_config():
    pytest.importorskip('mmseg.models', reason='mmseg is needed for the model level')
    config = REPO / 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'
    result = measure(dict(SPEC, level='model', size=64, mode='train', contender=str(config)))
    assert result['status'] == 'ok', result
    assert result['params_m'] > 10


def test_cli_find_max_size_writes_its_table(tmp_path):
    """A real search, with a limit so small that nothing fits: every probe runs in a
    worker and is refused as oom, and the table says so."""
    out = tmp_path / 'max'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--level', 'attention',
         '--contenders', 'inline', '--find-max-size', '--mode', 'infer', '--mem-limit', '0.05',
         '--max-size-range', '64', '128', '--out-dir', str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / 'results.json').read_text())
    (entry, ) = doc['max_sizes']['results']
    assert entry['max_size'] is None and entry['first_failure'] == 32
    assert [p['size'] for p in entry['probes']] == [64, 32]
    assert all(p['status'] == 'oom' for p in entry['probes'])
    md = (out / 'results.md').read_text()
    assert '**Largest square input (px) within 0.05 GiB' in md and '| inline | < 32 |' in md
