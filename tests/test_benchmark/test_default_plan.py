"""The default run's plan and its verdict.

The plan: a contender too slow for warm-up plus a timed call at the largest size runs
one timed call (its own warm-up) instead of being skipped, while that call fits twice
the budget. Checked with a fake slow contender (the worker replaced by a cost model).
The verdict: computed from the results, so changing a result changes it.
"""
from __future__ import annotations

import copy

import pytest

from mmlinattn.benchmark import runner
from mmlinattn.benchmark.report import verdict, write_outputs

PAIRS = [('inline-pvt-s', 'pvt-s (mmdet)'), ('inline-swin-t', 'swin-t (mmdet)')]


def _fake_worker(seconds_at_512: dict[str, float], exponent: dict[str, float], specs: list):
    """A worker whose call takes ``seconds_at_512 * (size / 512) ** exponent`` s."""
    def run_case(spec, mem_limit_gib, timeout_s, steady_malloc):
        specs.append(spec)
        t = seconds_at_512[spec['contender']] * (spec['size'] / 512) ** exponent[
            spec['contender']]
        if t > timeout_s:
            return dict(status='timeout', error=f'{t:.0f} s > {timeout_s:.0f} s')
        warm = [t * 1.02]
        return dict(status='ok', latency_ms=t * 1e3, iqr_ms=0.0, repeats=1 if spec.get(
            'single_call') else 3, warmup_ms=[w * 1e3 for w in warm], peak_mem_mib=100 *
            (spec['size'] / 512) ** exponent[spec['contender']],
            single_call=bool(spec.get('single_call')))
    return run_case


def test_default_plan_runs_a_slow_contender_once_at_the_largest_size(monkeypatch) -> None:
    specs: list = []
    # pvt-s (mmdet)-like: 0.25 s at 512 px, quadratic attention (x16 per 2x side); the
    # 2048 px call is predicted at 4 s * 16 = 64 s... too slow; 0.11 s gives ~28 s.
    monkeypatch.setattr(runner, 'run_case', _fake_worker(
        {'inline-pvt-s': 0.05, 'pvt-s (mmdet)': 0.11}, {'inline-pvt-s': 2.0,
                                                         'pvt-s (mmdet)': 4.0}, specs))
    cfg = runner.SweepConfig(level='backbone', contenders=['inline-pvt-s', 'pvt-s (mmdet)'],
                             sizes=[512, 1024, 2048], budget_s=30.0)
    results = runner.run_sweep(cfg)
    assert [c['status'] for c in results] == ['ok'] * 6
    slow = next(c for c in results if c['contender'] == 'pvt-s (mmdet)' and c['size'] == 2048)
    assert slow['latency_ms'] == pytest.approx(0.11 * 256e3)
    assert 'one timed call, its own warm-up' in slow['note'] and '1.02x the median' in \
        slow['note']
    single = [s for s in specs if s.get('single_call')]
    assert [(s['contender'], s['size']) for s in single] == [('pvt-s (mmdet)', 2048)]


def test_a_call_beyond_twice_the_budget_is_still_over_budget(monkeypatch) -> None:
    monkeypatch.setattr(runner, 'run_case', _fake_worker({'pvt-s (mmdet)': 0.3},
                                                         {'pvt-s (mmdet)': 4.0}, []))
    cfg = runner.SweepConfig(level='backbone', contenders=['pvt-s (mmdet)'],
                             sizes=[512, 1024, 2048], budget_s=30.0)
    results = runner.run_sweep(cfg)
    assert [c['status'] for c in results] == ['ok', 'ok', 'over budget']
    assert '2x the 30 s budget' in results[-1]['error']


def _results() -> list[dict]:
    rows = []
    for name, lat, mem in (('inline-pvt-s', (100, 400, 1700), (200, 500, 1500)),
                           ('pvt-s (mmdet)', (150, 1500, 20000), (300, 1500, 9000)),
                           ('inline-swin-t', (120, 480, 2000), (250, 700, 2100)),
                           ('swin-t (mmdet)', (110, 470, 2100), (260, 800, 2600))):
        for i, size in enumerate((512, 1024, 2048)):
            c = dict(level='backbone', contender=name, size=size, status='ok',
                     latency_ms=float(lat[i]), peak_mem_mib=float(mem[i]), iqr_ms=1.0,
                     throughput_ips=1e3 / lat[i], repeats=3)
            if i:
                c.update(growth=lat[i] / lat[i - 1], pixel_growth=4.0)
            rows.append(c)
    return rows


def test_verdict_is_computed_from_the_results(tmp_path) -> None:
    results = _results()
    text = verdict(results, PAIRS)
    assert text.startswith('At 2048 px, the largest size where every contender ran')
    assert 'inline-pvt-s took 1.70 s against 20.00 s for pvt-s (mmdet) (11.8x faster)' in text
    assert '(6.0x less)' in text and 'pvt-s (mmdet) 13.3x' in text
    changed = copy.deepcopy(results)
    next(c for c in changed if c['contender'] == 'pvt-s (mmdet)' and c['size'] == 2048
         )['latency_ms'] = 5100.0
    assert verdict(changed, PAIRS) != text and '(3.0x faster)' in verdict(changed, PAIRS)
    # A contender that failed at the largest size moves the verdict to the size below.
    failed = copy.deepcopy(results)
    last = next(c for c in failed if c['contender'] == 'pvt-s (mmdet)' and c['size'] == 2048)
    last.update(status='oom', latency_ms=None)
    text_failed = verdict(failed, PAIRS)
    assert text_failed.startswith('At 1024 px') and 'pvt-s (mmdet) (oom at 2048)' in text_failed
    # results.md opens with it.
    cfg = runner.SweepConfig(level='backbone', contenders=[], sizes=[512, 1024, 2048])
    doc = write_outputs([(cfg, results)], str(tmp_path), make_plots=False, comparisons=PAIRS)
    md = [line for line in (tmp_path / 'results.md').read_text().splitlines() if line]
    assert md[0].startswith('# Benchmark') and md[1].startswith('**Verdict.** At 2048 px')
    assert doc['verdict'] == [text]


def test_help_opens_with_the_default_run_and_its_time() -> None:
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parents[2] / 'tools' / 'benchmark.py'
    out = subprocess.run([sys.executable, str(tool), '--help'], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    head = ' '.join(out[:6])
    assert 'default run' in head and '512, 1024 and 2048 px' in head and 'minutes' in head


def test_achieved_flops_against_the_measured_ceiling(tmp_path) -> None:
    """Every case's FLOP/s as a share of its dtype's GEMM ceiling: in a table of each
    run and in the verdict, computed from the counted FLOPs and the median time."""
    from mmlinattn.benchmark.ceiling import measure_ceiling
    from mmlinattn.benchmark.report import achieved, ceiling_line

    results = _results()
    for c in results:  # 10 GFLOP a call at 2048 px, a quarter per halving
        c['gflops'] = 10.0 / 4 ** (2048 // c['size'] - 1) if c['size'] > 512 else 0.625
    ceiling = dict(device='cpu', threads=2, gemm_n=2048, fp32_gflops=100.0, bf16_gflops=600.0,
                   bf16_native=True, bandwidth_gbs=20.0)
    case = next(c for c in results if c['contender'] == 'inline-pvt-s' and c['size'] == 2048)
    rate, share = achieved(case, ceiling)
    assert rate == pytest.approx(10.0 / 1.7) and share == pytest.approx(rate / 100.0)
    assert achieved(dict(case, dtype='bf16'), ceiling)[1] == pytest.approx(rate / 600.0)
    text = verdict(results, PAIRS, ceiling, 'fp32')
    assert "Against this machine's fp32 GEMM ceiling (100 GFLOP/s" in text
    assert f'inline-pvt-s {rate:.0f} GFLOP/s ({share:.0%})' in text
    cfg = runner.SweepConfig(level='backbone', contenders=[], sizes=[512, 1024, 2048])
    doc = write_outputs([(cfg, results)], str(tmp_path), make_plots=False, comparisons=PAIRS,
                        ceiling=ceiling)
    md = (tmp_path / 'results.md').read_text()
    assert doc['ceiling'] == ceiling and "This machine's ceiling" in md
    assert '**Achieved GFLOP/s (share of the fp32 GEMM ceiling, 100 GFLOP/s)**' in md
    assert '| inline-pvt-s | ' in md and f'{rate:.0f} ({share:.0%})' in md
    # The measurement itself, small: positive figures, the threads restored.
    import torch
    threads = torch.get_num_threads()
    small = measure_ceiling('cpu', threads=1, n=128, copy_bytes=2**20)
    assert small['fp32_gflops'] > 0 and small['bf16_gflops'] > 0 and small['bandwidth_gbs'] > 0
    assert small['threads'] == 1 and torch.get_num_threads() == threads
    # The ceiling is the faster route of each dtype, and the line names every route.
    for dtype in ('fp32', 'bf16'):
        assert small[f'{dtype}_gflops'] == max(small[f'{dtype}_routes'].values())
    if torch.backends.mkldnn.is_available():
        assert set(small['fp32_routes']) == {'mm', 'onednn'}
        assert '(torch.mm ' in ceiling_line(small) and ', oneDNN ' in ceiling_line(small)
