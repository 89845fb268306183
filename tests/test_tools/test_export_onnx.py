"""ONNX export: the exported graph equals PyTorch in ONNX Runtime at sizes other than its own.

Each family's backbone is exported once with dynamic height/width at 256x256 and
run at sizes that change what the eager code does: bottom/right padding of the
patch embedding and of windows, the number of InLine token chunks (4096 tokens
are one chunk for these widths, 5760 two), Swin's last stage fitting one window
(no shift) and CSwin's stripe counts. A graph with any of those baked in at 256
differs there (dims mismatch or wrong values), so these comparisons can fail.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmlinattn.engine.deploy import (
    BackboneGraph,
    ExportError,
    VerificationError,
    export_onnx,
    graph_for,
    verify_onnx,
)
from mmlinattn.models.backbones import (
    MLLA,
    AgentCSwin,
    AgentDeiT,
    AgentPVT,
    AgentSwin,
    FLattenCSwin,
    FLattenPVTv2,
    FLattenSwin,
    InLineCSwin,
    InLineDeiT,
    InLinePVT,
    InLineSwin,
)

REPO = Path(__file__).resolve().parents[2]
SEG_CFG = REPO / 'configs/tiny/fpn_inline-pvt-t_300i_tiny-ade20k.py'
DET_CFG = REPO / 'configs/tiny/mask-rcnn_inline-pvt-t_fpn_300i_tiny-coco.py'
UPER_CFG = (REPO / 'configs/segmentation/inline_swin'
            / 'upernet_inline-swin-t_8xb2-160k_ade20k-512x512.py')

#: Sizes checked besides the export's 256x256: padding (297x263), two InLine chunks
#: in stage 1 (320x288: 5760 tokens), and a non-square map.
SIZES = [(256, 256), (297, 263), (320, 288)]


def _backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == 'pvt':
        return InLinePVT(arch='tiny', depths=(1, 1, 1, 1))
    if name == 'pvt-window5':
        return InLinePVT(arch='tiny', depths=(1, 1, 1, 1), inline_window=5)
    if name == 'swin':
        return InLineSwin(depths=(1, 1, 1, 2))
    if name == 'cswin':
        return InLineCSwin(depths=(1, 1, 1, 1))
    if name == 'agent-swin':  # agents pooled and biases resized for the run-time map
        return AgentSwin(depths=(1, 1, 1, 2))
    if name == 'agent-pvt':  # unpadded strided embeddings: odd sizes lose their remainder
        return AgentPVT(depths=(1, 1, 1, 1))
    if name == 'flatten-swin':  # positional encodings resized for the run-time map
        return FLattenSwin(depths=(1, 1, 1, 2))
    if name == 'mlla':  # RoPE for the run-time map; odd maps padded before a merge
        return MLLA(depths=(1, 1, 1, 1))
    if name == 'flatten-pvtv2':  # overlapping embeddings, the MLP's convolution
        return FLattenPVTv2('b0', depths=(1, 1, 1, 1))
    if name == 'agent-cswin':
        return AgentCSwin(depths=(1, 1, 1, 1))
    if name == 'flatten-cswin':
        return FLattenCSwin(depths=(1, 1, 1, 1))
    if name == 'agent-deit':  # the class token's biases; agents pooled from the patches
        model = AgentDeiT(arch='tiny', out_indices=(0, 1, 2, 3))
        model.blocks = model.blocks[:4]
        return model
    model = InLineDeiT(arch='tiny', out_indices=(0, 1, 2, 3))
    model.blocks = model.blocks[:4]
    return model


@pytest.mark.parametrize('name', ['pvt', 'pvt-window5', 'swin', 'cswin', 'deit', 'agent-swin',
                                  'agent-pvt',
                                  'flatten-swin', 'mlla', 'agent-deit', 'flatten-pvtv2'])
def test_backbone_exports_dynamic_and_matches(name: str, tmp_path: Path) -> None:
    graph = BackboneGraph(_backbone(name).eval())
    path = str(tmp_path / f'{name}.onnx')
    # Small maps too where the export allows them: 128 px puts windowed PVT's stride-32
    # map (4x4) in one 5x5 window. (Swin's and CSwin's last maps cannot reach one
    # window/stripe in a dynamic graph: torch.export refuses ranges below 225/115 px.)
    dynamic_range = (128, 4096) if name == 'pvt-window5' else (256, 4096)
    info = export_onnx(graph, torch.randn(1, 3, 256, 256), path, dynamic=True,
                       dynamic_range=dynamic_range)
    assert info['outputs'] == ['feat0', 'feat1', 'feat2', 'feat3']
    sizes = SIZES + ([(128, 128)] if dynamic_range[0] == 128 else [])
    checks = verify_onnx(path, graph, sizes, atol=1e-4, rtol=1e-4)
    assert [c.size for c in checks] == sizes
    assert all(max(c.max_abs) < 1e-4 for c in checks)


class _SizeBranch(nn.Module):
    """Takes a Python branch on the height: what an export must refuse to bake in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[2] > 300 else x


def test_size_dependent_branch_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r'torch.export failed[\s\S]*--dynamic-range 256 300'):
        export_onnx(_SizeBranch(), torch.randn(1, 3, 256, 256), str(tmp_path / 'x.onnx'),
                    dynamic=True)


def test_verification_detects_a_different_model(tmp_path: Path) -> None:
    graph = BackboneGraph(_backbone('deit').eval())
    path = str(tmp_path / 'deit.onnx')
    export_onnx(graph, torch.randn(1, 3, 256, 256), path)
    verify_onnx(path, graph, [(256, 256)])
    with torch.no_grad():
        graph.backbone.patch_embed.proj.weight.mul_(1.5)
    with pytest.raises(VerificationError, match='256x256'):
        verify_onnx(path, graph, [(256, 256)])


def test_static_export_refuses_other_sizes(tmp_path: Path) -> None:
    graph = BackboneGraph(_backbone('deit').eval())
    path = str(tmp_path / 'static.onnx')
    export_onnx(graph, torch.randn(1, 3, 256, 256), path)
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        verify_onnx(path, graph, [(320, 288)])


def _model(config: Path, options: dict | None = None) -> nn.Module:
    pytest.importorskip('mmdet.models', reason='mmdet with a compiled mmcv is needed')
    pytest.importorskip('mmseg.models', reason='mmseg is needed')
    from mmlinattn.engine.build import build_from_config

    torch.manual_seed(0)
    model, _ = build_from_config(str(config), options)
    return model.eval()


def test_upernet_segmentor_exports_and_matches(tmp_path: Path) -> None:
    model = _model(UPER_CFG, dict(model=dict(backbone=dict(depths=(1, 1, 1, 2)),
                                             decode_head=dict(channels=64),
                                             auxiliary_head=dict(channels=32))))
    graph = graph_for(model)
    path = str(tmp_path / 'upernet.onnx')
    info = export_onnx(graph, torch.randn(1, 3, 256, 256), path, dynamic=True)
    assert info['outputs'] == ['seg_logits']
    checks = verify_onnx(path, graph, [(256, 256), (337, 289)])
    assert all(c.ok for c in checks)


def test_detector_exports_to_raw_head_outputs(tmp_path: Path) -> None:
    model = _model(DET_CFG)
    graph = graph_for(model)
    path = str(tmp_path / 'det.onnx')
    info = export_onnx(graph, torch.randn(1, 3, 256, 320), path, dynamic=True)
    levels = graph.num_levels
    assert info['outputs'][:levels] == [f'feat{i}' for i in range(levels)]
    assert info['outputs'][levels] == 'cls_score0' and info['outputs'][-1].startswith('bbox_pred')
    checks = verify_onnx(path, graph, [(256, 320), (297, 263)])
    # The RPN's raw outputs are what mmdet's own head computes on the same input.
    x = torch.randn(1, 3, 297, 263, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_scores, _ = model.rpn_head(model.extract_feat(x))
    assert [tuple(c.shape) for c in cls_scores] == [
        tuple(t.shape) for t in graph(x)[levels:levels + len(cls_scores)]]
    assert all(c.ok for c in checks)


def test_tool_exports_semantic_fpn_end_to_end(tmp_path: Path) -> None:
    import onnx

    out = tmp_path / 'seg.onnx'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/deployment/export_onnx.py'), str(SEG_CFG),
         '--out', str(out), '--shape', '256', '256', '--dynamic'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('onnxruntime vs torch')]
    # The second size: 256 * 3/4 + 17 is below the range (256..4096), so 256 * 5/4 + 17.
    assert len(lines) == 2 and '256x256' in lines[0] and '337x337' in lines[1], proc.stdout
    assert all(ln.endswith('ok') for ln in lines)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta['mmlinattn_part'] == 'segmentor' and meta['dynamic'] == 'True'
    assert meta['mean'] == '123.675 116.28 103.53'


def test_tool_reports_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/deployment/export_onnx.py'), str(SEG_CFG),
         '--out', str(tmp_path / 'x.onnx'), '--shape', '100', '100', '--dynamic'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 1
    assert 'outside the dynamic range 256..4096' in proc.stderr


@pytest.mark.parametrize('size', [(11, 10), (8, 8), (3, 7)])
@pytest.mark.parametrize('output_size', [1, 2, 3, 6, (3, None)])
def test_adaptive_pooling_rewrite_equals_torch(size: tuple[int, int], output_size) -> None:
    """The export's adaptive average pooling (bins as matrices) is torch's, uneven bins too."""
    from mmlinattn.engine.deploy import _adaptive_avg_pool2d_forward

    pool = nn.AdaptiveAvgPool2d(output_size)
    x = torch.randn(2, 4, *size)
    torch.testing.assert_close(_adaptive_avg_pool2d_forward(pool, x), pool(x))


class _GroupsFromHeight(nn.Module):
    """A convolution whose group count is the height: ONNX's ``group`` is a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 1, 3)  # (B, H, C, W): H channels
        weight = torch.ones(y.shape[1], 1, 3, 3)
        return torch.nn.functional.conv2d(y, weight, padding=1, groups=y.shape[1])


def test_unconvertible_layer_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r'conversion to ONNX failed[\s\S]*'
                       r'node conv2d\S* \(aten.conv2d[\s\S]*_GroupsFromHeight'):
        export_onnx(_GroupsFromHeight(), torch.randn(1, 3, 256, 256), str(tmp_path / 'g.onnx'),
                    dynamic=True)
