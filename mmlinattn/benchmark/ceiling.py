"""What this machine can do at most, measured in the benchmark's own run: the FLOP/s of a
large matrix product in float32 and in bfloat16 (the GEMM ceiling: what dense matrix work
reaches through the same PyTorch and oneDNN/cuBLAS), and the memory bandwidth of a large
copy. Every case's achieved FLOP/s is then reported as a share of its dtype's ceiling,
as roofline reports do.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

__all__ = ['measure_ceiling', 'gemm_gflops', 'copy_bandwidth_gbs']


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def gemm_gflops(n: int, dtype: torch.dtype, device: str = 'cpu', repeats: int = 3) -> float:
    """GFLOP/s of an ``n x n`` by ``n x n`` matrix product (``2 n^3`` FLOPs), the best of
    ``repeats`` timed products after one warm-up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


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
    """``fp32_gflops``, ``bf16_gflops``, ``bandwidth_gbs`` and how they were measured
    (``gemm_n``, ``threads``, ``bf16_native``: whether the CPU has bfloat16 instructions;
    where it has none the bf16 figure is the emulated one, at a smaller ``n``)."""
    from ..utils.cpu import cpu_has_native_bf16

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n = n or (8192 if device == 'cuda' else 2048)
        native = device == 'cuda' or cpu_has_native_bf16()
        out = dict(device=device, threads=torch.get_num_threads(), gemm_n=n,
                   fp32_gflops=gemm_gflops(n, torch.float32, device),
                   bf16_native=native,
                   bf16_gflops=gemm_gflops(n if native else max(256, n // 4), torch.bfloat16,
                                           device),
                   bandwidth_gbs=copy_bandwidth_gbs(copy_bytes, device))
    finally:
        torch.set_num_threads(previous)
    return out
