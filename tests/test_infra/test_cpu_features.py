"""bf16 on a CPU without bf16 instructions is named as emulated, not silently slow."""
import pytest

from mmlinattn.utils import cpu as cpu_module


@pytest.mark.parametrize('flags,native', [(frozenset({'avx2', 'fma'}), False),
                                          (frozenset({'avx512f', 'avx512_bf16'}), True),
                                          (frozenset({'amx_bf16'}), True), (None, True)])
def test_native_bf16_from_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(cpu_module, 'cpu_flags', lambda: flags)
    assert cpu_module.cpu_has_native_bf16() is native


def test_benchmark_notes_emulated_bf16(monkeypatch):
    from mmlinattn.benchmark.worker import measure

    monkeypatch.setattr(cpu_module, 'cpu_flags', lambda: frozenset({'avx2'}))
    result = measure(dict(level='attention', contender='inline', size=8, batch=1, device='cpu',
                          dtype='bf16', compile=False, threads=None, warmup=1, repeats=1,
                          budget_s=10, flops=False))
    assert result['status'] == 'ok' and 'emulated' in result['note']
