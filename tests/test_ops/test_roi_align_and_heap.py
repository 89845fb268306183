"""RoIAlign over all cores equals mmcv's, bit for bit; the large-image tool's opt-in heap
policy keeps freed memory."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mmlinattn.ops.roi_align import MIN_ROIS_PER_THREAD, threaded_roi_align


def _rois(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size * 1.2) - size * 0.1  # some outside the map
    wh = torch.rand(n, 2, generator=g) * size * 0.5 + 0.5
    batch = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], 1)


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_threaded_roi_align_is_mmcv_roi_align(aligned, sampling_ratio):
    from mmcv.ops import roi_align

    feats = torch.randn(2, 8, 24, 32)
    rois = _rois(3 * MIN_ROIS_PER_THREAD + 5, 128, 0)
    want = roi_align(feats, rois, (7, 7), 0.25, sampling_ratio, 'avg', aligned)
    got = threaded_roi_align(feats, rois, (7, 7), 0.25, sampling_ratio, aligned, threads=3)
    assert torch.equal(got, want)


def test_threaded_roi_pooling_takes_over_and_restores():
    from mmcv.ops import RoIAlign

    from mmlinattn.engine.tiled_detection import threaded_roi_pooling

    model = torch.nn.ModuleDict(dict(avg=RoIAlign((7, 7), 0.25, 0),
                                     max=RoIAlign((7, 7), 0.25, 0, pool_mode='max')))
    feats, rois = torch.randn(2, 4, 16, 16), _rois(200, 64, 1)
    want = model['avg'](feats, rois)
    with threaded_roi_pooling(model) as taken:
        assert taken == 1  # max pooling is not torchvision's: left as it is
        assert 'forward' in vars(model['avg'])
        assert torch.equal(model['avg'](feats, rois), want)
    assert 'forward' not in vars(model['avg'])


def test_heap_keeps_freed_memory():
    """In a process of its own (the policy is process-wide): 256 MiB freed stay in the
    heap as free chunks instead of going back to the system."""
    code = textwrap.dedent('''
        import ctypes, ctypes.util
        from mmlinattn.benchmark.memory import _MALLINFO2
        from mmlinattn.utils.heap import keep_freed_memory
        if _MALLINFO2 is None or not keep_freed_memory():
            print('SKIP'); raise SystemExit
        import torch
        t = torch.ones(64 * 2**20)  # 256 MiB
        del t
        free = _MALLINFO2().fordblks
        assert free >= 255 * 2**20, free
        print('OK', free)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith('SKIP'):
        pytest.skip('not glibc >= 2.33')
    assert out.stdout.startswith('OK')


def test_reused_heap_takes_freed_buffers_again_then_gives_the_pages_back():
    """In a process of its own: with glibc's defaults each of eight 64 MiB buffers in a
    row is faulted in (glibc maps buffers over 32 MiB and unmaps them when freed);
    inside ``reused_heap`` only the first is; when the block ends the free pages go
    back to the system (resident memory back to where it was). (After the block the
    heap's free chunks, their pages given back, may serve such buffers again before
    glibc maps new ones: what happens then depends on the heap's layout.)"""
    code = textwrap.dedent('''
        import resource
        import torch
        from mmlinattn.benchmark.memory import anon_rss_bytes
        from mmlinattn.utils.heap import reused_heap

        def faults(n=8):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(n):
                t = torch.ones(16 * 2**20)  # 64 MiB, every page written
                del t
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        pages = 64 * 2**20 // resource.getpagesize()
        outside = faults()  # glibc's defaults, in a fresh process
        base = anon_rss_bytes()
        with reused_heap() as applied:
            if not applied:
                print('SKIP'); raise SystemExit
            inside = faults()
            held = anon_rss_bytes() - base
        after = anon_rss_bytes() - base
        print('OK', inside, outside, pages, held, after)
        assert inside < 2 * pages, (inside, pages)
        assert outside > 7 * pages, (outside, pages)
        assert held >= 60 * 2**20 and after < 16 * 2**20, (held, after)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    if out.stdout.startswith('SKIP'):
        pytest.skip('not glibc')
    assert out.stdout.startswith('OK')


def test_retained_bound_follows_what_the_first_step_keeps():
    """In a process of its own, under ``reused_heap``: steps that each write and free
    the same 64 MiB buffer are not trimmed by a :class:`RetainedBound` (the buffer is
    taken again: at most one of three faulted in, as glibc places chunks), although
    its ``slack`` is 0 (a fixed bound of 0 bytes trims after every step, and the next
    step faults the whole buffer in again);
    a step that leaves much more resident than the first is trimmed back under the
    bound. (What the process keeps besides the heap, a few hundred MiB after importing
    torch, counts as kept: the bound is relative to it.)"""
    code = textwrap.dedent('''
        import resource
        import torch
        from mmlinattn.utils.heap import RetainedBound, retained_bytes, reused_heap, trim_retained

        def step(mib):
            t = torch.ones(mib * 2**18)  # mib MiB, every page written
            del t

        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        pages = 64 * 2**20 // resource.getpagesize()
        with reused_heap() as applied:
            if not applied or retained_bytes() is None:
                print('SKIP'); raise SystemExit
            bound = RetainedBound(slack=0)
            step(64)
            step(64)  # glibc may take a second chunk before it reuses one
            first = bound()
            before = faults()
            kept = []
            for _ in range(3):
                step(64)
                kept.append(bound())
            reused = faults() - before
            step(1024)
            grown = bound()
            after = retained_bytes()
            # The fixed bound of the same slack: trims, then the buffer faults in again.
            step(64)
            fixed = trim_retained(0)
            before = faults()
            step(64)
            refaulted = faults() - before
        print('OK', first, kept, reused, grown, after, bound.bound, fixed, refaulted, pages)
        assert not first and kept == [False] * 3, (first, kept)
        assert reused < 2 * pages, (reused, pages)  # trimmed each time: 3 buffers' pages
        assert grown and after <= bound.bound, (grown, after, bound.bound)
        assert fixed and refaulted > pages // 2, (fixed, refaulted, pages)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    if out.stdout.startswith('SKIP'):
        pytest.skip('not glibc >= 2.33')
    assert out.stdout.startswith('OK')
