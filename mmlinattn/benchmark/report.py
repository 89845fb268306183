"""Benchmark outputs: markdown tables, latency ratios, log-log plots and the JSON record."""
from __future__ import annotations

import datetime
import json
import os
import os.path as osp
from dataclasses import asdict
from typing import Any, Optional

from .runner import FAILED, SweepConfig, environment

__all__ = ['tables', 'ratios', 'plot', 'max_size_table', 'write_outputs', 'verdict',
           'achieved', 'roofline_table', 'ceiling_line']


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


def _bytes(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} GiB'


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

    what = ('Training step (forward, backward, optimizer step)' if meta.get('mode') == 'train'
            else 'Latency')
    table(f'{what}, ms: median (inter-quartile range), batch {meta["batch"]}', _cell)
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
    comm = [c for c in results if c.get('comm')]
    if comm:
        lines.append('\n**Communication of one call, per rank (spatial parallelism)**\n')
        lines.append('| contender | size | all-reduced | halo rows | gathered maps | sent by '
                     'each rank | ring attention would send | all-reduced / ring |')
        lines.append('|---|---|---|---|---|---|---|---|')
        for c in comm:
            m = c['comm']
            ratio = m.get('all_reduce_vs_ring')
            lines.append(
                f"| {c['contender']} | {c['size']} | {_bytes(m['all_reduce_bytes'])} | "
                f"{_bytes(m['halo_bytes'])} | {_bytes(m['gather_bytes'])} | "
                f"{', '.join(_bytes(b) for b in m['per_rank_sent_bytes'])} | "
                f"{_bytes(m['ring_attention_bytes'])} ({m['global_layers']} global layers) | "
                f"{'-' if ratio is None else f'{ratio:.2%}'} |")
    notes = [f"- {c['contender']} @ {c['size']}: {c['status']}: {c.get('error', c.get('note'))}"
             for c in results if c.get('status') != 'ok' or c.get('note')]
    if notes:
        lines.append('\n**Notes**\n')
        lines.extend(notes)
    return '\n'.join(lines)


def achieved(case: dict, ceiling: Optional[dict]) -> Optional[tuple[float, float]]:
    """A case's achieved GFLOP/s (its counted FLOPs over its median time) and that as a
    share of the GEMM ceiling of its dtype; None without FLOPs or a ceiling."""
    if not ceiling or case.get('status') != 'ok' or 'gflops' not in case:
        return None
    peak = ceiling.get(f"{case.get('dtype', 'fp32')}_gflops")
    if not peak:
        return None
    rate = case['gflops'] / (case['latency_ms'] / 1e3)
    return rate, rate / peak


def _routes(ceiling: dict, dtype: str) -> str:
    """`` (torch.mm 215, oneDNN 430)`` when the ceiling was taken over several routes."""
    routes = ceiling.get(f'{dtype}_routes') or {}
    if len(routes) < 2:
        return ''
    names = {'mm': 'torch.mm', 'onednn': 'oneDNN'}
    return ' (' + ', '.join(f'{names.get(r, r)} {g:.0f}' for r, g in routes.items()) + ')'


def ceiling_line(ceiling: dict) -> str:
    """The measured ceiling in one sentence."""
    bf16 = (f"bf16 {ceiling['bf16_gflops']:.0f} GFLOP/s{_routes(ceiling, 'bf16')}"
            + ('' if ceiling.get('bf16_native', True) else ' (emulated: this CPU has no '
               'bfloat16 instructions)'))
    return (f"This machine's ceiling, measured in this run ({ceiling['gemm_n']}^3 matrix "
            f"products, {ceiling['threads']} threads, the faster route of each): fp32 "
            f"{ceiling['fp32_gflops']:.0f} GFLOP/s{_routes(ceiling, 'fp32')}, {bf16}; "
            f"memory bandwidth {ceiling['bandwidth_gbs']:.1f} GB/s (a copy).")


def roofline_table(results: list[dict], meta: dict, ceiling: dict) -> str:
    """Achieved GFLOP/s of each case and its share of the ceiling of the run's dtype."""
    sizes = sorted({c['size'] for c in results})
    names = list(dict.fromkeys(c['contender'] for c in results))
    by = {(c['contender'], c['size']): c for c in results}
    unit = 'tokens per side' if meta['level'] == 'attention' else 'px'
    lines = [f"\n**Achieved GFLOP/s (share of the {meta['dtype']} GEMM ceiling, "
             f"{ceiling[meta['dtype'] + '_gflops']:.0f} GFLOP/s)**\n",
             '| contender | ' + ' | '.join(f'{s} {unit}' for s in sizes) + ' |',
             '|---|' + '---|' * len(sizes)]
    for n in names:
        cells = []
        for s in sizes:
            got = achieved(dict(by[(n, s)], dtype=meta['dtype']), ceiling) \
                if (n, s) in by else None
            cells.append('' if (n, s) not in by else '-' if got is None
                         else f'{got[0]:.0f} ({got[1]:.0%})')
        lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
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
    mode = meta.get('mode') == 'train'
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
            ours = next((c.get('ours', True) for c in results if c['contender'] == name), True)
            style = '-' if ours else '--'
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
        title = (f"{meta['level']} level{', training step' if mode else ''}, {meta['device']} "
                 f"{meta['dtype']}, batch {meta['batch']}")
        if meta['device'] == 'cpu' and not meta.get('steady_malloc', True):
            title += ", glibc's default allocator"
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        dtype = '' if meta['dtype'] == 'fp32' else f"_{meta['dtype']}"
        path = osp.join(out_dir, f"{meta['level']}{'_train' if mode else ''}{dtype}_{fname}")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def max_size_table(results: list[dict]) -> str:
    """Markdown: per contender, the largest square side that fit, per mode."""
    modes = list(dict.fromkeys(r['mode'] for r in results))
    names = list(dict.fromkeys(r['contender'] for r in results))
    by = {(r['contender'], r['mode']): r for r in results}
    titles = {'infer': 'inference forward', 'train': 'training step'}

    def cell(r: Optional[dict]) -> str:
        if r is None:
            return ''
        if r['status'] != 'ok':
            return r['status']
        if r['max_size'] is None:
            return f"< {r['first_failure']}"
        text = f"{r['max_size']}" + (' (the search limit)' if r['capped'] else '')
        return text + (f" (not {r['first_failure']})" if r.get('first_failure') else '')

    limit = results[0]['mem_limit_gib'] if results else None
    lines = [f'\n**Largest square input (px) within {limit:g} GiB of memory in use**\n',
             '| contender | ' + ' | '.join(titles.get(m, m) for m in modes) + ' |',
             '|---|' + '---|' * len(modes)]
    for n in names:
        lines.append(f'| {n} | ' + ' | '.join(cell(by.get((n, m))) for m in modes) + ' |')
    notes = [f"- {r['contender']} ({r['mode']}): {r['status']}: {r.get('error')}"
             for r in results if r['status'] != 'ok']
    return '\n'.join(lines + notes)


def _gib(mib: float) -> str:
    return f'{mib / 1024:.2f} GiB' if mib >= 1024 else f'{mib:.0f} MiB'


def verdict(results: list[dict], pairs: list[tuple[str, str]],
            ceiling: Optional[dict] = None, dtype: str = 'fp32') -> Optional[str]:
    """Two to four sentences computed from one sweep's results: the largest size where
    every contender ran, each (ours, theirs) pair's speed and memory ratios there, how
    each pair's time grew from the size before (per 4x pixels) and, with the machine's
    ``ceiling``, how far each pair is from the ``dtype`` GEMM ceiling there. None when no
    pair of ``pairs`` ran at a common size."""
    ok = {(c['contender'], c['size']): c for c in results if c.get('status') == 'ok'}
    names = list(dict.fromkeys(c['contender'] for c in results))
    sizes = sorted({c['size'] for c in results})
    complete = [s for s in sizes if all((n, s) in ok for n in names)]
    present = [(a, b) for a, b in pairs if a in names and b in names]
    if not present:
        return None
    size = complete[-1] if complete else None
    if size is None:  # no size where everyone ran: the largest where a pair did
        shared = [s for s in sizes for a, b in present if (a, s) in ok and (b, s) in ok]
        if not shared:
            return None
        size = max(shared)
    unit = 'tokens a side' if results[0].get('level') == 'attention' else 'px'
    failed = sorted({f"{c['contender']} ({c['status']} at {c['size']})" for c in results
                     if c.get('status') != 'ok'})
    head = (f'At {size} {unit}, the largest size where every contender ran'
            if size in complete else f'At {size} {unit} (not every contender ran at any '
            f'size: {", ".join(failed)})')
    parts, growth, limits = [], [], []
    for a, b in present:
        if (a, size) not in ok or (b, size) not in ok:
            continue
        ca, cb = ok[(a, size)], ok[(b, size)]
        speed = cb['latency_ms'] / ca['latency_ms']
        text = (f"{a} took {ca['latency_ms'] / 1e3:.2f} s against {cb['latency_ms'] / 1e3:.2f} "
                f"s for {b} ({speed:.1f}x {'faster' if speed >= 1 else 'slower'})")
        if ca.get('peak_mem_mib') and cb.get('peak_mem_mib'):
            mem = cb['peak_mem_mib'] / ca['peak_mem_mib']
            text += (f" and held {_gib(ca['peak_mem_mib'])} against {_gib(cb['peak_mem_mib'])} "
                     f"({mem:.1f}x {'less' if mem >= 1 else 'more'})")
        parts.append(text)
        shares = [(n, achieved(dict(c, dtype=dtype), ceiling)) for n, c in ((a, ca), (b, cb))]
        if all(got is not None for _, got in shares):
            limits.append(' and '.join(f'{n} {got[0]:.0f} GFLOP/s ({got[1]:.0%})'
                                       for n, got in shares))
        if 'growth' in ca and 'growth' in cb:
            px = ca['pixel_growth']
            growth.append(f"{a} {ca['growth']:.1f}x, {b} {cb['growth']:.1f}x"
                          + ('' if px == 4 else f' ({px:.0f}x the pixels)'))
    if not parts:
        return None
    lines = [f'{head}, ' + '; '.join(parts) + '.']
    if growth:
        prev = max(s for s in sizes if s < size)
        lines.append(f'From {prev} to {size} {unit} (4x the pixels) the time grew: '
                     + '; '.join(growth) + '.')
    if limits:
        lines.append(f"Against this machine's {dtype} GEMM ceiling "
                     f"({ceiling[dtype + '_gflops']:.0f} GFLOP/s, measured in the same run) "
                     f'at {size} {unit}: ' + '; '.join(limits) + '.')
    if failed and size in complete:
        lines.append('Did not run: ' + ', '.join(failed) + '.')
    return ' '.join(lines)


def precision_table(runs: list[tuple[SweepConfig, list[dict]]]) -> Optional[str]:
    """For sweeps that differ only in dtype (``--dtype fp32 bf16``): each contender's
    median time in every other dtype over its fp32 time, size by size. None without an
    fp32 sweep to divide by."""
    def key(cfg: SweepConfig) -> tuple:
        return (cfg.level, cfg.mode, cfg.device, cfg.compile, cfg.batch)
    lines = []
    for base_cfg, base in runs:
        if base_cfg.dtype != 'fp32':
            continue
        for cfg, results in runs:
            if cfg.dtype == 'fp32' or key(cfg) != key(base_cfg):
                continue
            fp32 = {(c['contender'], c['size']): c for c in base if c.get('status') == 'ok'}
            low = {(c['contender'], c['size']): c for c in results if c.get('status') == 'ok'}
            sizes = sorted({s for _, s in fp32} | {s for _, s in low})
            names = list(dict.fromkeys(c['contender'] for c in base))
            what = 'training step' if cfg.mode == 'train' else 'inference'
            lines += [f'\n**{cfg.dtype} / fp32 time, {cfg.level} {what} (same run)**\n',
                      '| contender | ' + ' | '.join(f'{s} px' for s in sizes) + ' |',
                      '|---|' + '---|' * len(sizes)]
            for n in names:
                cells = []
                for s in sizes:
                    a, b = fp32.get((n, s)), low.get((n, s))
                    cells.append(f"{b['latency_ms'] / a['latency_ms']:.2f}x" if a and b else '-')
                lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) if lines else None


def write_outputs(runs: list[tuple[SweepConfig, list[dict]]], out_dir: str,
                  make_plots: bool = True, comparisons: Optional[list] = None,
                  max_sizes: Optional[tuple[SweepConfig, list[dict]]] = None,
                  ceiling: Optional[dict] = None) -> dict:
    """``results.json``, ``results.md`` and the plots in ``out_dir``; returns the JSON.

    ``max_sizes``: the configuration and results of a max-size search, written as
    their own table and JSON entry. ``ceiling``: the machine's measured GEMM ceiling and
    bandwidth (:func:`~.ceiling.measure_ceiling`): each run gets a table of achieved
    FLOP/s against it, and the verdict says how far the pairs are from it.
    """
    os.makedirs(out_dir, exist_ok=True)
    doc: dict[str, Any] = dict(
        created=datetime.datetime.now().isoformat(timespec='seconds'),
        environment=environment(), runs=[])
    md = [f"# Benchmark {doc['created']}\n", '```', json.dumps(doc['environment'], indent=1),
          '```']
    if ceiling:
        doc['ceiling'] = ceiling
        md.append('\n' + ceiling_line(ceiling))
    several = len({cfg.dtype for cfg, _ in runs}) > 1
    verdicts = [f'In {cfg.dtype}: {v}' if several else v
                for cfg, results in runs if comparisons and cfg.mode == 'infer'
                for v in [verdict(results, comparisons, ceiling, cfg.dtype)] if v]
    if verdicts:  # first: what the run shows, computed from it
        doc['verdict'] = verdicts
        md[1:1] = ['**Verdict.** ' + ' '.join(verdicts) + '\n']
    for cfg, results in runs:
        meta = asdict(cfg)
        entry = dict(config=meta, results=results, plots=[])
        if make_plots and any(c.get('status') == 'ok' for c in results):
            entry['plots'] = [osp.basename(p) for p in plot(results, meta, out_dir)]
        doc['runs'].append(entry)
        md.append(f"\n## {cfg.level} level, {'training' if cfg.mode == 'train' else 'inference'} "
                  f"({cfg.device}, {cfg.dtype}{', compiled' if cfg.compile else ''})\n")
        md.append(tables(results, meta))
        if ceiling and meta.get('mode', 'infer') == 'infer' and any('gflops' in c
                                                                    for c in results):
            md.append(roofline_table(results, meta, ceiling))
        if comparisons:
            cmp = ratios(results, comparisons)
            if cmp:
                md.append('\n**Latency ratios**\n')
                md.append(cmp)
        for p in entry['plots']:
            md.append(f'\n![{p}]({p})')
    precision = precision_table(runs)
    if precision:
        md.append(precision)
    if max_sizes is not None:
        cfg, found = max_sizes
        doc['max_sizes'] = dict(config=asdict(cfg), results=found)
        md.append(f'\n## Largest input, {cfg.level} level ({cfg.device}, {cfg.dtype})\n')
        md.append(max_size_table(found))
    with open(osp.join(out_dir, 'results.json'), 'w') as f:
        json.dump(doc, f, indent=1)
    with open(osp.join(out_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    return doc
