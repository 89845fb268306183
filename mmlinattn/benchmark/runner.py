"""Run a benchmark sweep: one isolated worker process per case (:mod:`.report` writes
the tables and plots).

A case whose memory in use exceeds the limit (judged inside the worker, see
:mod:`.memory`, or an allocator error there) is recorded as ``oom``, one that
exceeds its time budget as ``timeout``, one whose RSS nears the machine's RAM as
``stopped`` (a guard for the machine), each with the limit; larger sizes of that
contender are then recorded as ``skipped`` and the sweep goes on.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .contenders import get_contender, unavailable_reason
from .memory import machine_memory_bytes
from .worker import RESULT_PREFIX

__all__ = ['SweepConfig', 'run_sweep', 'case_spec', 'run_case', 'environment',
           'default_mem_limit_gib', 'FAILED', 'CP_OPTIONS']

STARTUP_GRACE_S = 90.0  # imports and model construction, beyond the measuring budget

#: glibc returns every freed block above 32 MiB to the kernel and faults it in again on
#: the next call, which at large sizes costs more than the arithmetic. These settings
#: keep freed memory for reuse (as jemalloc/tcmalloc do): no block is mmap'ed (glibc
#: caps the mmap threshold at 32 MiB, so raising it does not do this), nothing is
#: trimmed. Every contender of a sweep runs with the same setting;
#: ``SweepConfig(steady_malloc=False)`` measures without.
STEADY_MALLOC_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**31 - 1),
                     'MALLOC_TOP_PAD_': str(256 * 2**20)}


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


CP_OPTIONS = {'off': (False, ), 'on': (True, ), 'both': (False, True)}


@dataclass
class SweepConfig:
    """One sweep: every contender of ``level`` at every size, each case in its own worker."""

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
    #: ``infer`` (a forward without autograd) or ``train`` (forward, backward, optimizer step).
    mode: str = 'infer'
    #: Processes sharing each image's rows (spatial parallelism); 1: one process.
    spatial_ranks: int = 1
    #: Activation checkpointing: ``off``, ``on``, or ``both`` (each contender twice,
    #: the checkpointed one named ``<name> +cp``).
    with_cp: str = 'off'
    #: A case whose warm-up and timed call would pass the budget runs as one timed call
    #: (its own warm-up) while that call is predicted within this many budgets; beyond,
    #: it is recorded as "over budget" (0: never a single call).
    single_call_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ('infer', 'train'):
            raise ValueError(f"mode must be 'infer' or 'train', got {self.mode!r}")
        if self.with_cp not in CP_OPTIONS:
            raise ValueError(f'with_cp must be one of {sorted(CP_OPTIONS)}, got {self.with_cp!r}')


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


def run_case(spec: dict, mem_limit_gib: float, timeout_s: float,
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
        for with_cp in CP_OPTIONS[cfg.with_cp]:
            results += _sweep_one(cfg, name, contender, with_cp, progress)
    return results


def _sweep_one(cfg: SweepConfig, name: str, contender: Any, with_cp: bool,
               progress: Any) -> list[dict]:
    """The sizes of one contender (with or without activation checkpointing); ``name`` is
    what the worker looks it up by (a config path at the model level)."""
    missing = unavailable_reason(contender) if cfg.level != 'model' else None
    if with_cp and not missing and not contender.supports_cp:
        missing = f'{contender.name} has no activation checkpointing (with_cp)'
    label = f'{contender.name} +cp' if with_cp else contender.name
    if cfg.spatial_ranks > 1:
        label += f' [{cfg.spatial_ranks} ranks]'
    failed_at: Optional[dict] = None
    previous: Optional[dict] = None
    results = []
    for size in cfg.sizes:
        case = dict(level=cfg.level, contender=label, size=size, mode=cfg.mode,
                    with_cp=with_cp, description=contender.description, ours=contender.ours)
        if missing:
            case.update(status='unavailable', error=missing)
        elif failed_at is not None:
            case.update(status='skipped', error=f'{failed_at["status"]} at size '
                        f'{failed_at["size"]}')
        elif (predicted := _predicted_seconds(previous, size)) is not None and \
                predicted * (cfg.warmup + 1) > cfg.budget_s and \
                predicted > cfg.single_call_factor * cfg.budget_s:
            case.update(status='over budget', error=f'predicted {predicted:.0f} s a call '
                        f'from the previous size; even one call would exceed '
                        f'{cfg.single_call_factor:g}x the {cfg.budget_s:.0f} s budget',
                        limit_s=cfg.budget_s)
            failed_at = case
        else:
            # Slow but affordable: one timed call, which is its own warm-up (the first
            # call's time is recorded at every size, so the note can say how far a first
            # call differed from the median at the contender's previous size).
            single = predicted is not None and predicted * (cfg.warmup + 1) > cfg.budget_s
            limit = (max(cfg.budget_s, predicted * 1.5) if single else cfg.budget_s) + \
                cfg.startup_grace_s + contender.build_s
            case.update(run_case(case_spec(cfg, name, size, with_cp, single_call=single),
                                  cfg.mem_limit_gib, limit, cfg.steady_malloc))
            if single and case.get('status') == 'ok':
                case['note'] = _single_call_note(predicted, cfg.budget_s, previous)
            if case['status'] in FAILED:
                failed_at = case
            elif case['status'] == 'ok':
                if previous is not None:  # cost growth from the contender's previous size
                    case['growth'] = case['latency_ms'] / previous['latency_ms']
                    case['pixel_growth'] = (size / previous['size'])**2
                previous = case
        results.append(case)
        if progress is not None:
            progress(case)
    return results


def case_spec(cfg: SweepConfig, name: str, size: int, with_cp: bool = False,
              probe: bool = False, single_call: bool = False) -> dict:
    """The worker's spec for ``name`` at ``size`` under ``cfg`` (``single_call``: one
    timed call, its own warm-up)."""
    return dict(level=cfg.level, contender=name, size=size, batch=cfg.batch, device=cfg.device,
                dtype=cfg.dtype, compile=cfg.compile, threads=cfg.threads, warmup=cfg.warmup,
                repeats=cfg.repeats, budget_s=cfg.budget_s, flops=cfg.flops, mode=cfg.mode,
                with_cp=with_cp, probe=probe, single_call=single_call,
                spatial_ranks=cfg.spatial_ranks)


def first_call_ratio(case: Optional[dict]) -> Optional[float]:
    """A case's first (warm-up) call time over its median timed call, when both exist."""
    if not case or case.get('status') != 'ok' or not case.get('warmup_ms') or \
            case.get('single_call'):
        return None
    return case['warmup_ms'][0] / case['latency_ms']


def _single_call_note(predicted: float, budget: float, previous: Optional[dict]) -> str:
    ratio = first_call_ratio(previous)
    seen = (f'; at {previous["size"]} the first call took {ratio:.2f}x the median of '
            f'{previous["repeats"]} timed calls' if ratio is not None else '')
    return (f'one timed call, its own warm-up (predicted {predicted:.0f} s a call: warm-up '
            f'plus a timed call would pass the {budget:.0f} s budget){seen}; no spread')


def _predicted_seconds(previous: Optional[dict], size: int) -> Optional[float]:
    """Seconds a call at ``size`` should take, extrapolating the contender's own growth."""
    if previous is None:
        return None
    pixel_ratio = (size / previous['size'])**2
    growth = previous.get('growth', 0.0) / previous.get('pixel_growth', 1.0)
    # Observed growth per pixel ratio (>= 1: at least linear), applied to the new ratio.
    return previous['latency_ms'] / 1e3 * pixel_ratio * max(1.0, growth)
