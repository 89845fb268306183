"""Gigapixel files in and out: region readers, prediction by regions with spilled maps,
pyramidal outputs, resume, background, bad input, the viewer in Chromium.

Every file is made here, small (a few hundred pixels; 64 px tiles so that bands and
tiles cut each other). The reference for the predictions is the in-memory path
(``segment_large`` on the decoded image tensor), which the tests of
``test_infer_large.py`` tie to mmseg's own inference.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip('tifffile', reason='the large-images extra is needed')
pytest.importorskip('mmseg.models', reason='mmseg is needed')

from mmlinattn.engine.large_files import FileOutputs, segment_file  # noqa: E402
from mmlinattn.engine.large_image import segment_large  # noqa: E402
from mmlinattn.rasters import (  # noqa: E402
    ArrayReader,
    ImageFileError,
    TiffReader,
    kept_pixels,
    open_image,
    read_label_metadata,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from seeded import seeded_model  # noqa: E402
from test_infer_large import SEG_CFG  # noqa: E402

sys.path.insert(0, str(REPO / 'tools'))
from make_large_image import band, geo_tags  # noqa: E402

CHUNK, TILE, HALO = 300, 64, 128


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return band(0, h, w, seed)


def _tiff(path: Path, rgb: np.ndarray, **kw) -> Path:
    kw.setdefault('tile', (64, 64))
    tifffile.imwrite(path, rgb, photometric='rgb', compression=kw.pop('compression', 'zlib'),
                     **kw)
    return path


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(2, 0, 1).contiguous()


@pytest.fixture(scope='module')
def model():
    return seeded_model(SEG_CFG)


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
    """A 200 x 330 tiled TIFF and its in-memory prediction (the reference)."""
    folder = tmp_path_factory.mktemp('scene')
    rgb = _rgb(200, 330)
    return folder, rgb, _tiff(folder / 'scene.tif', rgb)


@pytest.fixture(scope='module')
def reference(model, scene):
    _, rgb, _ = scene
    labels, _ = segment_large(model, _tensor(rgb), CHUNK, TILE, HALO)
    return labels


class CountingReader(ArrayReader):
    """Records every region read; ``shift`` reads the wrong rows (broken on purpose)."""

    def __init__(self, rgb: np.ndarray, shift: int = 0) -> None:
        super().__init__(np.ascontiguousarray(rgb[..., ::-1]))
        self.regions: list[tuple[int, int, int, int]] = []
        self.shift = shift

    def _read(self, y0, y1, x0, x1):
        self.regions.append((y0, y1, x0, x1))
        if self.shift:
            y0, y1 = min(self.height - (y1 - y0), y0 + self.shift), min(self.height,
                                                                       y1 + self.shift)
        return super()._read(y0, y1, x0, x1)


# -- readers ----------------------------------------------------------------------------
@pytest.mark.parametrize('layout', ['tiled', 'striped', 'bigtiff', 'ome'])
def test_tiff_reader_regions_equal_the_pixels(tmp_path, layout) -> None:
    rgb = _rgb(150, 170)
    kw = dict(tiled={}, striped=dict(tile=None, rowsperstrip=16), bigtiff=dict(bigtiff=True),
              ome=dict(ome=True))[layout]
    path = _tiff(tmp_path / 'a.tif', rgb, **kw)
    r = open_image(str(path))
    assert isinstance(r, TiffReader) and (r.height, r.width) == (150, 170)
    bgr = rgb[..., ::-1]
    assert np.array_equal(r.read(10, 77, 5, 133), bgr[10:77, 5:133])
    assert np.array_equal(r.read(0, 150), bgr)
    # Full-width bands decode each row of tiles once, whatever the band boundaries.
    r2 = open_image(str(path))
    for y in range(0, 150, 12):
        r2.read(y, min(150, y + 12))
    seg_pixels = r2.seg_h * r2.seg_w * r2.across * -(-150 // r2.seg_h)
    assert r2.decoded_pixels <= seg_pixels


def test_pyramid_level_mpp_and_openslide_agree(tmp_path) -> None:
    path = tmp_path / 'slide.tif'
    subprocess.run([sys.executable, str(REPO / 'tools/make_large_image.py'), str(path),
                    '--size', '512', '768', '--levels', '3', '--mpp', '0.25', '--tile', '128'],
                   check=True, capture_output=True)
    r = open_image(str(path), level=1)
    assert r.levels == [(512, 768), (256, 384), (128, 192)] and (r.height, r.width) == (256, 384)
    assert r.mpp == pytest.approx(0.5)
    expected = band(0, 512, 768, 0)[::2, ::2, ::-1]
    assert np.array_equal(r.read(0, 256), expected)
    assert open_image(str(path), mpp=1.1).level == 2
    pytest.importorskip('openslide')
    slide = open_image(str(path), level=1, reader='openslide')
    assert np.array_equal(slide.read(30, 90, 40, 200), expected[30:90, 40:200])


# -- prediction by regions --------------------------------------------------------------
def test_file_prediction_equals_in_memory_and_reads_bands_only(model, scene, reference,
                                                               tmp_path) -> None:
    _, rgb, path = scene
    reader = open_image(str(path))
    out = tmp_path / 'pred.ome.tif'
    labels, info = segment_file(model, reader, FileOutputs(str(out)), chunk_tokens=CHUNK,
                                tile=TILE, halo=HALO, spill=str(tmp_path / 'spill'),
                                min_spill_bytes=0)
    assert torch.equal(labels.long(), reference.long())
    # Every whole map went to disk: each stage's map (its blocks write over it) and its
    # NCHW output, at least.
    assert info['spill']['files'] + info['spill']['reused'] >= 8
    # Each row of tiles decoded once for the prediction, never the image whole at once.
    assert info['decoded_pixels_model'] <= 4 * 64 * 64 * 6
    counting = CountingReader(rgb)
    labels2, _ = segment_file(model, counting, FileOutputs(), chunk_tokens=CHUNK, tile=TILE,
                              halo=HALO)
    assert torch.equal(labels2.long(), reference.long())
    assert max(y1 - y0 for y0, y1, *_ in counting.regions) < rgb.shape[0] // 2
    # Rows read one too low: the comparison must see it.
    shifted, _ = segment_file(model, CountingReader(rgb, shift=1), FileOutputs(),
                              chunk_tokens=CHUNK, tile=TILE, halo=HALO)
    assert not torch.equal(shifted.long(), reference.long())
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert tif.is_ome and [lv.shape for lv in series.levels] == [(200, 330), (100, 165)]
        assert np.array_equal(series.levels[0].asarray(), reference.numpy())
    meta = read_label_metadata(str(out))
    assert len(meta['classes']) == model.decode_head.out_channels and meta['palette']


def test_pyramid_and_geotiff_tags_kept(model, tmp_path) -> None:
    rgb = _rgb(300, 280)
    tags = geo_tags(32633, 500000.0, 4600000.0, 0.5)
    path = _tiff(tmp_path / 'scene.tif', rgb, extratags=tags)
    reader = open_image(str(path))
    assert reader.geo is not None and reader.geo.crs == 'EPSG:32633'
    assert reader.geo.to_map(10, 20) == pytest.approx((500005.0, 4599990.0))
    out = tmp_path / 'pred.tif'
    segment_file(model, reader, FileOutputs(str(out)), chunk_tokens=CHUNK, tile=TILE, halo=HALO)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        geo = tif.geotiff_metadata
        assert geo['ModelPixelScale'][:2] == [0.5, 0.5]
        assert geo['ModelTiepoint'][3:5] == [500000.0, 4600000.0]
        assert geo['ProjectedCSTypeGeoKey'] == 32633 or int(geo['ProjectedCSTypeGeoKey']) == 32633
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(300, 280), (150, 140)]
        assert page.is_tiled


def test_resume_continues_from_the_last_tile_row(model, scene, reference, tmp_path) -> None:
    _, _, path = scene
    spill, out = tmp_path / 'run', tmp_path / 'pred.ome.tif'

    class Stop(Exception):
        pass

    def stop_after_first_row(done: int, total: int) -> None:
        if done == 7:  # the first tile after the first row (384 padded px / 64 = 6 tiles)
            raise Stop

    with pytest.raises(Stop):
        segment_file(model, open_image(str(path)), FileOutputs(str(out)), chunk_tokens=CHUNK,
                     tile=TILE, halo=HALO, spill=str(spill), progress=stop_after_first_row)
    assert not out.exists() and not Path(str(out) + '.partial').exists()
    state = json.loads((spill / 'state.json').read_text())
    assert state['features'] and state['rows'] == [0]
    reports: list = []
    reader = open_image(str(path))
    labels, info = segment_file(model, reader, FileOutputs(str(out)), chunk_tokens=CHUNK,
                                tile=TILE, halo=HALO, spill=str(spill), resume=True,
                                progress=lambda d, t: reports.append((d, t)))
    assert info['resumed'] and info['backbone_s'] == 0.0 and info['decoded_pixels_model'] == 0
    assert reports[0][0] == 7  # the first row was not decoded again
    assert torch.equal(labels.long(), reference.long()) and out.exists()
    with pytest.raises(ValueError, match='different settings'):
        segment_file(model, open_image(str(path)), FileOutputs(), chunk_tokens=CHUNK,
                     tile=TILE, halo=2 * HALO, spill=str(spill), resume=True)


def test_a_full_disk_is_one_error_and_the_run_resumes_once_space_is_back(
        model, scene, reference, tmp_path, monkeypatch) -> None:
    import errno

    from mmlinattn.utils import spill as spill_module
    _, _, path = scene
    spill, out = tmp_path / 'run', tmp_path / 'pred.ome.tif'
    calls = {'n': 0, 'full_at': 6}
    reserve = spill_module._fallocate

    def fallocate(fd: int, nbytes: int) -> int:  # the disk fills in the backbone's stages
        calls['n'] += 1
        return errno.ENOSPC if calls['n'] >= calls['full_at'] else reserve(fd, nbytes)

    monkeypatch.setattr(spill_module, '_fallocate', fallocate)
    with pytest.raises(OSError, match='no space left on the device for a map of .* '
                                      'rerun with --resume') as e:
        segment_file(model, open_image(str(path)), FileOutputs(str(out)), chunk_tokens=CHUNK,
                     tile=TILE, halo=HALO, spill=str(spill), min_spill_bytes=0)
    assert e.value.errno == errno.ENOSPC and str(spill) in str(e.value)
    assert not out.exists() and not Path(str(out) + '.partial').exists()
    calls['full_at'] = 10**9  # space is back
    labels, info = segment_file(model, open_image(str(path)), FileOutputs(str(out)),
                                chunk_tokens=CHUNK, tile=TILE, halo=HALO, spill=str(spill),
                                min_spill_bytes=0, resume=True)
    assert torch.equal(labels.long(), reference.long()) and out.exists()


def test_background_is_skipped_and_the_rest_is_the_compacted_prediction(model, tmp_path
                                                                          ) -> None:
    rgb = np.full((320, 384, 3), 245, np.uint8)  # glass
    rgb[64:192, 128:256] = _rgb(128, 128, seed=3) // 2  # tissue, darker
    path = _tiff(tmp_path / 'slide.tif', rgb)
    reader = open_image(str(path))
    labels, info = segment_file(model, reader, FileOutputs(), chunk_tokens=CHUNK, tile=TILE,
                                halo=HALO, background='otsu', nodata=255)
    assert info['tissue']['rows'] == 128 and info['tissue']['cols'] == 128
    assert (labels[:64] == 255).all() and (labels[:, :128] == 255).all()
    compact, _ = segment_large(model, _tensor(rgb[64:192, 128:256]), CHUNK, TILE, HALO)
    assert torch.equal(labels[64:192, 128:256].long(), compact.long())
    rows, cols = kept_pixels(np.ones((5, 6), bool), 64.0, 320, 384)
    assert len(rows) == 320 and len(cols) == 384


# -- bad input ---------------------------------------------------------------------------
def test_bad_files_are_refused_with_the_file_and_region(tmp_path) -> None:
    text = tmp_path / 'notes.tif'
    text.write_text('not an image at all')
    with pytest.raises(ImageFileError, match='notes.tif'):
        open_image(str(text))
    other = tmp_path / 'data.xyz'
    other.write_bytes(b'\x00' * 100)
    with pytest.raises(ImageFileError, match='not an image this tool reads'):
        open_image(str(other))
    good = _tiff(tmp_path / 'good.tif', _rgb(256, 256), compression=None)
    with pytest.raises(ImageFileError, match='level 3 does not exist'):
        open_image(str(good), level=3)
    # Truncated: the last tiles point past the end of the file.
    data = good.read_bytes()
    trunc = tmp_path / 'trunc.tif'
    with tifffile.TiffFile(good) as tif:
        last = int(tif.pages[0].dataoffsets[-1])
    trunc.write_bytes(data[:last + 10] if last + 10 < len(data) else data[:-100])
    with pytest.raises(ImageFileError, match=r'trunc\.tif: truncated.*rows 192:256'):
        open_image(str(trunc))
    # A corrupt tile: its compressed bytes overwritten.
    zipped = _tiff(tmp_path / 'zipped.tif', _rgb(128, 128))
    with tifffile.TiffFile(zipped) as tif:
        offset = int(tif.pages[0].dataoffsets[3])
    raw = bytearray(zipped.read_bytes())
    raw[offset:offset + 40] = b'\xff' * 40
    zipped.write_bytes(bytes(raw))
    with pytest.raises(ImageFileError, match=r'zipped\.tif: cannot decode .*rows 64:128, '
                       r'cols 64:128'):
        open_image(str(zipped)).read(0, 128)
    # A decompression bomb: a tiny file whose header claims 200000 x 200000 pixels.
    bomb = _tiff(tmp_path / 'bomb.tif', _rgb(64, 64))
    with tifffile.TiffFile(bomb, mode='r+') as tif:
        tif.pages[0].tags['ImageWidth'].overwrite(200000)
        tif.pages[0].tags['ImageLength'].overwrite(200000)
    with pytest.raises(ImageFileError, match='decompression bomb|more than the limit'):
        open_image(str(bomb))


def test_tool_leaves_no_output_for_a_bad_file(tmp_path) -> None:
    good = _tiff(tmp_path / 'good.tif', _rgb(256, 256), compression=None)
    trunc = tmp_path / 'trunc.tif'
    trunc.write_bytes(good.read_bytes()[:-5000])
    out = tmp_path / 'pred.ome.tif'
    proc = subprocess.run([sys.executable, str(REPO / 'tools/infer_large.py'), str(SEG_CFG),
                           'none', str(trunc), '--out', str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and 'trunc.tif: truncated' in proc.stderr
    assert not any(p.name.startswith('pred') for p in tmp_path.iterdir())


# -- the tool, outputs and the viewer --------------------------------------------------
def _chromium() -> str | None:
    return shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which(
        'google-chrome')


def _screenshot(browser: str, page: Path, zoom: float, out: Path) -> np.ndarray:
    import cv2
    subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                    '--no-first-run', '--disable-background-networking',
                    '--disable-component-update', '--disable-sync',
                    f'--user-data-dir={out.parent / ("chrome-" + out.stem)}',
                    '--window-size=800,600', '--virtual-time-budget=8000',
                    f'--screenshot={out}', f'{page.as_uri()}#zoom={zoom}'],
                   check=True, capture_output=True, timeout=120)
    shot = cv2.imread(str(out))
    assert shot is not None, 'Chromium wrote no screenshot'
    return shot


def _uniform_label_near(labels: np.ndarray, y0: int, x0: int, r: int) -> tuple[int, int]:
    """The pixel nearest ``(y0, x0)`` whose ``(2r + 1)^2`` neighbourhood has one label."""
    for d in range(min(labels.shape) // 4):
        for y in range(y0 - d, y0 + d + 1):
            for x in range(x0 - d, x0 + d + 1):
                if max(abs(y - y0), abs(x - x0)) == d and \
                        (labels[y - r:y + r + 1, x - r:x + r + 1] == labels[y, x]).all():
                    return y, x
    raise AssertionError(f'no uniform {2 * r + 1}x{2 * r + 1} label region near ({y0}, {x0})')


def test_tool_writes_pyramids_and_a_viewer_chromium_shows(tmp_path) -> None:
    rgb = np.full((256, 320, 3), 230, np.uint8)
    rgb[64:192, 96:224] = (40, 90, 40)
    path = _tiff(tmp_path / 'img.tif', rgb)
    out, overlay, viewer = tmp_path / 'pred.ome.tif', tmp_path / 'overlay.ome.tif', \
        tmp_path / 'viewer'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/infer_large.py'), str(SEG_CFG), 'none', str(path),
         '--out', str(out), '--overlay', str(overlay), '--viewer', str(viewer),
         '--tile', '64', '--halo', '128', '--chunk-tokens', str(CHUNK),
         '--spill', str(tmp_path / 'run')], capture_output=True, text=True, cwd=REPO,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'backbone:' in proc.stdout and 'tiles' in proc.stdout and 'left' in proc.stdout
    labels = tifffile.imread(out)
    with tifffile.TiffFile(overlay) as tif:
        assert tif.series[0].levels[0].shape == (256, 320, 3)
    page = viewer / 'index.html'
    assert page.exists() and (viewer / 'openseadragon/openseadragon.js').exists()
    assert 'https://' not in page.read_text() and 'http://' not in page.read_text().replace(
        'http://schemas.microsoft.com', '')
    browser = _chromium()
    if browser is None:
        if os.environ.get('MMLINATTN_REQUIRE_CHROMIUM'):
            pytest.fail('MMLINATTN_REQUIRE_CHROMIUM is set but no Chromium is on PATH')
        pytest.skip('no Chromium here: the viewer page is written but not looked at '
                    '(.ci/run installs it)')
    meta = read_label_metadata(str(out))
    palette = np.asarray(meta['palette'], np.float32)
    # Random weights draw arbitrary label regions: look where the label is the same 3
    # pixels around, nearest the middle (on a boundary the screen mixes two colours).
    y, x = _uniform_label_near(labels, 128, 160, 3)
    expected = (np.array([40, 90, 40], np.float32) * 0.5 + palette[labels[y, x]] * 0.5)[::-1]
    far = _screenshot(browser, page, 1, tmp_path / 'zoom1.png')
    # At zoom 8 the centre of the view (left of the 220-px side panel) is the middle of
    # the image; at zoom 1 the image fills the view's width. Under a loaded CPU headless
    # Chromium can take its screenshot before the overlay's tiles are drawn (the image
    # alone shows): up to three screenshots, the last one decides.
    for attempt in range(3):
        near = _screenshot(browser, page, 8, tmp_path / f'zoom8-{attempt}.png')
        h, w = near.shape[:2]
        scale = 8 * (w - 220) / labels.shape[1]  # screen pixels per image pixel
        spot = near[round(h / 2 + (y + 0.5 - 128) * scale),
                    round((w - 220) / 2 + (x + 0.5 - 160) * scale)].astype(np.float32)
        if np.abs(spot - expected).max() < 20:
            break
    assert np.abs(spot - expected).max() < 20, (spot, expected, (y, x))
    # At zoom 1 the whole image is in view: both the tissue blend and the background.
    assert np.abs(far.reshape(-1, 3).astype(np.float32) - expected).max(axis=1).min() < 20
    assert not np.array_equal(far, near)


def test_ranks_read_and_spill_only_their_rows(scene, tmp_path) -> None:
    """Two gloo processes on one TIFF: each decodes only the rows its band's stem reads,
    spills its own maps, writes its rows of the shared labels file; the pyramid equals
    the one-process tool's."""
    import socket
    _, _, path = scene
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    weights = tmp_path / 'random.pth'
    torch.save(seeded_model(SEG_CFG).state_dict(), weights)
    common = ['--tile', '64', '--halo', '128', '--chunk-tokens', str(CHUNK)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(port), PYTHON=sys.executable,
               MMLINATTN_COLLECTIVE_TIMEOUT_S='120')
    two = subprocess.run(['bash', str(REPO / 'tools/dist_infer_large.sh'), str(SEG_CFG),
                          str(weights), str(path), '2', *common, '--spill', str(tmp_path / 'run'),
                          '--out', str(tmp_path / 'two.ome.tif')],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / 'run/rank0/state.json').exists() and (tmp_path / 'run/rank1').is_dir()
    decoded = [float(v) for v in __import__('re').findall(r'decoded ([0-9.]+) Mpx', two.stdout)]
    assert len(decoded) == 2 and max(decoded) < 0.8 * 200 * 330 / 1e6, two.stdout
    one = subprocess.run([sys.executable, str(REPO / 'tools/infer_large.py'), str(SEG_CFG),
                          str(weights), str(path), *common, '--out', str(tmp_path / 'one.ome.tif')],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = tifffile.imread(tmp_path / 'one.ome.tif'), tifffile.imread(tmp_path / 'two.ome.tif')
    assert a.shape == b.shape == (200, 330) and (a != b).mean() < 1e-3


def test_in_memory_tool_writes_the_same_pyramid_as_by_regions(scene, tmp_path) -> None:
    """``--in-memory`` (the whole image decoded first, today's path) and the default path
    by regions write the same labels; the in-memory one from a PNG cv2 reads whole."""
    import cv2
    _, rgb, path = scene
    png = tmp_path / 'scene.png'
    cv2.imwrite(str(png), rgb[..., ::-1])
    weights = tmp_path / 'random.pth'
    torch.save(seeded_model(SEG_CFG).state_dict(), weights)
    common = [str(SEG_CFG), str(weights), '--tile', '64', '--halo', '128', '--chunk-tokens',
              str(CHUNK)]
    outs = []
    for image, extra in ((png, ['--in-memory']), (path, [])):
        out = tmp_path / f'{image.stem}-{len(outs)}.ome.tif'
        proc = subprocess.run([sys.executable, str(REPO / 'tools/infer_large.py'), common[0],
                               common[1], str(image), *common[2:], *extra, '--out', str(out)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(tifffile.imread(out))
    assert outs[0].shape == (200, 330) and np.array_equal(outs[0], outs[1])
