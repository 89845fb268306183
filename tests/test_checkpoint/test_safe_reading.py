"""No checkpoint runs code, on any loading path; bad files get one clear error; nothing valid drops.

Each payload would create ``marker`` if it ran (``payloads.live`` shows that it
does under a plain unpickling); every test asserts the marker is absent after
the loading path under test.
"""
import contextlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import mmlinattn  # noqa: F401  (registers the timm models)
from mmlinattn.checkpoint import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    UntrustedObject,
    extract_state_dict,
    load_runner_checkpoint,
    safe_load,
    use_safe_checkpoint_loader,
)
from mmlinattn.models import InLinePVT, load_released

from . import payloads

REPO = Path(__file__).resolve().parents[2]
CONVERT = REPO / 'tools' / 'convert_checkpoint.py'
# A small InLine-PVT: the weights next to the payloads, and the model every path loads into.
TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1))


# -- the loading paths --------------------------------------------------------------------
def _via_safe_load(path):
    return safe_load(path)


def _via_backbone_init_cfg(path):
    InLinePVT('tiny', **TINY, init_cfg=dict(type='Pretrained',
                                            checkpoint=str(path))).init_weights()


def _via_timm_classifier(path):
    timm.create_model('inline_pvt_tiny', pretrained=True,
                      pretrained_cfg_overlay=dict(file=str(path)), **TINY)


def _via_load_released(path):
    load_released(timm.create_model('inline_pvt_tiny', **TINY), str(path))


def _via_mmengine_loader(path):  # what load_from / resume reach in tools/train.py, test.py
    from mmengine.runner import CheckpointLoader

    use_safe_checkpoint_loader()
    CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


def _convert_tool():
    spec = importlib.util.spec_from_file_location('convert_checkpoint', CONVERT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _via_convert_tool(path):
    """tools/convert_checkpoint.py's main, in process (one CLI run is tested below)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = _convert_tool().main([str(path), str(path) + '.out'])
    if status:
        assert str(path) in stderr.getvalue()
        raise CheckpointError(stderr.getvalue())


PATHS = {
    'safe_load': _via_safe_load,
    'backbone_init_cfg': _via_backbone_init_cfg,
    'timm_pretrained': _via_timm_classifier,
    'load_released': _via_load_released,
    'mmengine_loader': _via_mmengine_loader,
    'convert_checkpoint': _via_convert_tool,
}


def _run_path(name, path):
    """Run a loading path; return the exception it raised (None if it loaded)."""
    try:
        PATHS[name](path)
    except Exception as e:  # noqa: BLE001 - the outcome is what the tests check
        return e
    return None


# -- TorchScript ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def torchscript_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('ts')
    marker = root / 'written_by_torchscript'
    scripted = payloads.torchscript_archive(root / 'scripted.pt', marker)
    state = root / 'state.pth'
    torch.save(timm.create_model('inline_pvt_tiny', **TINY).state_dict(), state)
    mixed = payloads.with_torchscript_records(state, root / 'state_with_code.pth')
    return marker, scripted, mixed


def test_torchscript_payload_is_live(torchscript_files, tmp_path):
    """The payload is real: torch.load (which hands it to torch.jit.load) writes the file."""
    marker, scripted, _ = torchscript_files
    with pytest.warns(Warning):
        torch.load(scripted, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize('path_name', sorted(PATHS))
@pytest.mark.parametrize('which', ['scripted_module', 'state_dict_with_code'])
def test_torchscript_is_refused_on_every_path(torchscript_files, path_name, which):
    marker, scripted, mixed = torchscript_files
    file = scripted if which == 'scripted_module' else mixed
    error = _run_path(path_name, file)
    assert not marker.exists(), f'{path_name} ran the TorchScript payload'
    assert isinstance(error, (UnsafeCheckpointError, CheckpointError)), repr(error)
    assert 'TorchScript' in str(error) and str(file) in str(error)


# -- pickled payloads in every format -------------------------------------------------------
def _payload_files(root: Path, marker: Path) -> dict[str, Path]:
    """Each payload in the zip, legacy and raw-pickle formats, next to real weights."""
    weights = timm.create_model('inline_pvt_tiny', **TINY).state_dict()
    files = {}
    for name, payload in payloads.reduce_payloads(marker).items():
        ckpt = {'model': weights, 'config': payload}
        files[f'{name}-zip'] = root / f'{name}.zip.pth'
        torch.save(ckpt, files[f'{name}-zip'])
        files[f'{name}-legacy'] = root / f'{name}.legacy.pth'
        torch.save(ckpt, files[f'{name}-legacy'], _use_new_zipfile_serialization=False)
        files[f'{name}-raw'] = root / f'{name}.raw.pkl'
        files[f'{name}-raw'].write_bytes(pickle.dumps({'config': payload}, protocol=2))
    chain = payloads.getattr_chain(marker)
    files['getattr-zip'] = payloads.zip_checkpoint(root / 'getattr.zip.pth', chain)
    files['getattr-legacy'] = payloads.legacy_checkpoint(root / 'getattr.legacy.pth', chain)
    files['getattr-raw'] = root / 'getattr.raw.pkl'
    files['getattr-raw'].write_bytes(chain)
    return files


@pytest.fixture(scope='module')
def payload_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('payloads')
    marker = root / 'written_by_payload'
    return marker, _payload_files(root, marker)


def test_pickled_payloads_are_live(payload_files, tmp_path):
    """Each payload creates the marker under a plain unpickling (the tests can fail)."""
    marker, files = payload_files
    for name, file in files.items():
        if name.endswith('-raw'):
            pickle.loads(file.read_bytes())
        elif name.endswith('-zip') and not name.startswith('getattr'):
            torch.load(file, weights_only=False)
        else:
            continue
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize('path_name', sorted(PATHS))
def test_pickled_payloads_stay_inert_on_every_path(payload_files, path_name):
    marker, files = payload_files
    for name, file in files.items():
        error = _run_path(path_name, file)
        assert not marker.exists(), f'{path_name} ran the {name} payload'
        with_weights = not name.startswith('getattr') and not name.endswith('-raw')
        if with_weights:  # the weights next to an inert payload load
            assert error is None, f'{path_name} / {name}: {error!r}'
        else:  # nothing to load: a clear error of ours naming the file
            assert isinstance(error, CheckpointError), f'{path_name} / {name}: {error!r}'
            assert str(file) in str(error)


def test_payload_comes_back_as_inert_stand_in(payload_files):
    marker, files = payload_files
    for name in ('os.system-zip', 'exec-legacy', 'eval-zip'):
        ckpt = safe_load(files[name])
        assert isinstance(ckpt['config'], UntrustedObject)
        assert ckpt['config'].qualname in ('posix.system', 'builtins.exec', 'builtins.eval')
    assert not marker.exists()


def test_names_from_the_file_trigger_no_import(tmp_path, monkeypatch):
    """A name in the file is looked up in fixed tables, never imported or getattr'd on torch."""
    victim = 'mmlinattn_never_imported_module'
    looked_up = []

    def spy(name):  # torch's module __getattr__ lazily imports submodules
        looked_up.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, '__getattr__', spy, raising=False)
    for i, (module, name) in enumerate([(victim, 'thing'), ('torch', 'not_a_torch_name'),
                                        ('torch', 'FakeStorage')]):
        pkl = b'\x80\x02c' + f'{module}\n{name}\n'.encode() + b'.'
        path = payloads.zip_checkpoint(tmp_path / f'names{i}.pth', pkl)
        loaded = safe_load(path)
        assert isinstance(loaded, type) and issubclass(loaded, UntrustedObject)
    assert victim not in sys.modules
    assert looked_up == []


# -- bounded memory -------------------------------------------------------------------------
def test_zip_record_declaring_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / 'big_record.pth'
    torch.save({'w': torch.zeros(4)}, path)
    record = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith('/data/0'))
    payloads.set_zip_record_size(path, record, 2**31)
    with pytest.raises(CheckpointFormatError, match=r'declares 2147483648 bytes'):
        safe_load(path)


def test_storage_declaring_more_than_its_record_is_refused(tmp_path):
    path = payloads.zip_checkpoint(tmp_path / 'big_storage.pth', payloads.tensor_pickle(10**12),
                                   {'0': bytes(16)})
    with pytest.raises(CheckpointFormatError, match=r'declares 4000000000000 bytes'):
        safe_load(path)


def test_legacy_storage_declaring_more_than_the_file_is_refused(tmp_path):
    path = payloads.legacy_checkpoint(tmp_path / 'big_legacy.pth',
                                      payloads.tensor_pickle(10**12, legacy=True), ['0'])
    with pytest.raises(CheckpointFormatError, match=r'storages declare 4000000000000 bytes'):
        safe_load(path)


@pytest.mark.parametrize('size,stride,match', [((4, 10**9), (1, 0), 'more elements'),
                                               ((8, ), (1, ), 'reaches element 7')])
def test_tensor_views_must_stay_inside_their_storage(tmp_path, size, stride, match):
    pkl = payloads.tensor_pickle(4, size=size, stride=stride)
    path = payloads.zip_checkpoint(tmp_path / 'view.pth', pkl, {'0': bytes(16)})
    with pytest.raises(CheckpointFormatError, match=match):
        safe_load(path)


def test_bytearray_larger_than_the_stream_is_refused(tmp_path):
    pkl = b'\x80\x05\x96' + (2**40).to_bytes(8, 'little') + b'.'
    path = payloads.zip_checkpoint(tmp_path / 'bytearray.pth', pkl)
    with pytest.raises(CheckpointFormatError, match='buffer of 1099511627776 bytes'):
        safe_load(path)


# -- corrupt, truncated, empty, not a checkpoint -------------------------------------------
def _broken_files(root: Path) -> dict[str, Path]:
    good = root / 'good.pth'
    torch.save({'w': torch.arange(64.)}, good)
    legacy = root / 'good_legacy.pth'
    torch.save({'w': torch.arange(64.)}, legacy, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    files = {
        'empty': b'',
        'truncated zip': data[:len(data) // 2],
        'truncated legacy': legacy.read_bytes()[:-40],
        'text': b'model = dict(type="InLineSwin")\n',
        'png': b'\x89PNG\r\n\x1a\n' + bytes(64),
        'random': bytes(range(256)) * 4,
        'plain pickle': pickle.dumps({'w': [1, 2, 3]}, protocol=2),
        'zip of other files': None,
        'corrupt data.pkl': None,
    }
    other = root / 'other.zip'
    with zipfile.ZipFile(other, 'w') as z:
        z.writestr('readme.txt', 'hello')
    files['zip of other files'] = other.read_bytes()
    with zipfile.ZipFile(good) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith('data.pkl')))
    flipped = bytearray(data)
    flipped[data.index(pickled) + 10] ^= 0xFF
    files['corrupt data.pkl'] = bytes(flipped)
    out = {}
    for name, content in files.items():
        out[name] = root / (name.replace(' ', '_') + '.pth')
        out[name].write_bytes(content)
    return out


@pytest.fixture(scope='module')
def broken_files(tmp_path_factory):
    return _broken_files(tmp_path_factory.mktemp('broken'))


def test_broken_files_raise_one_error_naming_the_file(broken_files):
    for name, path in broken_files.items():
        with pytest.raises(CheckpointFormatError) as info:
            safe_load(path)
        assert str(path) in str(info.value), name
        assert 'not a readable torch checkpoint' in str(info.value), name


@pytest.mark.parametrize('path_name', ['backbone_init_cfg', 'mmengine_loader', 'load_released',
                                       'convert_checkpoint'])
def test_broken_files_on_other_paths(broken_files, path_name):
    for name, path in broken_files.items():
        error = _run_path(path_name, path)
        assert isinstance(error, CheckpointError), (name, repr(error))
        assert str(path) in str(error) and 'not a readable torch checkpoint' in str(error)


def test_convert_tool_prints_the_error_without_traceback(broken_files):
    path = broken_files['truncated zip']  # the CLI once; other files go through main() above
    proc = subprocess.run([sys.executable, str(CONVERT), str(path), str(path) + '.out'],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.startswith('error: ') and str(path) in proc.stderr
    assert 'truncated zip archive' in proc.stderr
    assert not os.path.exists(str(path) + '.out')


# -- nothing valid is dropped ---------------------------------------------------------------
class _Subclass(torch.Tensor):
    pass


def _valid_tensors() -> dict[str, torch.Tensor]:
    tagged = nn.Parameter(torch.randn(3))
    tagged.tag = 'with state'  # saved through _rebuild_parameter_with_state
    return {
        'plain': torch.randn(2, 3),
        'parameter': nn.Parameter(torch.randn(4)),  # _rebuild_parameter
        'parameter_with_state': tagged,
        'uint16': torch.arange(5).to(torch.uint16),  # _rebuild_tensor_v3
        'subclass': torch.randn(3).as_subclass(_Subclass),  # _rebuild_from_type_v2
        'bf16': torch.randn(3).bfloat16(),
        'bool': torch.tensor([True, False]),
        'strided_view': torch.arange(20.).reshape(4, 5)[:, 1:3],
        'scalar': torch.tensor(3.5),
        'empty': torch.zeros(0, 7),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().as_subclass(torch.Tensor).contiguous().flatten().view(torch.uint8)


@pytest.mark.parametrize('zip_format', [True, False])
def test_every_valid_tensor_form_loads_bit_for_bit(tmp_path, zip_format):
    tensors = _valid_tensors()
    path = tmp_path / 'valid.pth'
    torch.save({'state_dict': tensors}, path, _use_new_zipfile_serialization=zip_format)
    state = extract_state_dict(safe_load(path))
    assert set(state) == set(tensors)
    for key, value in state.items():
        assert type(value) is torch.Tensor, key
        assert (value.dtype, value.shape) == (tensors[key].dtype, tensors[key].shape), key
        assert torch.equal(_bits(value), _bits(tensors[key])), key


def test_tensor_in_an_unsupported_form_is_an_error_not_a_silent_drop(tmp_path):
    path = tmp_path / 'quantized.pth'
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({'state_dict': {'w': torch.randn(2), 'q': q}}, path)
    with pytest.raises(CheckpointMismatchError, match=r'q \(torch\._utils\._rebuild_qtensor\)'):
        extract_state_dict(safe_load(path))


def test_runner_checkpoint_types_rebuild_exactly(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    for v in (1.0, 2.0, 4.0):
        buffer.update(v)
    ckpt = {'meta': {'iter': 4, 'seed': np.int64(7)}, 'state_dict': {'w': torch.randn(3)},
            'message_hub': {'log_scalars': {'loss': buffer}, 'array': np.arange(6.)}}
    path = tmp_path / 'runner.pth'
    torch.save(ckpt, path)
    loaded = load_runner_checkpoint(path)
    assert isinstance(loaded['message_hub']['log_scalars']['loss'], HistoryBuffer)
    assert loaded['message_hub']['log_scalars']['loss'].mean() == pytest.approx(7 / 3)
    np.testing.assert_array_equal(loaded['message_hub']['array'], np.arange(6.))
    assert loaded['meta']['seed'] == 7
    assert torch.equal(loaded['state_dict']['w'], ckpt['state_dict']['w'])


# -- the unpickler's narrowing, opcode by opcode --------------------------------------------
_S = payloads._str
HOSTILE_PICKLES = {
    # REDUCE on an object that is not a trusted callable (a list built from the file).
    'call a list': (b'\x80\x02c__builtin__\nlist\n)R(tR.', 'REDUCE on list'),
    # numpy.ndarray resolves (runner files pass it to _reconstruct) but is never called:
    # ndarray(2**34) would allocate what the file asks.
    'call ndarray': (b'\x80\x02cnumpy\nndarray\n(' + payloads._int(2**34) + b'tR.', 'REDUCE'),
    # _reconstruct with a shape other than numpy's own (0,): also an allocation.
    'reconstruct': (b'\x80\x02cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n('
                    + payloads._int(2**34) + b't' + _S('b') + b'tR.', 'not how numpy'),
    # HistoryBuffer's __setstate__ merges methods into a class-wide table: not foreign ones.
    'history methods': (b'\x80\x02cmmengine.logging.history_buffer\nHistoryBuffer\n)\x81}'
                        + _S('statistics_methods') + b'}' + _S('mean') + b'cos\nsystem\nssb.',
                        'foreign statistics methods'),
    # BUILD (setting state) on a real object that is neither a stand-in nor a container.
    'set state of a Size': (b'\x80\x02ctorch\nSize\n)R}b.', 'BUILD on a Size'),
    # SETITEM into something that is not a dict.
    'setitem on a list': (b'\x80\x02]' + _S('k') + _S('v') + b's.', 'SETITEM on a list'),
}


@pytest.mark.parametrize('name', sorted(HOSTILE_PICKLES))
def test_hostile_opcodes_are_refused(tmp_path, name):
    pkl, match = HOSTILE_PICKLES[name]
    path = payloads.zip_checkpoint(tmp_path / 'hostile.pth', pkl)
    with pytest.raises(CheckpointFormatError, match=match):
        load_runner_checkpoint(path)  # the most trusting of our readers (runner types)
    from mmengine.logging import HistoryBuffer
    assert 'mean' not in HistoryBuffer._statistics_methods or \
        HistoryBuffer._statistics_methods['mean'] is HistoryBuffer.mean


def test_real_state_dict_loads_bit_for_bit_on_every_path(tmp_path):
    src = timm.create_model('inline_pvt_tiny', **TINY)
    reference = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / 'released.pth'
    torch.save({'model': src.state_dict(), 'epoch': 300}, path)

    def same(state, keys=None):
        for k in keys or reference:
            assert torch.equal(state[k], reference[k]), k

    same(safe_load(path)['model'])
    same(load_released(timm.create_model('inline_pvt_tiny', **TINY), str(path)).state_dict())
    same(timm.create_model('inline_pvt_tiny', pretrained=True, **TINY,
                           pretrained_cfg_overlay=dict(file=str(path))).state_dict())
    use_safe_checkpoint_loader()
    from mmengine.runner import CheckpointLoader
    same(CheckpointLoader.load_checkpoint(str(path), map_location='cpu')['model'])
    backbone = InLinePVT('tiny', **TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    shared = [k for k in reference if not k.startswith('head.')]
    same(backbone.state_dict(), shared)
    out = tmp_path / 'converted.pth'
    with contextlib.redirect_stdout(io.StringIO()):
        assert _convert_tool().main([str(path), str(out)]) == 0
    same(torch.load(out, weights_only=True), shared)
