"""The largest square input whose forward (or training step) fits a memory limit.

Each probe runs one call in its own worker under the limit (the worker stops
itself past it, :mod:`.memory`); the search doubles from a start size until a
probe fails, then bisects between the last size that fitted and the first that
did not, on multiples of 32 (the stride of every backbone's coarsest map).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from .contenders import get_contender, unavailable_reason
from .runner import CP_OPTIONS, SweepConfig, case_spec, run_case

__all__ = ['search_max_size', 'find_max_sizes', 'MULTIPLE']

MULTIPLE = 32

#: A probe: size -> (fits, the worker's result).
Probe = Callable[[int], tuple[bool, dict]]


def _down(size: int, multiple: int) -> int:
    return max(multiple, size // multiple * multiple)


def search_max_size(probe: Probe, start: int, limit: int, multiple: int = MULTIPLE) -> dict:
    """Largest multiple of ``multiple`` in ``[multiple, limit]`` for which ``probe`` fits,
    assuming that what fits at one size fits at every smaller one.

    Returns ``max_size`` (None when even ``multiple`` does not fit), ``first_failure``
    (the smallest size seen not to fit, None if none did), ``capped`` (``limit``
    fitted: the true maximum may be larger) and ``probes`` (size, status, peak MiB).
    """
    probes: list[dict] = []

    def fits(size: int) -> bool:
        ok, result = probe(size)
        probes.append(dict(size=size, status=result.get('status'),
                           peak_mem_mib=result.get('peak_mem_mib'), error=result.get('error')))
        return ok

    limit = _down(limit, multiple)
    size = min(_down(start, multiple), limit)
    lo: Optional[int] = None
    hi: Optional[int] = None
    if fits(size):
        lo = size
        while lo < limit:  # grow until a probe fails or the limit fits
            size = min(limit, lo * 2)
            if fits(size):
                lo = size
            else:
                hi = size
                break
    else:
        hi = size
        while size > multiple:  # shrink until one fits
            size = _down(size // 2, multiple)
            if fits(size):
                lo = size
                break
            hi = size
    if lo is not None and hi is not None:
        while hi - lo > multiple:
            mid = _down((lo + hi) // 2, multiple)
            if fits(mid):
                lo = mid
            else:
                hi = mid
    return dict(max_size=lo, first_failure=hi, capped=lo == limit and hi is None,
                probes=probes)


def find_max_sizes(cfg: SweepConfig, modes: tuple[str, ...] = ('infer', 'train'),
                   start: int = 512, limit: int = 8192, progress: Any = None,
                   multiple: int = MULTIPLE) -> list[dict]:
    """For every contender of ``cfg`` and mode: the largest side, a multiple of ``multiple``
    (itself a multiple of :data:`MULTIPLE`), that fits ``cfg.mem_limit_gib`` (``cfg.sizes``
    is ignored; ``cfg.with_cp`` applies to training)."""
    if multiple < MULTIPLE or multiple % MULTIPLE:
        raise ValueError(f'the search step must be a multiple of {MULTIPLE}, got {multiple}')
    results = []
    for name in cfg.contenders:
        contender = get_contender(cfg.level, name)
        for mode in modes:
            for with_cp in CP_OPTIONS[cfg.with_cp] if mode == 'train' else (False, ):
                label = f'{contender.name} +cp' if with_cp else contender.name
                if cfg.spatial_ranks > 1:
                    label += f' [{cfg.spatial_ranks} ranks]'
                entry = dict(contender=label, mode=mode, with_cp=with_cp,
                             mem_limit_gib=cfg.mem_limit_gib, ours=contender.ours)
                missing = unavailable_reason(contender) if cfg.level != 'model' else None
                if with_cp and not contender.supports_cp:
                    missing = missing or f'{contender.name} has no with_cp'
                if missing:
                    entry.update(status='unavailable', error=missing)
                else:
                    mode_cfg = SweepConfig(**{**vars(cfg), 'mode': mode})
                    try:
                        entry.update(status='ok', **search_max_size(
                            _probe(mode_cfg, name, with_cp, progress, label), start,
                            limit, multiple), step=multiple)
                    except RuntimeError as exc:  # a probe that failed for another reason
                        entry.update(status='error', error=str(exc)[:500])
                results.append(entry)
    return results


def _probe(cfg: SweepConfig, name: str, with_cp: bool, progress: Any, label: str) -> Probe:
    def probe(size: int) -> tuple[bool, dict]:
        result = run_case(case_spec(cfg, name, size, with_cp, probe=True), cfg.mem_limit_gib,
                          cfg.budget_s + cfg.startup_grace_s, cfg.steady_malloc)
        if progress is not None:
            progress(dict(result, contender=label, size=size, mode=cfg.mode, level=cfg.level))
        if result.get('status') not in ('ok', 'oom', 'stopped', 'timeout'):
            raise RuntimeError(f'{label} at {size} px: {result.get("error")}')
        return result.get('status') == 'ok', result
    return probe
