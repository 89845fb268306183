"""What this machine can do at most, measured in the benchmark's own run: the FLOP/s of a
large matrix product in float32 and in bfloat16 (the GEMM ceiling: what dense matrix work
reaches through the same PyTorch and oneDNN/cuBLAS), and the memory bandwidth of a large
copy. Every case's achieved FLOP/s is then reported as a share of its dtype's ceiling,
as roofline reports do.

On the CPU a product has two routes in PyTorch: ``torch.mm`` (its BLAS in float32,
oneDNN in bfloat16) and oneDNN's inner product (what :func:`mmlinattn.ops.linear` uses).
They are not equally fast everywhere (on an AMD EPYC with AVX512 the BLAS reached 215
GFLOP/s in float32 and oneDNN 430), so the ceiling is the faster of the two, and the
report names both.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

__all__ = ['measure_ceiling', 'gemm_gflops', 'copy_bandwidth_gbs', 'GEMM_ROUTES',
           'onednn_gemm_available']


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


#: The routes a product can take: ``mm`` (``torch.mm``) and, on the CPU, ``onednn``
#: (oneDNN's inner product, ``a @ b^T``: the same FLOPs).
GEMM_ROUTES = ('mm', 'onednn')


def onednn_gemm_available(device: str = 'cpu') -> bool:
    """Whether oneDNN's inner product can be timed here (CPU PyTorch built with oneDNN)."""
    from ..ops.dense import onednn_available

    return device == 'cpu' and onednn_available()


def gemm_gflops(n: int, dtype: torch.dtype, device: str = 'cpu', repeats: int = 3,
                route: str = 'mm') -> float:
    """GFLOP/s of an ``n x n`` by ``n x n`` matrix product (``2 n^3`` FLOPs) through
    ``route`` (one of :data:`GEMM_ROUTES`), the best of ``repeats`` timed products after
    one warm-up."""
    if route not in GEMM_ROUTES:
        raise ValueError(f'route must be one of {GEMM_ROUTES}, got {route!r}')
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if route == 'onednn':
        def product() -> None:
            torch.ops.mkldnn._linear_pointwise(a, b, None, 'none', [], '')
    else:
        def product() -> None:
            torch.mm(a, b)
    product()
    _sync(device)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _best_route(n: int, dtype: torch.dtype, device: str) -> dict:
    """GFLOP/s through every route available here: ``{route: GFLOP/s}``."""
    routes = [r for r in GEMM_ROUTES if r == 'mm' or onednn_gemm_available(device)]
    return {r: gemm_gflops(n, dtype, device, route=r) for r in routes}


def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, device: str = 'cpu', repeats: int = 3
                       ) -> float:
    """GB/s of a tensor copy of ``nbytes`` (read and write counted: ``2 * nbytes`` moved),
    the best of ``repeats``."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def measure_ceiling(device: str = 'cpu', threads: Optional[int] = None, n: Optional[int] = None,
                    copy_bytes: int = 256 * 2**20) -> dict:
    """``fp32_gflops``, ``bf16_gflops`` (the faster route of each), ``bandwidth_gbs`` and how
    they were measured (``gemm_n``, ``threads``, ``fp32_routes``/``bf16_routes``: GFLOP/s
    per route, ``bf16_native``: whether the CPU has bfloat16 instructions; where it has
    none the bf16 figure is the emulated one, at a smaller ``n``)."""
    from ..utils.cpu import cpu_has_native_bf16

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n = n or (8192 if device == 'cuda' else 2048)
        native = device == 'cuda' or cpu_has_native_bf16()
        fp32 = _best_route(n, torch.float32, device)
        bf16 = _best_route(n if native else max(256, n // 4), torch.bfloat16, device)
        out = dict(device=device, threads=torch.get_num_threads(), gemm_n=n,
                   fp32_gflops=max(fp32.values()), fp32_routes=fp32,
                   bf16_native=native,
                   bf16_gflops=max(bf16.values()), bf16_routes=bf16,
                   bandwidth_gbs=copy_bandwidth_gbs(copy_bytes, device))
    finally:
        torch.set_num_threads(previous)
    return out
