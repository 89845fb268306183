"""Run a benchmark sweep: one isolated worker process per case, then tables and plots.

A case whose memory in use exceeds the limit (judged inside the worker, see
:mod:`.memory`, or an allocator error there) is recorded as ``oom``, one that
exceeds its time budget as ``timeout``, one whose RSS nears the machine's RAM as
``stopped`` (a guard for the machine), each with the limit; larger sizes of that
contender are then recorded as ``skipped`` and the sweep goes on.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .contenders import get_contender, unavailable_reason
from .memory import machine_memory_bytes
from .worker import RESULT_PREFIX

__all__ = ['SweepConfig', 'run_sweep', 'environment', 'write_outputs', 'default_mem_limit_gib']

STARTUP_GRACE_S = 90.0  # imports and model construction, beyond the measuring budget

#: glibc returns every freed block above 32 MiB to the kernel and faults it in again on
#: the next call, which at large sizes costs more than the arithmetic. These settings
#: keep freed memory for reuse (as jemalloc/tcmalloc do); every contender of a sweep
#: runs with the same setting. ``SweepConfig(steady_malloc=False)`` measures without.
STEADY_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(2**32), 'MALLOC_TRIM_THRESHOLD_': str(2**32)}


def default_mem_limit_gib(fraction: float = 0.7) -> float:
    """GiB of memory in use a worker may reach: ``fraction`` of this machine's RAM.

    The limit is judged on memory in use (:mod:`.memory`), not on RSS, which the
    freed memory a steady-malloc worker keeps inflates far past what it holds.
    """
    total = machine_memory_bytes()
    return 12.0 if total is None else round(fraction * total / 2**30, 1)


#: Statuses after which a contender's larger sizes are skipped.
FAILED = ('oom', 'timeout', 'stopped')

#: Resident memory, as a fraction of the machine's RAM, at which the runner stops a
#: worker whatever it holds: a guard for the machine, not the benchmark's limit.
MACHINE_GUARD_FRACTION = 0.9


@dataclass
class SweepConfig:
    level: str
    contenders: list[str]
    sizes: list[int]
    batch: int = 1
    device: str = 'cpu'
    dtype: str = 'fp32'
    compile: bool = False
    threads: Optional[int] = None
    warmup: int = 1
    repeats: int = 5
    budget_s: float = 60.0
    mem_limit_gib: float = field(default_factory=default_mem_limit_gib)
    flops: bool = True
    #: Seconds allowed for imports and model construction beyond ``budget_s``.
    startup_grace_s: float = STARTUP_GRACE_S
    #: Run workers with :data:`STEADY_MALLOC_ENV`.
    steady_malloc: bool = True


def environment() -> dict:
    import torch

    env: dict[str, Any] = dict(
        python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
        cpu=_cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env['gpu'] = torch.cuda.get_device_name(0)
        env['cuda'] = torch.version.cuda
    for pkg in ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'timm', 'mmlinattn'):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent or unusable: recorded as such
            env[pkg] = None
    return env


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def _run_case(spec: dict, mem_limit_gib: float, timeout_s: float,
              steady_malloc: bool = True) -> dict:
    """Spawn the worker; watch its time; return its result or why it stopped.

    The worker judges ``mem_limit_gib`` itself, on memory in use. Here only the
    machine is guarded: a worker whose RSS (kept freed memory included) passes
    :data:`MACHINE_GUARD_FRACTION` of the RAM is stopped, and so reported.
    """
    import psutil

    spec = dict(spec, mem_limit_gib=mem_limit_gib)
    cmd = [sys.executable, '-m', 'mmlinattn.benchmark.worker', json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    if steady_malloc:
        env.update(STEADY_MALLOC_ENV)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    watched = psutil.Process(proc.pid)
    machine = machine_memory_bytes()
    guard = max(mem_limit_gib * 2**30, MACHINE_GUARD_FRACTION * machine) if machine else None
    started, peak, reason = time.perf_counter(), 0, None
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, watched.memory_info().rss)
        if guard is not None and peak > guard:
            # Not "oom": memory in use (the benchmark's measure) may be under the limit.
            reason = dict(status='stopped', limit_gib=round(guard / 2**30, 1), error=(
                f'resident memory (freed memory the worker keeps included) passed '
                f'{guard / 2**30:.1f} GiB, {MACHINE_GUARD_FRACTION:.0%} of this machine; the '
                'worker was stopped to protect the machine'))
        elif time.perf_counter() - started > timeout_s:
            reason = dict(status='timeout', error=f'one call did not finish within the '
                          f'{timeout_s:.0f} s limit', limit_s=timeout_s)
        if reason:
            proc.kill()
            proc.wait()
            return reason
        time.sleep(0.1)
    out, err = proc.communicate()
    for line in out.splitlines()[::-1]:
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    # Killed by the kernel's OOM killer, or crashed before printing.
    status = 'oom' if proc.returncode in (-9, 137) else 'error'
    return dict(status=status, error=f'worker exited with {proc.returncode}: '
                f'{err.strip().splitlines()[-1] if err.strip() else "no output"}'[:500])


def run_sweep(cfg: SweepConfig, progress: Any = None) -> list[dict]:
    """Measure every (contender, size) of ``cfg``; larger sizes after a failure are skipped."""
    results = []
    for name in cfg.contenders:
        contender = get_contender(cfg.level, name)
        missing = unavailable_reason(contender) if cfg.level != 'model' else None
        failed_at: Optional[dict] = None
        previous: Optional[dict] = None
        for size in cfg.sizes:
            case = dict(level=cfg.level, contender=contender.name, size=size,
                        description=contender.description)
            if missing:
                case.update(status='unavailable', error=missing)
            elif failed_at is not None:
                case.update(status='skipped', error=f'{failed_at["status"]} at size '
                            f'{failed_at["size"]}')
            elif (predicted := _predicted_seconds(previous, size)) is not None and \
                    predicted * (cfg.warmup + 1) > cfg.budget_s:
                case.update(status='over budget', error=f'predicted {predicted:.0f} s a call '
                            f'from the previous size; warm-up plus one timed call would '
                            f'exceed the {cfg.budget_s:.0f} s budget', limit_s=cfg.budget_s)
                failed_at = case
            else:
                spec = dict(level=cfg.level, contender=name, size=size, batch=cfg.batch,
                            device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
                            threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats,
                            budget_s=cfg.budget_s, flops=cfg.flops)
                case.update(_run_case(spec, cfg.mem_limit_gib,
                                      cfg.budget_s + cfg.startup_grace_s, cfg.steady_malloc))
                if case['status'] in FAILED:
                    failed_at = case
                elif case['status'] == 'ok':
                    if previous is not None:
                        case['growth'] = case['latency_ms'] / previous['latency_ms']
                        case['pixel_growth'] = (size / previous['size'])**2
                    previous = case
            results.append(case)
            if progress is not None:
                progress(case)
    _add_growth(results)
    return results


def _predicted_seconds(previous: Optional[dict], size: int) -> Optional[float]:
    """Seconds a call at ``size`` should take, extrapolating the contender's own growth."""
    if previous is None:
        return None
    pixel_ratio = (size / previous['size'])**2
    growth = previous.get('growth', 0.0) / previous.get('pixel_growth', 1.0)
    # Observed growth per pixel ratio (>= 1: at least linear), applied to the new ratio.
    return previous['latency_ms'] / 1e3 * pixel_ratio * max(1.0, growth)


def _add_growth(results: list[dict]) -> None:
    """Latency ratio to the previous size of the same contender, and the pixel ratio."""
    last: dict[str, dict] = {}
    for case in results:
        prev = last.get(case['contender'])
        if case.get('status') == 'ok':
            if prev is not None:
                case['growth'] = case['latency_ms'] / prev['latency_ms']
                case['pixel_growth'] = (case['size'] / prev['size'])**2
            last[case['contender']] = case


# -- outputs ---------------------------------------------------------------------------------
def _cell(case: dict) -> str:
    if case.get('status') != 'ok':
        return case.get('status', '?')
    return f"{case['latency_ms']:.1f} ({case['iqr_ms']:.1f})"


def _mem(case: dict) -> str:
    if case.get('status') != 'ok':
        limit = case.get('limit_gib')
        return f"{case.get('status')}" + (f' (>{limit:g} GiB)' if limit else '')
    above = case.get('peak_mem_above_start_mib')
    return f"{case['peak_mem_mib']:.0f}" + (f' (+{above:.0f})' if above is not None else '')


def tables(results: list[dict], meta: dict) -> str:
    """Markdown tables: latency (median, IQR), growth, memory, FLOPs, per level."""
    lines = []
    unit = 'tokens per side' if meta['level'] == 'attention' else 'px'
    sizes = sorted({c['size'] for c in results})
    names = list(dict.fromkeys(c['contender'] for c in results))
    by = {(c['contender'], c['size']): c for c in results}

    def table(title: str, fmt: Any) -> None:
        lines.append(f'\n**{title}**\n')
        lines.append('| contender | ' + ' | '.join(f'{s} {unit}' for s in sizes) + ' |')
        lines.append('|---|' + '---|' * len(sizes))
        for n in names:
            lines.append(f'| {n} | ' + ' | '.join(fmt(by[(n, s)]) if (n, s) in by else ''
                                                  for s in sizes) + ' |')

    table(f'Latency, ms: median (inter-quartile range), batch {meta["batch"]}', _cell)
    table('Cost growth: latency / latency at the previous size (pixels grow by the ratio '
          'in brackets)',
          lambda c: f"{c['growth']:.2f}x ({c['pixel_growth']:.0f}x)" if 'growth' in c else
          ('-' if c.get('status') == 'ok' else c.get('status', '')))
    table('Throughput, images/s', lambda c: f"{c['throughput_ips']:.2f}"
          if c.get('status') == 'ok' else c.get('status', ''))
    if meta['device'] == 'cuda':
        mem_title = 'Peak memory, MiB (CUDA allocator)'
    else:
        source = next((c['mem_source'] for c in results if 'mem_source' in c), 'memory in use')
        mem_title = (f'Peak memory, MiB: {source} (in brackets: above what was in use after '
                     'the imports)')
    table(mem_title, _mem)
    if any('gflops' in c for c in results):  # not counted with --no-flops
        table('GFLOPs (operator-level count)', lambda c: f"{c['gflops']:.1f}" if 'gflops' in c
              else ('-' if c.get('status') == 'ok' else c.get('status', '')))
    notes = [f"- {c['contender']} @ {c['size']}: {c['status']}: {c.get('error', c.get('note'))}"
             for c in results if c.get('status') != 'ok' or c.get('note')]
    if notes:
        lines.append('\n**Notes**\n')
        lines.extend(notes)
    return '\n'.join(lines)


def ratios(results: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Latency of ``a`` / latency of ``b`` at each size where both ran."""
    by = {(c['contender'], c['size']): c for c in results if c.get('status') == 'ok'}
    sizes = sorted({c['size'] for c in results})
    lines = []
    for a, b in pairs:
        cells = []
        for s in sizes:
            if (a, s) in by and (b, s) in by:
                cells.append(f"{s}: {by[(a, s)]['latency_ms'] / by[(b, s)]['latency_ms']:.2f}x")
        if cells:
            lines.append(f'- {a} / {b}: ' + ', '.join(cells))
    return '\n'.join(lines)


def plot(results: list[dict], meta: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    written = []
    unit = 'token-map side' if meta['level'] == 'attention' else 'input side (px)'
    names = list(dict.fromkeys(c['contender'] for c in results))
    colors = plt.get_cmap('tab20' if len(names) > 10 else 'tab10')
    for key, label, fname in (('latency_ms', 'median latency (ms)', 'latency.png'),
                              ('peak_mem_mib', 'peak memory (MiB)', 'memory.png')):
        fig, ax = plt.subplots(figsize=(9, 5))
        for idx, name in enumerate(names):
            pts = [(c['size'], c[key]) for c in results
                   if c['contender'] == name and c.get('status') == 'ok' and key in c]
            if not pts:
                continue
            xs, ys = zip(*pts)
            # Ours solid, the comparisons dashed; one colour each.
            style = '-' if name.startswith('inline') else '--'
            line, = ax.plot(xs, ys, marker='o', linestyle=style, label=name,
                            color=colors(idx % colors.N))
            failed = [c for c in results if c['contender'] == name
                      and c.get('status') in FAILED]
            for c in failed:
                ax.annotate(c['status'], (c['size'], ys[-1]), color=line.get_color(),
                            fontsize=8, textcoords='offset points', xytext=(0, 6))
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel(unit)
        ax.set_ylabel(label)
        title = f"{meta['level']} level, {meta['device']} {meta['dtype']}, batch {meta['batch']}"
        if meta['device'] == 'cpu' and not meta.get('steady_malloc', True):
            title += ", glibc's default allocator"
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = osp.join(out_dir, f"{meta['level']}_{fname}")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(runs: list[tuple[SweepConfig, list[dict]]], out_dir: str,
                  make_plots: bool = True, comparisons: Optional[list] = None) -> dict:
    """``results.json``, ``results.md`` and the plots in ``out_dir``; returns the JSON."""
    os.makedirs(out_dir, exist_ok=True)
    doc: dict[str, Any] = dict(
        created=datetime.datetime.now().isoformat(timespec='seconds'),
        environment=environment(), runs=[])
    md = [f"# Benchmark {doc['created']}\n", '```', json.dumps(doc['environment'], indent=1),
          '```']
    for cfg, results in runs:
        meta = asdict(cfg)
        entry = dict(config=meta, results=results, plots=[])
        if make_plots and any(c.get('status') == 'ok' for c in results):
            entry['plots'] = [osp.basename(p) for p in plot(results, meta, out_dir)]
        doc['runs'].append(entry)
        md.append(f"\n## {cfg.level} level ({cfg.device}, {cfg.dtype}"
                  f"{', compiled' if cfg.compile else ''})\n")
        md.append(tables(results, meta))
        if comparisons:
            cmp = ratios(results, comparisons)
            if cmp:
                md.append('\n**Latency ratios**\n')
                md.append(cmp)
        for p in entry['plots']:
            md.append(f'\n![{p}]({p})')
    with open(osp.join(out_dir, 'results.json'), 'w') as f:
        json.dump(doc, f, indent=1)
    with open(osp.join(out_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    return doc
