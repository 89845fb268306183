"""safetensors in and out: the converter writes it, every loading path reads it bit for bit,
and every malformed file is a CheckpointFormatError naming the file, on every path.

Bad files are made here byte by byte from a valid one (the header's JSON edited), so
each one is wrong in exactly the way its name says.
"""
import contextlib
import io
import json
import struct
import subprocess
import sys

import pytest
import timm
import torch

pytest.importorskip('safetensors', reason='safetensors (installed with timm) is needed')

from mmlinattn.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointFormatError,
    NoStateDictError,
    WeightsOnlyError,
    read_safetensors,
    read_safetensors_metadata,
    safe_load,
    use_safe_checkpoint_loader,
    write_safetensors,
)
from mmlinattn.engine.build import load_weights  # noqa: E402
from mmlinattn.models import InLinePVT, load_released  # noqa: E402

from .test_safe_reading import PATHS, REPO, TINY, _convert_tool, _run_path  # noqa: E402


def _load_weights_path(path):
    """What tools/infer_large.py and tools/deployment/export_onnx.py call."""
    load_weights(timm.create_model('inline_pvt_tiny', **TINY), str(path))


ALL_PATHS = dict(PATHS, load_weights=_load_weights_path)


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """A released-layout .pth of a tiny InLine-PVT (with an epoch next to the weights),
    its converted .safetensors, and the reference tensors."""
    root = tmp_path_factory.mktemp('released')
    torch.manual_seed(0)
    src = timm.create_model('inline_pvt_tiny', **TINY)
    reference = {k: v.clone() for k, v in src.state_dict().items()}
    pth = root / 'released.pth'
    torch.save({'model': src.state_dict(), 'epoch': 300}, pth)
    return root, pth, reference


def test_round_trip_pth_to_safetensors_on_every_loading_path(released, tmp_path) -> None:
    _, pth, reference = released
    full = tmp_path / 'full.safetensors'
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert _convert_tool().main([str(pth), str(full), '--keep-head']) == 0
    assert 'arch: not one of the arch table' in out.getvalue()  # TINY's custom widths
    meta = read_safetensors_metadata(full)
    assert meta['family'] == 'pvt' and meta['arch'] == 'unknown' and meta['head'] == 'kept'
    import hashlib
    assert meta['source_sha256'] == hashlib.sha256(pth.read_bytes()).hexdigest()

    def same(state, keys=None):
        for k in keys or reference:
            assert torch.equal(state[k], reference[k]), k

    same(safe_load(full))
    same(load_released(timm.create_model('inline_pvt_tiny', **TINY), str(full)).state_dict())
    same(timm.create_model('inline_pvt_tiny', pretrained=True, **TINY,
                           pretrained_cfg_overlay=dict(file=str(full))).state_dict())
    model = timm.create_model('inline_pvt_tiny', **TINY)
    load_weights(model, str(full))  # tools/infer_large.py, export_onnx.py
    same(model.state_dict())
    use_safe_checkpoint_loader()
    from mmengine.runner import CheckpointLoader  # load_from in tools/test.py, train.py
    same(CheckpointLoader.load_checkpoint(str(full), map_location='cpu')['state_dict'])
    # The backbone layout (head dropped), through init_cfg.
    backbone_file = tmp_path / 'backbone.safetensors'
    with contextlib.redirect_stdout(io.StringIO()):
        assert _convert_tool().main([str(pth), str(backbone_file)]) == 0
    assert read_safetensors_metadata(backbone_file)['head'] == 'dropped'
    backbone = InLinePVT('tiny', **TINY, init_cfg=dict(type='Pretrained',
                                                       checkpoint=str(backbone_file)))
    backbone.init_weights()
    same(backbone.state_dict(), [k for k in reference if not k.startswith('head.')])


def test_the_converter_names_the_arch_from_the_shapes() -> None:
    infer = _convert_tool().infer_arch
    small = InLinePVT('small').state_dict()
    head = timm.create_model('inline_pvt_tiny').state_dict()
    assert infer('pvt', small, head_kept=False) == 'small'
    assert infer('pvt', head, head_kept=True) == 'tiny'
    assert infer('pvt', {'block1.0.attn.q.weight': torch.zeros(3, 3)}, head_kept=False) is None


def test_position_tables_adapt_from_safetensors_as_from_pth(released, tmp_path) -> None:
    """224-px position tables loaded into a backbone built for 320 px: resized on load,
    the same from either file."""
    _, pth, _ = released
    st = tmp_path / 'w.safetensors'
    with contextlib.redirect_stdout(io.StringIO()):
        assert _convert_tool().main([str(pth), str(st)]) == 0
    models = []
    for path in (pth, st):
        m = InLinePVT('tiny', **TINY, pretrain_img_size=320,
                      init_cfg=dict(type='Pretrained', checkpoint=str(path)))
        m.init_weights()
        models.append(m.state_dict())
    for k, v in models[0].items():
        assert torch.equal(v, models[1][k]), k
    assert models[0]['pos_embed1'].shape[1] == (320 // 4) ** 2


def _edit(path, out, change):
    """A copy of ``path`` with its header JSON passed through ``change``."""
    data = path.read_bytes()
    (n, ) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    out.write_bytes(struct.pack('<Q', len(raw)) + raw + data[8 + n:])
    return out


@pytest.fixture(scope='module')
def bad_files(released):
    root, pth, reference = released
    good = root / 'good.safetensors'
    write_safetensors(good, reference)
    first = next(iter(reference))
    data = good.read_bytes()

    def shift_second_onto_first(h):
        names = sorted((k for k in h if k != '__metadata__'),
                       key=lambda k: h[k]['data_offsets'][1] - h[k]['data_offsets'][0])
        big, small = names[-1], next(k for k in names if h[k]['data_offsets'][1]
                                     > h[k]['data_offsets'][0])
        begin = h[big]['data_offsets'][0]
        size = h[small]['data_offsets'][1] - h[small]['data_offsets'][0]
        h[small]['data_offsets'] = [begin, begin + size]  # inside the largest tensor

    def out_of_range(h):
        begin, end = h[first]['data_offsets']
        h[first]['data_offsets'] = [begin + 10**9, end + 10**9]

    def unknown_dtype(h):
        h[first]['dtype'] = 'C128'

    files = {
        'truncated': root / 'truncated.safetensors',
        'header longer than the file': root / 'long_header.safetensors',
        'absurd header length': root / 'absurd.safetensors',
        'not json': root / 'not_json.safetensors',
        'overlapping offsets': _edit(good, root / 'overlap.safetensors',
                                     shift_second_onto_first),
        'offsets out of range': _edit(good, root / 'range.safetensors', out_of_range),
        'unknown dtype': _edit(good, root / 'dtype.safetensors', unknown_dtype),
        'size does not match the shape': _edit(
            good, root / 'shape.safetensors',
            lambda h: h[first].__setitem__('shape', [s + 1 for s in h[first]['shape']])),
    }
    files['truncated'].write_bytes(data[:len(data) - 100])
    (n, ) = struct.unpack('<Q', data[:8])
    files['header longer than the file'].write_bytes(struct.pack('<Q', len(data)) + data[8:])
    files['absurd header length'].write_bytes(struct.pack('<Q', 2**62) + data[8:])
    files['not json'].write_bytes(data[:8] + b'{' + b'\xff' * (n - 1) + data[8 + n:])
    return files


def test_bad_safetensors_files_are_format_errors_naming_the_file(bad_files) -> None:
    for name, path in bad_files.items():
        with pytest.raises(CheckpointFormatError) as info:
            read_safetensors(path)
        assert str(path) in str(info.value) and 'safetensors' in str(info.value), name


@pytest.mark.parametrize('path_name', sorted(ALL_PATHS))
def test_bad_safetensors_files_on_every_path(bad_files, path_name) -> None:
    for name, path in bad_files.items():
        error = _run_path(path_name, path) if path_name in PATHS else _catch(
            ALL_PATHS[path_name], path)
        assert isinstance(error, CheckpointError), (name, repr(error))
        assert str(path) in str(error), (name, str(error))


def _catch(fn, path):
    try:
        fn(path)
    except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
        return e
    return None


@pytest.mark.parametrize('path_name', sorted(set(ALL_PATHS) - {'safe_load'}))
def test_a_file_without_a_state_dict_is_a_checkpoint_error_everywhere(tmp_path,
                                                                      path_name) -> None:
    empty = tmp_path / 'no_weights.pth'
    torch.save({'epoch': 3, 'note': 'weights elsewhere'}, empty)
    no_tensors = tmp_path / 'no_tensors.safetensors'
    write_safetensors(no_tensors, {})
    for path in (empty, no_tensors):
        error = _run_path(path_name, path) if path_name in PATHS else _catch(
            ALL_PATHS[path_name], path)
        assert isinstance(error, CheckpointError), (path, repr(error))
        assert str(path) in str(error), (path, str(error))
    with pytest.raises(NoStateDictError):
        from mmlinattn.checkpoint import extract_state_dict
        extract_state_dict(safe_load(empty), source=str(empty))


def test_resume_from_safetensors_is_refused_clearly(released, tmp_path) -> None:
    _, pth, reference = released
    st = tmp_path / 'w.safetensors'
    write_safetensors(st, reference)
    from mmengine.config import Config

    from mmlinattn.engine.launch import build_runner
    cfg = Config(dict(resume=True, load_from=str(st), work_dir=str(tmp_path)))
    with pytest.raises(WeightsOnlyError, match='resume needs'):
        build_runner(cfg)


def test_convert_cli_help_recommends_safetensors() -> None:
    proc = subprocess.run([sys.executable, str(REPO / 'tools/convert_checkpoint.py'), '--help'],
                          capture_output=True, text=True, check=True)
    assert 'safetensors (recommended' in proc.stdout.replace('\n', ' ').replace('  ', ' ')
