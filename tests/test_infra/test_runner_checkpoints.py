"""Runner checkpoints load under torch >= 2.6's weights_only default; foreign objects do not."""
import pickle

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import mmlinattn  # noqa: F401  (allow-lists the runner checkpoint types)


class _Regression(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x, y=None, mode='tensor'):
        out = self.fc(x)
        if mode == 'loss':
            return dict(loss=((out - y)**2).mean())
        return out


class _Points(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(x=torch.full((2, ), float(i)), y=torch.ones(1))


def _runner(work_dir, max_iters, resume=False):
    return Runner(
        model=_Regression(), work_dir=str(work_dir), experiment_name=f'exp{max_iters}{resume}',
        train_dataloader=dict(dataset=_Points(), batch_size=2, collate_fn=dict(
            type='default_collate'), sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        resume=resume, default_scope='mmengine')


def test_runner_checkpoint_resumes(tmp_path):
    first = _runner(tmp_path, 4)
    first.train()
    ckpt = tmp_path / 'iter_4.pth'
    assert ckpt.is_file()
    # torch's default (weights_only=True) now reads what the runner wrote ...
    state = torch.load(ckpt)
    assert state['meta']['iter'] == 4 and 'message_hub' in state
    # ... and a new runner resumes from it, continuing at iteration 4.
    second = _runner(tmp_path, 6, resume=True)
    second.train()
    assert second.iter == 6
    torch.testing.assert_close(torch.load(tmp_path / 'iter_6.pth')['meta']['iter'], 6)
    log = (tmp_path / 'last_checkpoint').read_text()
    assert log.strip().endswith('iter_6.pth')


class _Payload:
    def __reduce__(self):
        return (print, ('this must never run', ))


def test_unexpected_pickled_object_is_refused(tmp_path):
    path = tmp_path / 'foreign.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'extra': _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match='builtins.print|Unsupported global'):
        torch.load(path)


def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path):
    class _Evil:
        def __reduce__(self):
            return (getattr, (torch.Tensor, 'tolist'))

    path = tmp_path / 'getattr.pth'
    torch.save({'x': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match='refused getattr'):
        torch.load(path)


def test_runner_resumes_through_the_safe_loader(tmp_path):
    """What tools/train.py does: mmengine's local loader replaced by mmlinattn's reader."""
    from mmengine.runner import CheckpointLoader

    from mmlinattn.checkpoint import use_safe_checkpoint_loader
    from mmlinattn.checkpoint.runner import _mmengine_local_loader

    _runner(tmp_path, 4).train()
    use_safe_checkpoint_loader()
    assert CheckpointLoader._get_checkpoint_loader(str(tmp_path / 'iter_4.pth')) is \
        _mmengine_local_loader
    resumed = _runner(tmp_path, 6, resume=True)
    resumed.train()
    assert resumed.iter == 6
    # The message hub's history (HistoryBuffer objects) came back through our reader.
    assert len(resumed.message_hub.get_scalar('train/lr').data[0]) >= 4
