"""What ``tools/train.py`` and ``tools/test.py`` share: config options, checks, runner.

The config's ``default_scope`` (``mmdet`` or ``mmseg``, set by the upstream base
configs) decides which library's datasets, models and metrics are used; one pair
of tools serves both.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from mmengine.config import Config, ConfigDict, DictAction

__all__ = [
    'add_common_arguments', 'load_config', 'check_data_roots', 'add_safety_hooks',
    'enable_amp', 'add_fault_tolerance', 'build_runner', 'import_project',
    'process_group_lifetime', 'SAFETY_HOOKS', 'COLLECTIVE_TIMEOUT_S'
]

SAFETY_HOOKS = ('mmlinattn.FiniteLossHook', 'mmlinattn.ModelSanityHook')
#: Seconds a collective of a train or test run waits for the other ranks before every
#: rank fails naming the operation (torch's default is 30 minutes); the config's
#: ``env_cfg.dist_cfg.timeout`` sets it.
COLLECTIVE_TIMEOUT_S = 300


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs and checkpoints')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config keys, e.g. model.backbone.with_cp=True '
        'train_dataloader.batch_size=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher (torchrun uses "pytorch")')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(path: str, args: argparse.Namespace) -> Config:
    """Read a config, apply ``--cfg-options`` and ``--launcher``, choose the work dir."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = Config.fromfile(path)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    if args.launcher != 'none':
        env = cfg.get('env_cfg') or ConfigDict()
        env.setdefault('dist_cfg', ConfigDict())
        env.dist_cfg.setdefault('timeout', COLLECTIVE_TIMEOUT_S)
        cfg.env_cfg = env
        _use_cpu_distributed_if_no_gpu(cfg)  # needs cfg.launcher
    if cfg.get('spatial_parallel'):  # one image over several ranks (engine/spatial.py)
        from .spatial import configure_spatial_parallel
        configure_spatial_parallel(cfg)
    if cfg.get('default_scope') not in ('mmdet', 'mmseg'):
        raise ValueError(f'{path}: default_scope is {cfg.get("default_scope")!r}; expected '
                         "'mmdet' or 'mmseg' (inherit an mmdet:: or mmseg:: base config)")
    return cfg


def _use_cpu_distributed_if_no_gpu(cfg: Config) -> None:
    """Without a GPU, torchrun jobs use gloo and a CPU-capable DDP wrapper."""
    import torch

    if torch.cuda.is_available():
        return
    env = cfg.get('env_cfg') or ConfigDict()
    env.setdefault('dist_cfg', ConfigDict())
    env.dist_cfg.backend = 'gloo'
    cfg.env_cfg = env
    # mmengine's init_dist calls torch.cuda.set_device unconditionally; with no GPU
    # the process group is started here (the runner then finds it initialised).
    if cfg.launcher == 'pytorch' and not torch.distributed.is_initialized():
        import datetime
        torch.distributed.init_process_group(
            backend='gloo', timeout=datetime.timedelta(seconds=env.dist_cfg.timeout))
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = ConfigDict(
            type='mmlinattn.CPUDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def _datasets(cfg: Config, loaders: Iterable[str]) -> Iterable[tuple[str, Any]]:
    for name in loaders:
        loader = cfg.get(name)
        if not loader:
            continue
        stack = [loader.get('dataset')]
        while stack:
            ds = stack.pop()
            if isinstance(ds, (list, tuple)):
                stack.extend(ds)
            elif isinstance(ds, dict):
                if 'dataset' in ds or 'datasets' in ds:  # Repeat/ClassBalanced/Concat wrappers
                    stack.append(ds.get('dataset', ds.get('datasets')))
                else:
                    yield name, ds


def check_data_roots(cfg: Config, loaders: Iterable[str]) -> None:
    """Fail early, naming the path, when a dataset's ``data_root`` or annotation file is missing."""
    for loader, ds in _datasets(cfg, loaders):
        root = ds.get('data_root') or ''
        if root and not osp.isdir(root):
            raise FileNotFoundError(
                f'{loader}: data_root {root!r} does not exist. Put the dataset there (see '
                'docs/get_started.md), pass --cfg-options with the right data_root, or make a '
                'tiny synthetic one with tools/make_tiny_dataset.py')
        ann = ds.get('ann_file')
        if ann:
            path = ann if osp.isabs(ann) or not root else osp.join(root, ann)
            if not osp.isfile(path) and not osp.isdir(path):
                raise FileNotFoundError(f'{loader}: annotation file {path!r} does not exist')


def add_safety_hooks(cfg: Config) -> None:
    """Append the non-finite-loss and channel-check hooks unless the config has them."""
    hooks = list(cfg.get('custom_hooks') or [])
    present = {h.get('type') for h in hooks}
    for hook in SAFETY_HOOKS:
        if hook not in present and hook.split('.')[-1] not in present:
            hooks.append(ConfigDict(type=hook))
    cfg.custom_hooks = hooks


def add_fault_tolerance(cfg: Config) -> None:
    """mmengine's checkpoint hook becomes :class:`~mmlinattn.engine.resume.
    ResumableCheckpointHook` (atomic files, exact resume) and its optimizer wrapper
    :class:`~mmlinattn.engine.optim.FiniteOptimWrapper` (no step on non-finite values
    of any rank); other types a config names are kept."""
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if checkpoint is not None and checkpoint.get('type') in ('CheckpointHook',
                                                             'mmengine.CheckpointHook'):
        checkpoint.type = 'mmlinattn.ResumableCheckpointHook'
    wrapper = cfg.get('optim_wrapper')
    if wrapper is not None and wrapper.get('type', 'OptimWrapper') in ('OptimWrapper',
                                                                      'mmengine.OptimWrapper'):
        wrapper.type = 'mmlinattn.FiniteOptimWrapper'


def enable_amp(cfg: Config, gpu_dtype: str = 'float16') -> str:
    """Mixed precision: mmengine's AmpOptimWrapper on a GPU (``gpu_dtype``: float16 with
    dynamic loss scaling, or bfloat16), bf16 CPU autocast otherwise."""
    import torch

    wrapper = cfg.optim_wrapper
    if wrapper.get('type', 'OptimWrapper') in ('AmpOptimWrapper',
                                               'mmlinattn.CPUAutocastOptimWrapper'):
        return wrapper.type
    if torch.cuda.is_available():
        wrapper.type = 'AmpOptimWrapper'
        if gpu_dtype == 'bfloat16':
            wrapper.dtype = 'bfloat16'  # fp32's exponent range: no loss scaling
        else:
            wrapper.loss_scale = 'dynamic'
    else:
        wrapper.type = 'mmlinattn.CPUAutocastOptimWrapper'
        wrapper.dtype = 'bfloat16'
    return wrapper.type


def build_runner(cfg: Config) -> Any:
    """The config's runner, reading checkpoints (``load_from``, ``resume``) with our safe reader."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from ..checkpoint import WeightsOnlyError, is_safetensors, use_safe_checkpoint_loader

    use_safe_checkpoint_loader()
    load_from = cfg.get('load_from')
    if cfg.get('resume') and load_from and os.path.isfile(load_from) and \
            is_safetensors(load_from):
        raise WeightsOnlyError(load_from, 'a safetensors file holds weights only; resume needs '
                               "the runner's .pth (optimizer, scheduler, iteration). Use it as "
                               'load_from (tools/test.py, or train without --resume)')
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


@contextmanager
def process_group_lifetime() -> Iterator[None]:
    """Tear the default process group down before the interpreter exits.

    Neither mmengine's runner nor torchrun destroys it. With torch 2.14 a gloo group
    still alive at interpreter shutdown lets a worker thread abort the process
    ("terminate called without an active exception", pytorch/pytorch#190489): a job
    that had finished, checkpoint written, exits with SIGABRT in about one run in four.
    On success the ranks meet at a barrier first, so none leaves while another still
    works; after an error the group is destroyed without waiting for the others.
    """
    import torch.distributed as dist

    def initialised() -> bool:
        return dist.is_available() and dist.is_initialized()

    try:
        yield
    except BaseException:
        if initialised():
            dist.destroy_process_group()
        raise
    if initialised():
        dist.barrier()
        dist.destroy_process_group()


def import_project() -> None:
    """Import mmlinattn (and its registrations) before any config is built."""
    import mmlinattn  # noqa: F401
