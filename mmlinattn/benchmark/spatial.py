"""One benchmark case over several processes, each holding a band of the image's rows.

:func:`measure_spatial` is what the worker runs for ``--spatial-ranks R``: it spawns R
processes joined in a gloo group (the case's rank processes), each building the
contender, running the case sharded (:mod:`mmlinattn.parallel`) with its own memory
watch, and reports per rank: call times, peak memory in use, and the bytes it sent
(all-reduced statistics, halo rows, gathered maps). The result is the slowest rank's
median call, the largest per-rank peak, and the communication of one call against what
ring attention would move for the same global layers (every rank's keys and values to
every other rank: ``(R - 1) / R * N * 2C`` elements per layer and rank, forward; twice
that again in backward for their gradients).
"""
from __future__ import annotations

import datetime
import os
import socket
import statistics
import time
import traceback
from typing import Any, Callable, Optional

import torch

__all__ = ['measure_spatial', 'ring_attention_bytes']


def ring_attention_bytes(layers: list[tuple[int, int]], ranks: int, train: bool,
                         element_bytes: int = 4) -> int:
    """Bytes one rank sends for ring attention over ``layers`` (each ``(tokens of the
    whole map, channels)``): its K and V shard to each other rank, plus in backward
    their gradients (dK, dV), which travel the ring too."""
    per_pass = sum((ranks - 1) * (n // ranks) * 2 * c for n, c in layers) * element_bytes
    return per_pass * (3 if train else 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _prepare_rank(spec: dict, group: Any) -> tuple[Callable[[], Any], Any, Any]:
    """One call of the case on this rank's band (inference forward or training step),
    the module, and the spatial group whose statistics count its communication."""
    from ..parallel import image_bands, spatial_parallel
    from .contenders import get_contender, image_input
    contender = get_contender(spec['level'], spec['contender'])
    overrides = {'with_cp': True} if spec.get('with_cp') else {}
    target = contender.build(**overrides)
    train = spec.get('mode', 'infer') == 'train'
    size = spec['size']
    if spec['level'] == 'backbone':
        (image, ) = image_input(size, spec['batch'], 'cpu')
        a, b = image_bands(size, group.size)[group.rank]
        band = image[:, :, a:b].contiguous()
        del image
        target.train(train)
        if not train:
            def run() -> Any:
                with torch.no_grad(), spatial_parallel(group):
                    return len(target(band))
            return run, target, group
        params = [p for p in target.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step() -> Any:
            with spatial_parallel(group):
                outs = target(band)
                loss = sum(o.float().sum() / (o.shape[1] * size * size) for o in outs)
                loss.backward()
            for p in params:  # weight gradients summed over the group, as the wrapper does
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step, target, group
    if spec['level'] == 'model':
        from mmengine.optim import OptimWrapper

        from ..engine.build import synthetic_batch, synthetic_train_batch
        from ..engine.spatial import SpatialParallelWrapper, segmentor_logits
        model = target
        if train:
            model.train()
            wrapper = SpatialParallelWrapper(model, spatial_size=group.size, check_inputs=False)
            optim = OptimWrapper(torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-4))
            data = synthetic_train_batch(model, model.benchmark_scope, size, size, spec['batch'])
            return (lambda: wrapper.train_step(data, optim)), model, wrapper.group
        model.eval()
        inputs, _ = synthetic_batch(model, model.benchmark_scope, size, size, spec['batch'])

        def infer() -> Any:
            with torch.no_grad():
                return segmentor_logits(model, inputs, group)[0].shape
        return infer, model, group
    raise ValueError(f'--spatial-ranks measures backbones and models, not {spec["level"]}')


def _report(queue: Any, result: dict, code: Optional[int] = None) -> None:
    """Put ``result`` and wait until it is written (then leave with ``code`` if given:
    a rank past its limit must not wait for the others in a collective)."""
    queue.put(result)
    queue.close()
    queue.join_thread()
    if code is not None:
        os._exit(code)


def _rank_main(rank: int, world: int, port: int, spec: dict, queue: Any) -> None:
    import torch.distributed as dist

    from ..parallel import SpatialGroup
    from .memory import MemoryWatch
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(int(spec.get('threads') or max(1, (os.cpu_count() or 1) // world)))
    limit = spec.get('mem_limit_gib')

    def exceeded(now: int) -> None:
        _report(queue, dict(rank=rank, status='oom', in_use_gib=now / 2**30,
                            error=f'rank {rank}: memory in use {now / 2**30:.2f} GiB passed '
                            f'the {limit:.3g} GiB per-rank limit'), 0)

    try:
        # A rank that died leaves the others in a collective: they give up after the
        # longest a call may take, and the coordinator kills them at its deadline anyway.
        dist.init_process_group('gloo', rank=rank, world_size=world, timeout=datetime.timedelta(
            seconds=max(600.0, 4 * spec.get('budget_s', 60))))
        group = SpatialGroup.world()
        with MemoryWatch(limit * 2**30 if limit else None, 0.005, on_exceed=exceeded) as watch:
            run, module, group = _prepare_rank(spec, group)
            calls = 1 if spec.get('probe') else max(1, spec.get('warmup', 1)) + spec['repeats']
            times, comm = [], None
            for i in range(calls):
                dist.barrier()
                group.stats.reset()
                t0 = time.perf_counter()
                run()
                dist.barrier()  # a call ends when the slowest rank is done
                times.append(time.perf_counter() - t0)
                if comm is None:  # the first call's: every call moves the same
                    comm, layers = group.stats.as_dict(), list(group.stats.layers)
                if i == 0 and not spec.get('probe'):
                    left = spec['budget_s'] - times[0] * (calls - 1)
                    if left < 0:  # the budget: at least one timed call after the warm-up
                        calls = max(2, int(spec['budget_s'] / max(times[0], 1e-6)))
                if i + 1 >= calls:
                    break
        dist.destroy_process_group()
        _report(queue, dict(rank=rank, status='ok', times=times, peak=watch.peak,
                            start=watch.start, comm=comm, layers=layers,
                            params=sum(p.numel() for p in module.parameters())))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        _report(queue, dict(rank=rank, status='oom' if 'out of memory' in str(exc).lower()
                            else 'error', error=f'rank {rank}: {type(exc).__name__}: {exc}'[:500],
                            trace=traceback.format_exc()[-2000:]), 1)


def measure_spatial(spec: dict) -> dict:
    """The case over ``spec['spatial_ranks']`` processes (see the module docstring)."""
    import multiprocessing as mp
    world = int(spec['spatial_ranks'])
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, spec, queue), daemon=True)
             for r in range(world)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    reports: list[dict] = []
    deadline = started + spec.get('budget_s', 60) * 4 + 600
    while len(reports) < world and time.perf_counter() < deadline:
        try:
            reports.append(queue.get(timeout=1.0))
        except Exception:  # noqa: BLE001 - queue.Empty: check the processes
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        if reports[-1]['status'] != 'ok':
            break  # one rank failed: the others wait in a collective for ever
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    failed = [r for r in reports if r['status'] != 'ok']
    if failed or len(reports) < world:
        first = failed[0] if failed else dict(status='error', error='a rank died silently')
        return dict(status=first['status'], error=first.get('error', ''),
                    spatial_ranks=world, wall_s=time.perf_counter() - started)
    reports.sort(key=lambda r: r['rank'])
    warm = 0 if spec.get('probe') else 1
    per_call = [max(r['times'][i] for r in reports) for i in range(len(reports[0]['times']))]
    timed = per_call[warm:] or per_call
    q = statistics.quantiles(timed, n=4) if len(timed) >= 2 else [timed[0]] * 3
    train = spec.get('mode', 'infer') == 'train'
    layers = reports[0]['layers']
    sent = [r['comm']['all_reduce_bytes'] + r['comm']['halo_bytes'] + r['comm']['gather_bytes']
            for r in reports]
    ring = ring_attention_bytes(layers, world, train)
    comm0 = reports[0]['comm']
    return dict(
        status='ok', spatial_ranks=world, latency_ms=statistics.median(timed) * 1e3,
        iqr_ms=(q[2] - q[0]) * 1e3, p25_ms=q[0] * 1e3, p75_ms=q[2] * 1e3, repeats=len(timed),
        warmup_ms=[t * 1e3 for t in per_call[:warm]],
        throughput_ips=spec['batch'] / statistics.median(timed),
        params_m=reports[0]['params'] / 1e6,
        peak_mem_mib=max(r['peak'] for r in reports) / 2**20,
        peak_mem_per_rank_mib=[r['peak'] / 2**20 for r in reports],
        mem_source='largest per-rank peak of memory in use (each rank its own process)',
        comm=dict(per_rank_sent_bytes=sent, all_reduce_bytes=comm0['all_reduce_bytes'],
                  halo_bytes=comm0['halo_bytes'], gather_bytes=comm0['gather_bytes'],
                  calls=comm0['calls'], global_layers=len(layers),
                  ring_attention_bytes=ring,
                  all_reduce_vs_ring=comm0['all_reduce_bytes'] / ring if ring else None),
        wall_s=time.perf_counter() - started)
