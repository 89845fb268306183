"""The benchmark tool's behaviour on tiny sizes (never its timings)."""
import json
import subprocess
import sys
from pathlib import Path

from mmlinattn.benchmark import SweepConfig, run_sweep, write_outputs

REPO = Path(__file__).resolve().parents[2]
CASE_KEYS = {'level', 'contender', 'size', 'status', 'description'}
OK_KEYS = {'latency_ms', 'iqr_ms', 'p25_ms', 'p75_ms', 'repeats', 'throughput_ips',
           'peak_mem_mib', 'mem_source', 'wall_s'}


def test_cli_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--level', 'attention', 'backbone',
         '--contenders', 'inline', 'softmax', 'inline-pvt-t', '--sizes', '16', '32',
         '--repeats', '2', '--budget', '20', '--out-dir', str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / 'results.json').read_text())
    assert {'torch', 'cpu', 'cpu_count', 'mmlinattn'} <= set(doc['environment'])
    levels = [run['config']['level'] for run in doc['runs']]
    assert levels == ['attention', 'backbone']
    for run in doc['runs']:
        assert len(run['results']) == len(run['config']['contenders']) * 2
        for case in run['results']:
            assert set(case) >= CASE_KEYS
            assert case['status'] == 'ok', case
            assert set(case) >= OK_KEYS
            assert case['gflops'] > 0
        assert run['results'][1]['growth'] > 0 and run['results'][1]['pixel_growth'] == 4
        for plot in run['plots']:
            assert (out / plot).stat().st_size > 1000
    assert set(doc['runs'][0]['plots']) == {'attention_latency.png', 'attention_memory.png'}
    md = (out / 'results.md').read_text()
    assert '**Latency, ms' in md and '| inline |' in md and 'inline / softmax' in md
    assert '**GFLOPs' in md and 'heap in use' in md
    # The machine's ceiling, measured in the same run, and every case against it.
    assert doc['ceiling']['fp32_gflops'] > 0 and doc['ceiling']['bf16_gflops'] > 0
    assert "This machine's ceiling" in md and '**Achieved GFLOP/s' in md
    assert 'results:' in proc.stdout


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = SweepConfig(level='attention', contenders=['inline', 'linear'], sizes=[8, 16],
                      repeats=1, budget_s=20, mem_limit_gib=0.05, flops=False)
    results = run_sweep(cfg)
    assert [c['status'] for c in results] == ['oom', 'skipped', 'oom', 'skipped']
    assert results[0]['limit_gib'] == 0.05 and 'GiB limit' in results[0]['error']
    assert results[1]['error'] == 'oom at size 8'
    doc = write_outputs([(cfg, results)], str(tmp_path))
    assert doc['runs'][0]['plots'] == []  # nothing ran: no empty plots
    md = (tmp_path / 'results.md').read_text()
    assert 'oom' in md
    assert '**GFLOPs' not in md  # flops=False: no table of blanks


def test_time_out_is_recorded_with_the_limit():
    cfg = SweepConfig(level='backbone', contenders=['inline-pvt-t'], sizes=[32, 64], repeats=1,
                      budget_s=0.0, startup_grace_s=0.5, flops=False)
    results = run_sweep(cfg)
    assert results[0]['status'] == 'timeout' and results[0]['limit_s'] == 0.5
    assert results[1]['status'] == 'skipped'


def test_worker_reports_errors_as_results():
    from mmlinattn.benchmark.worker import measure

    spec = dict(level='attention', contender='inline', size=8, batch=1, device='cuda',
                dtype='fp32', compile=False, threads=None, warmup=1, repeats=1, budget_s=5)
    import torch
    if not torch.cuda.is_available():
        assert measure(spec)['status'] == 'error'


def test_model_level_times_a_whole_segmenter_from_its_config():
    import pytest
    pytest.importorskip('mmseg.models', reason='mmseg is needed for the model level')
    cfg = SweepConfig(level='model', sizes=[64], repeats=2, budget_s=30,
                      contenders=[str(REPO / 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py')])
    (case, ) = run_sweep(cfg)
    assert case['status'] == 'ok', case
    assert case['contender'] == 'fpn_inline-pvt-t_300i_tiny-ade20k'
    assert case['latency_ms'] > 0 and case['gflops'] > 0 and case['params_m'] > 10


def test_compiled_operator_is_timed_after_its_compile():
    """--compile: the first warm-up call compiles, so one more warm-up call decides the
    repeats; compiling must not eat the timing budget."""
    from mmlinattn.benchmark.worker import measure

    spec = dict(level='attention', contender='inline', size=8, batch=1, device='cpu',
                dtype='fp32', compile=True, threads=None, warmup=1, repeats=3, budget_s=300,
                flops=False)
    result = measure(spec)
    assert result['status'] == 'ok', result
    assert len(result['warmup_ms']) == 2 and result['repeats'] == 3
    assert result['warmup_ms'][0] > result['warmup_ms'][1]  # the compile


def test_authors_models_come_from_a_checkout_named_by_the_environment(tmp_path, monkeypatch):
    import pytest
    import torch

    from mmlinattn.benchmark.contenders import REFERENCE_ENV, backbone_contenders

    contender = backbone_contenders()['inline-pvt-s (authors)']
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=REFERENCE_ENV):
        contender.build(img_size=64)
    # A stand-in checkout: the builder imports models/inline_pvt.py and calls the entry point
    # with the released build's options, at the input size.
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / 'inline_pvt.py').write_text(
        'import torch\n'
        'class Model(torch.nn.Module):\n'
        '    def __init__(self, **kw):\n'
        '        super().__init__()\n'
        '        self.kw = kw\n'
        '    def forward_features(self, x):\n'
        '        return x.mean()\n'
        'def inline_pvt_small(**kw):\n'
        '    return Model(**kw)\n')
    monkeypatch.setenv(REFERENCE_ENV, str(tmp_path))
    module = contender.build(img_size=96)
    assert module.model.kw == dict(img_size=96, attn_type='IIII', la_sr_ratios='1111')
    assert module(torch.ones(1, 3, 4, 4)) == 1


def test_onnxruntime_contender_times_the_exported_backbone():
    """The exported graph runs in ONNX Runtime in the same isolated worker, with the eager
    backbone's FLOPs (it computes the same operators)."""
    cfg = SweepConfig(level='backbone', contenders=['inline-pvt-t', 'inline-pvt-t (onnxruntime)'],
                      sizes=[64], repeats=2, budget_s=30)
    eager, exported = run_sweep(cfg)
    assert eager['status'] == 'ok' and exported['status'] == 'ok', exported
    assert exported['latency_ms'] > 0 and exported['peak_mem_mib'] > 0
    assert exported['gflops'] == eager['gflops']
    assert 'ONNX Runtime' in exported['description']


def test_two_dtypes_in_one_run_give_a_sweep_each_and_their_time_ratios(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--level', 'attention',
         '--contenders', 'inline', 'softmax', '--sizes', '16', '--repeats', '1',
         '--budget', '20', '--dtype', 'fp32', 'bf16', '--force-bf16', '--no-ceiling',
         '--no-plots', '--out-dir', str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / 'results.json').read_text())
    assert [run['config']['dtype'] for run in doc['runs']] == ['fp32', 'bf16']
    times = {(run['config']['dtype'], c['contender']): c['latency_ms']
             for run in doc['runs'] for c in run['results']}
    md = (out / 'results.md').read_text()
    assert '**bf16 / fp32 time, attention inference (same run)**' in md
    for name in ('inline', 'softmax'):
        ratio = times['bf16', name] / times['fp32', name]
        assert f'| {name} | {ratio:.2f}x |' in md
