"""End to end through the real tools on tiny synthetic datasets: train with validation,
test computing the real metric, resume, mixed precision, drawing, distributed, bad input."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmdet.models', reason='mmdet with a compiled mmcv is needed')
pytest.importorskip('mmseg.models', reason='mmseg is needed')

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / 'tools'
DET_CFG = REPO / 'configs/tiny/mask-rcnn_inline-pvt-t_fpn_300i_tiny-coco.py'
SEG_CFG = REPO / 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'
FAST = ['train_dataloader.batch_size=2']

pytestmark = pytest.mark.slow


def _run(args, check=True, timeout=600, env=None):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                             f'{proc.stderr[-5000:]}')
    return proc


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    _run([TOOLS / 'make_tiny_dataset.py', 'coco', root / 'coco', '--num-train', '4',
          '--num-val', '2', '--size', '96', '128', '--mask-format', 'rle'])
    _run([TOOLS / 'make_tiny_dataset.py', 'ade20k', root / 'ade', '--num-train', '4',
          '--num-val', '2', '--size', '96', '96'])
    return root


def _det_config(tmp_path, data):
    cfg = tmp_path / 'det.py'
    cfg.write_text(f"""_base_ = '{DET_CFG}'
data_root = '{data / 'coco'}/'
scale = (128, 96)
train_dataloader = dict(dataset=dict(data_root=data_root, pipeline=[
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=scale, keep_ratio=True), dict(type='PackDetInputs')]))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
# A model trained for two iterations scores below the default threshold; keep every
# detection so that the COCO metric has results to evaluate.
model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0)))
""")
    return cfg


def _seg_config(tmp_path, data):
    cfg = tmp_path / 'seg.py'
    cfg.write_text(f"""_base_ = '{SEG_CFG}'
data_root = '{data / 'ade'}'
crop_size = (96, 96)
model = dict(data_preprocessor=dict(size=crop_size))
train_dataloader = dict(dataset=dict(data_root=data_root, pipeline=[
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomCrop', crop_size=crop_size), dict(type='PackSegInputs')]))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
""")
    return cfg


def _iters(n, val=None):
    return [f'train_cfg.max_iters={n}', f'train_cfg.val_interval={val or n}',
            'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1']


def test_detector_train_validate_test_resume(tmp_path, data):
    cfg, work = _det_config(tmp_path, data), tmp_path / 'work'
    out = _run([TOOLS / 'train.py', cfg, '--work-dir', work, '--cfg-options', *FAST, *_iters(2)])
    assert (work / 'iter_2.pth').is_file()
    log = '\n'.join(p.read_text() for p in work.rglob('*.log'))
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log, out.stdout[-2000:]
    test = _run([TOOLS / 'test.py', cfg, work / 'iter_2.pth', '--work-dir', tmp_path / 'test',
                 '--show-dir', 'vis'])
    assert re.search(r'coco/bbox_mAP=[0-9.]+', test.stdout)
    assert re.search(r'coco/segm_mAP=[0-9.]+', test.stdout)
    assert list((tmp_path / 'test').rglob('vis/*.jpg')), 'no drawn predictions'
    resumed = _run([TOOLS / 'train.py', cfg, '--work-dir', work, '--resume', '--cfg-options',
                    *FAST, *_iters(4)])
    assert (work / 'iter_4.pth').is_file()
    assert 'resumed' in (resumed.stdout + resumed.stderr).lower()
    assert 'Iter(train) [3/4]' in resumed.stdout + resumed.stderr
    assert 'Iter(train) [1/4]' not in resumed.stdout + resumed.stderr


def test_segmenter_train_validate_test_resume_amp(tmp_path, data):
    cfg, work = _seg_config(tmp_path, data), tmp_path / 'work'
    _run([TOOLS / 'train.py', cfg, '--work-dir', work, '--cfg-options', *FAST, *_iters(2)])
    assert (work / 'iter_2.pth').is_file()
    test = _run([TOOLS / 'test.py', cfg, work / 'iter_2.pth', '--work-dir', tmp_path / 'test',
                 '--show-dir', tmp_path / 'vis'])
    assert re.search(r'mIoU=[0-9.]+', test.stdout), test.stdout[-2000:]
    assert list((tmp_path / 'vis').rglob('*.png')), 'no drawn predictions'
    resumed = _run([TOOLS / 'train.py', cfg, '--work-dir', work, '--resume',
                    str(work / 'iter_2.pth'), '--cfg-options', *FAST, *_iters(3)])
    assert 'Iter(train) [3/3]' in resumed.stdout + resumed.stderr
    # --force-bf16: on a CPU that emulates bf16 (AVX2 only) --amp is refused otherwise.
    amp = _run([TOOLS / 'train.py', cfg, '--work-dir', tmp_path / 'amp', '--amp', '--force-bf16',
                '--cfg-options', *FAST, *_iters(2)])
    assert 'CPUAutocastOptimWrapper' in amp.stdout
    assert (tmp_path / 'amp' / 'iter_2.pth').is_file()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_distributed_training_and_testing(tmp_path, data):
    """torchrun with two gloo processes, through the shipped launchers; every rank must
    exit 0 (a process group left alive at exit used to abort a finished job)."""
    cfg, work = _det_config(tmp_path, data), tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(_free_port()), PYTHON=sys.executable)
    train = subprocess.run(
        ['bash', str(TOOLS / 'dist_train.sh'), str(cfg), '2', '--work-dir', str(work),
         '--cfg-options', 'train_dataloader.batch_size=1', *_iters(2)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert train.returncode == 0, train.stderr[-5000:]
    log = '\n'.join(p.read_text() for p in work.rglob('*.log'))
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert 'mmlinattn.CPUDistributedDataParallel' in log  # gloo DDP over two processes
    assert (work / 'iter_2.pth').is_file()
    env['PORT'] = str(_free_port())
    test = subprocess.run(
        ['bash', str(TOOLS / 'dist_test.sh'), str(cfg), str(work / 'iter_2.pth'), '2',
         '--work-dir', str(tmp_path / 'test')],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert test.returncode == 0, test.stderr[-5000:]
    assert re.search(r'coco/bbox_mAP=[0-9.]+', test.stdout + test.stderr)


def test_spatially_parallel_training_two_ranks_one_image(tmp_path, data):
    """``spatial_parallel.size=2``: two gloo processes share each image's rows, through
    dist_train.sh; the wrapper, sampler and worker seeds are switched on by the config."""
    cfg, work = _seg_config(tmp_path, data), tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(_free_port()), PYTHON=sys.executable)
    train = subprocess.run(
        ['bash', str(TOOLS / 'dist_train.sh'), str(cfg), '2', '--work-dir', str(work),
         '--cfg-options', 'spatial_parallel.size=2', 'train_dataloader.batch_size=1',
         *_iters(2)], capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert train.returncode == 0, train.stderr[-5000:]
    log = '\n'.join(p.read_text() for p in work.rglob('*.log'))
    assert 'mmlinattn.SpatialParallelWrapper' in log and 'SpatialGroupSampler' in log
    assert re.search(r'Iter\(train\) \[2/2\].*decode\.loss_ce: [0-9.]+', log)
    assert re.search(r'mIoU: [0-9.]+', log)


def test_spatially_parallel_testing_gives_the_one_process_metrics(tmp_path, data):
    """dist_test.sh with ``spatial_parallel.size=2``: each image's rows over the two ranks
    (each rank's image in turn); the metrics equal one process testing the same weights."""
    cfg, work = _seg_config(tmp_path, data), tmp_path / 'work'
    _run([TOOLS / 'train.py', cfg, '--work-dir', work, '--cfg-options', *FAST, *_iters(2)])
    one = _run([TOOLS / 'test.py', cfg, work / 'iter_2.pth', '--work-dir', tmp_path / 'one'])
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(_free_port()), PYTHON=sys.executable)
    two = subprocess.run(
        ['bash', str(TOOLS / 'dist_test.sh'), str(cfg), str(work / 'iter_2.pth'), '2',
         '--work-dir', str(tmp_path / 'two'), '--cfg-options', 'spatial_parallel.size=2'],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-5000:]
    metrics = [dict(re.findall(r'(aAcc|mIoU|mAcc)=([0-9.]+)', p.stdout + p.stderr))
               for p in (one, two)]
    assert metrics[0] and metrics[0] == metrics[1], metrics
    assert 'SpatialParallelWrapper' in two.stdout + two.stderr


def test_spatial_parallel_without_launcher_is_refused(tmp_path, data):
    proc = _run([TOOLS / 'train.py', _seg_config(tmp_path, data), '--work-dir', tmp_path,
                 '--cfg-options', 'spatial_parallel.size=2'], check=False)
    assert proc.returncode != 0 and 'needs a distributed launch' in proc.stderr


def test_missing_data_root_is_named(tmp_path):
    proc = _run([TOOLS / 'train.py', DET_CFG, '--work-dir', tmp_path, '--cfg-options',
                 'train_dataloader.dataset.data_root=/nonexistent/coco/'], check=False)
    assert proc.returncode != 0
    assert "data_root '/nonexistent/coco/' does not exist" in proc.stderr


def test_non_finite_loss_stops_training(tmp_path, data):
    cfg = _seg_config(tmp_path, data)
    proc = _run([TOOLS / 'train.py', cfg, '--work-dir', tmp_path / 'work', '--cfg-options',
                 *FAST, *_iters(3), 'model.data_preprocessor.std=[0,0,0]'], check=False)
    assert proc.returncode != 0
    assert 'non-finite loss at iteration 1' in proc.stderr, proc.stderr[-3000:]


def test_unknown_backbone_argument_is_named(tmp_path, data):
    cfg = _seg_config(tmp_path, data)
    proc = _run([TOOLS / 'train.py', cfg, '--work-dir', tmp_path / 'work', '--cfg-options',
                 'model.backbone.windw=7'], check=False)
    assert proc.returncode != 0
    assert "unexpected keyword argument 'windw'" in proc.stderr
