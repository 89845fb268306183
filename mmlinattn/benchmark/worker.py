"""Measure one benchmark case in this process and print the result as JSON.

Run by :mod:`mmlinattn.benchmark.runner` in a fresh subprocess per case, so that
peak memory belongs to that case alone and an out-of-memory kill or a time-out
loses only that case::

    python -m mmlinattn.benchmark.worker '{"level": "backbone", "contender": ...}'
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from .memory import MemoryWatch, in_use_measure

RESULT_PREFIX = 'BENCHMARK_RESULT '
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


#: How often the worker samples its memory in use (seconds).
MEMORY_SAMPLE_S = 0.005


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or 'out of memory' in text \
        or "can't allocate memory" in text


def _prepare(spec: dict) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    """``(run, count_flops_fn, module)`` for the case: ``run()`` does one timed call (an
    inference forward, or with ``mode='train'`` a whole training step)."""
    from .contenders import get_contender

    contender = get_contender(spec['level'], spec['contender'])
    overrides = {'with_cp': True} if spec.get('with_cp') else {}
    if contender.sized:
        overrides['img_size'] = spec['size']
    if spec.get('with_cp') and not contender.supports_cp:
        raise ValueError(f'{contender.name} has no activation checkpointing (with_cp)')
    target = contender.build(**overrides)
    if spec.get('mode', 'infer') == 'train':
        return _prepare_train(spec, target)
    return _prepare_infer(spec, target)


def _autocast(device: str, dtype: torch.dtype) -> Any:
    """Autocast to ``dtype`` (off for float32)."""
    return torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)


def _prepare_infer(spec: dict, target: Any) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    from ..engine.build import synthetic_batch
    from .contenders import attention_input, image_input

    device, dtype = spec['device'], DTYPES[spec['dtype']]
    if spec['level'] == 'attention':
        # Operators take the activations in the requested dtype directly.
        args = attention_input(spec['size'], spec['batch'], device, dtype)
        fn, module, dtype = target, None, torch.float32
    else:
        # Not chained: some mm backbones' train() returns None (mmdet's Swin).
        module = target.to(device)
        module.eval()
        if spec['level'] == 'model':
            inputs, samples = synthetic_batch(module, module.benchmark_scope, spec['size'],
                                              spec['size'], spec['batch'])
            args = (inputs.to(device), samples)
            fn = module._forward
        else:
            args = image_input(spec['size'], spec['batch'], device)
            fn = module
    if spec.get('compile'):
        fn = torch.compile(fn)

    def run() -> Any:
        with torch.no_grad(), _autocast(device, dtype):
            return fn(*args)

    def flops() -> int:
        return _count_flops(target if module is None else module, run, args, spec['level'])

    return run, flops, module


def _prepare_train(spec: dict, target: Any) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    """One training step: forward (autocast to the dtype), backward, optimizer step.

    Backbone level: AdamW on a loss that reads every output map; model level: the
    model's own ``train_step`` through its data preprocessor, on a synthetic batch
    with ground truth at the requested size.
    """
    from .contenders import attention_input, image_input

    device, dtype = spec['device'], DTYPES[spec['dtype']]
    if spec.get('compile'):
        raise ValueError('--compile is for inference; a training step is timed eagerly')
    if spec['level'] == 'attention':
        q, k, v = (t.requires_grad_() for t in attention_input(spec['size'], spec['batch'],
                                                                device, dtype))

        def run() -> Any:
            target(q, k, v).float().mean().backward()
            for t in (q, k, v):
                t.grad = None
        return run, _no_flops, None
    module = target.to(device)
    module.train()
    if spec['level'] == 'model':
        return _model_train_step(spec, module), _no_flops, module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    (image, ) = image_input(spec['size'], spec['batch'], device)

    def step() -> Any:
        with _autocast(device, dtype):
            outs = module(image)
        loss = sum(o.float().mean() for o in outs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, _no_flops, module


def _model_train_step(spec: dict, model: Any) -> Callable[[], Any]:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    from ..engine import CPUAutocastOptimWrapper
    from ..engine.build import synthetic_train_batch

    device, dtype = spec['device'], spec['dtype']
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if dtype == 'fp32':
        wrapper = OptimWrapper(optimizer)
    elif device == 'cpu':
        wrapper = CPUAutocastOptimWrapper(optimizer, dtype=str(DTYPES[dtype]).split('.')[-1])
    else:
        wrapper = AmpOptimWrapper(optimizer=optimizer, dtype=DTYPES[dtype])
    data = synthetic_train_batch(model, model.benchmark_scope, spec['size'], spec['size'],
                                 spec['batch'])

    def step() -> Any:
        return model.train_step(data, wrapper)

    return step


def _no_flops() -> int:
    raise ValueError('FLOPs are counted for inference only')


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to('meta')
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(o) for o in obj)
    return obj


def _count_flops(target: Any, run: Callable[[], Any], args: tuple, level: str) -> int:
    """Operator-level FLOPs of one call: ``target`` on meta tensors (no compute) where every
    operator supports them, else by counting ``run()``, the timed call, once more."""
    import copy

    from ..utils.flops import count_flops

    # An exported graph (ONNX Runtime) computes its eager reference's operators.
    target = getattr(target, 'flops_reference', target)
    if level != 'model':
        try:
            meta = copy.deepcopy(target).to('meta') if isinstance(target, torch.nn.Module) \
                else target
            with torch.no_grad():
                return count_flops(meta, *_to_meta(args))[0]
        except Exception:  # noqa: BLE001 - an operator without a meta kernel: count for real
            pass
    return count_flops(run)[0]


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def measure(spec: dict) -> dict:
    """Time one case. Keys of ``spec``: level, contender, size, batch, device, dtype,
    compile, threads, warmup, repeats, budget_s, flops, mem_limit_gib, and optionally
    mode (``infer``/``train``), with_cp, probe (one call: does it fit?).

    Host memory in use is watched throughout (:class:`~.memory.MemoryWatch`): past
    ``mem_limit_gib`` the worker prints an ``oom`` result and exits at once.
    """
    if int(spec.get('spatial_ranks') or 1) > 1:  # each rank in its own process
        from .spatial import measure_spatial
        return measure_spatial(spec)
    limit = spec.get('mem_limit_gib')
    with MemoryWatch(limit * 2**30 if limit else None, MEMORY_SAMPLE_S,
                     result_prefix=RESULT_PREFIX) as watch:
        result = _measure(spec)
    if result.get('status') == 'ok' and spec['device'] == 'cpu' and spec['dtype'] == 'bf16':
        from ..utils.cpu import EMULATED_BF16_NOTE, cpu_has_native_bf16
        if not cpu_has_native_bf16():
            result['note'] = '; '.join(filter(None, (result.get('note'), EMULATED_BF16_NOTE)))
    if result.get('status') == 'ok' and spec['device'] != 'cuda':
        result['peak_mem_mib'] = watch.peak / 2**20
        result['peak_mem_above_start_mib'] = (watch.peak - watch.start) / 2**20
        result['mem_source'] = (f'peak {in_use_measure()} of the isolated worker, sampled every '
                                f'{MEMORY_SAMPLE_S * 1e3:g} ms')
    return result


def _measure(spec: dict) -> dict:
    started = time.perf_counter()
    if spec.get('threads'):
        torch.set_num_threads(int(spec['threads']))
    device = spec['device']
    if device == 'cuda' and not torch.cuda.is_available():
        return dict(status='error', error='--device cuda but torch sees no GPU')
    result: dict[str, Any] = dict(status='ok')
    try:
        run, flops_fn, module = _prepare(spec)
        built = time.perf_counter()  # the budget is for the calls, not the build
        params = 0 if module is None else sum(p.numel() for p in module.parameters())
        if params:  # an ONNX Runtime session holds its weights outside torch
            result['params_m'] = params / 1e6
        if device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        # Warm-up; the last warm-up call's time decides how many repeats fit. With
        # --compile the first call compiles (a minute on a small CPU), so one more runs.
        warm_times = []
        for _ in range(1 if spec.get('probe') or spec.get('single_call') else
                       max(1, spec['warmup']) + (1 if spec.get('compile') else 0)):
            t0 = time.perf_counter()
            run()
            _sync(device)
            warm_times.append(time.perf_counter() - t0)
        left = spec['budget_s'] - (time.perf_counter() - built)
        per_call = warm_times[-1]
        # A probe only asks whether one call fits: its warm-up call is the measurement.
        single = bool(spec.get('single_call'))
        repeats = 0 if spec.get('probe') or single else max(
            1, min(spec['repeats'], int(left / max(per_call, 1e-6))))
        if single:
            result['single_call'] = True
        result['repeats_planned'] = spec['repeats']
        times = [] if repeats else warm_times[-1:]
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - t0)
        if 0 < repeats < spec['repeats']:
            result['note'] = (f'{repeats} of {spec["repeats"]} repeats fitted the '
                              f'{spec["budget_s"]:.0f} s budget')
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        result.update(
            latency_ms=statistics.median(times) * 1e3, iqr_ms=(q[2] - q[0]) * 1e3,
            p25_ms=q[0] * 1e3, p75_ms=q[2] * 1e3, repeats=len(times),
            warmup_ms=[t * 1e3 for t in warm_times],
            throughput_ips=spec['batch'] / statistics.median(times))
        if device == 'cuda':
            result['peak_mem_mib'] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
            result['mem_source'] = 'cuda allocator peak'
        # Meta-tensor counting is free; a real-run fallback must fit the budget.
        fits = spec['budget_s'] - (time.perf_counter() - built) > 1.5 * per_call
        count = spec.get('flops', True) and spec.get('mode', 'infer') == 'infer' and \
            not spec.get('probe')
        if count and not fits and spec['level'] == 'model':
            result['flops_error'] = 'skipped: another call would exceed the time budget'
        elif count:
            try:
                result['gflops'] = flops_fn() / 1e9
            except Exception as exc:  # noqa: BLE001 - FLOPs are informative, not essential
                result['flops_error'] = f'{type(exc).__name__}: {exc}'[:300]
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded result
        result = dict(status='oom' if _is_oom(exc) else 'error',
                      error=f'{type(exc).__name__}: {exc}'[:500])
    result['wall_s'] = time.perf_counter() - started
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    print(RESULT_PREFIX + json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main(sys.argv))
