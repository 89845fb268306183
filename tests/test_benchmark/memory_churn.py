"""A benchmark-worker stand-in for the memory tests: churns or holds large buffers.

    python memory_churn.py LIMIT_MIB churn|hold

Run under the runner's steady-malloc environment. ``churn`` allocates and frees
buffers, each larger than any hole left before it, with a small pinned block
after each: the heap fragments and RSS grows to the sum of all buffers while
memory in use stays at about one. ``hold`` keeps every buffer. Prints one result
line with the worker's prefix (or the watch prints its ``oom`` line and exits).
"""
import json
import resource
import sys

import torch

from mmlinattn.benchmark.memory import MemoryWatch
from mmlinattn.benchmark.worker import MEMORY_SAMPLE_S, RESULT_PREFIX

MiB = 2**20


def main(limit_mib: int, mode: str) -> None:
    kept, pins = [], []
    with MemoryWatch(limit_mib * MiB, MEMORY_SAMPLE_S, result_prefix=RESULT_PREFIX) as watch:
        for i in range(8):
            buf = torch.ones((40 + 4 * i) * MiB // 4)
            pins.append(torch.ones(1024))
            if mode == 'hold':
                kept.append(buf)
            del buf
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(RESULT_PREFIX + json.dumps(dict(status='ok', peak_in_use=watch.peak,
                                          peak_rss=peak_rss)), flush=True)


if __name__ == '__main__':
    main(int(sys.argv[1]), sys.argv[2])
