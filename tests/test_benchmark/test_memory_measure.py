"""The out-of-memory judgement uses memory in use, which freed-but-kept memory does not inflate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmlinattn.benchmark.memory import heap_in_use_bytes, in_use_measure
from mmlinattn.benchmark.runner import STEADY_MALLOC_ENV
from mmlinattn.benchmark.worker import RESULT_PREFIX

CHURN = Path(__file__).with_name('memory_churn.py')
LIMIT_MIB = 400  # about 170 MiB in use after importing torch; buffers of 40-68 MiB


def _run(mode: str) -> dict:
    env = dict(os.environ, **STEADY_MALLOC_ENV)  # as the runner starts its workers
    proc = subprocess.run([sys.executable, str(CHURN), str(LIMIT_MIB), mode],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


@pytest.mark.skipif(not in_use_measure().startswith('heap'), reason='needs glibc mallinfo2')
def test_freed_memory_kept_by_the_heap_is_not_out_of_memory():
    result = _run('churn')
    assert result['status'] == 'ok', result
    assert result['peak_in_use'] < LIMIT_MIB * 2**20
    # The same worker judged by RSS would have been called out of memory.
    assert result['peak_rss'] > LIMIT_MIB * 2**20, result


def test_holding_more_than_the_limit_is_out_of_memory():
    result = _run('hold')
    assert result['status'] == 'oom', result
    assert result['in_use_gib'] > LIMIT_MIB / 1024
    assert f'{LIMIT_MIB / 1024:.3g} GiB limit' in result['error']


def test_in_use_follows_allocation_and_release():
    import torch

    before = heap_in_use_bytes()
    buf = torch.ones(64 * 2**20 // 4)
    during = heap_in_use_bytes()
    del buf
    after = heap_in_use_bytes()
    assert during - before >= 60 * 2**20
    assert during - after >= 60 * 2**20
