"""tools/analysis/profile_step.py: operators grouped by kind, on a tiny backbone."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'analysis'))

from profile_step import kind_of  # noqa: E402


def test_operators_are_grouped_by_what_they_compute():
    assert kind_of('aten::addmm') == kind_of('aten::bmm') == 'matrix products'
    assert kind_of('mkldnn::_linear_pointwise') == 'matrix products'
    assert kind_of('aten::mkldnn_convolution') == 'convolutions'
    assert kind_of('aten::native_layer_norm') == 'norms'
    assert kind_of('aten::gelu') == 'activations'
    assert kind_of('aten::_to_copy') == 'casts'
    assert kind_of('aten::copy_') == 'layout copies'
    assert kind_of('aten::sum') == 'reductions'
    assert kind_of('aten::add_') == 'elementwise'
    assert kind_of('aten::something_new') == 'other'


def test_a_profile_of_a_forward_shows_its_matrix_products(tmp_path):
    out = tmp_path / 'profile.json'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'analysis' / 'profile_step.py'), 'inline-pvt-t',
         '--size', '64', '--json', str(out)], capture_output=True, text=True, cwd=REPO,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '| matrix products |' in proc.stdout and '| **all operators** |' in proc.stdout
    import json
    (case, ) = json.loads(out.read_text())
    assert case['dtype'] == 'fp32' and case['kinds']['matrix products'] > 0
    assert abs(sum(case['kinds'].values()) - case['total_ms']) < 1e-6 * case['total_ms'] + 1e-9
