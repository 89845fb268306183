"""The train/test tools destroy the process group before exiting, after success or error."""
import pytest
import torch.distributed as dist

from mmlinattn.engine.launch import process_group_lifetime


def _start_group(tmp_path) -> None:
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    assert dist.is_initialized()


def test_group_destroyed_after_success(tmp_path):
    with process_group_lifetime():
        _start_group(tmp_path)
    assert not dist.is_initialized()


def test_group_destroyed_after_error_and_error_kept(tmp_path):
    with pytest.raises(RuntimeError, match='loss is nan'), process_group_lifetime():
        _start_group(tmp_path)
        raise RuntimeError('loss is nan')
    assert not dist.is_initialized()


def test_no_group_is_fine():
    with process_group_lifetime():
        pass
    assert not dist.is_initialized()
