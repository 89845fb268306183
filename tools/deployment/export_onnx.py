"""Export a backbone, segmenter or detector of a config to ONNX and check it in ONNX Runtime.

    python tools/deployment/export_onnx.py CONFIG [CHECKPOINT] --out model.onnx \\
        --shape H W [--dynamic] [--part model|backbone]

What is exported (``--part model``, the default): an mmseg segmenter from the
normalised image to its segmentation logits at the input size; an mmdet detector
to its neck maps and dense head outputs (RPN or single-stage head, per level),
with decoding, NMS and RoI heads left to the caller; ``--part backbone`` the
backbone's NCHW maps. The input is the image after the data preprocessor
(normalised, RGB/BGR as the config says); the file's metadata records mean, std
and channel order.

After the export the file runs in ONNX Runtime (CPU) next to the PyTorch model on
the same random input, at the export size and (``--dynamic``) at a second size;
the max abs/rel difference is printed and the tool exits 1 past tolerance.
CHECKPOINT (a runner checkpoint or state dict, read without running code) may be
omitted or ``none`` for random weights.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Export to ONNX and verify in ONNX Runtime')
    p.add_argument('config', help='an mmseg or mmdet config with an InLine backbone')
    p.add_argument('checkpoint', nargs='?', default='none',
                   help="trained weights (runner checkpoint or state dict), or 'none'")
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=(512, 512),
                   help='input height and width of the export (px)')
    p.add_argument('--dynamic', action='store_true',
                   help='height and width are dynamic axes of the ONNX input')
    p.add_argument('--dynamic-range', type=int, nargs=2, metavar=('MIN', 'MAX'),
                   help='sizes (px) the dynamic graph serves; default 256 4096')
    p.add_argument('--verify-shape', type=int, nargs=2, metavar=('H', 'W'),
                   help='second size checked in ONNX Runtime when --dynamic '
                   '(default: each side * 3/4 + 17 px, or * 5/4 + 17 px below the range, '
                   'so padding and window counts differ)')
    p.add_argument('--part', choices=['model', 'backbone'], default='model',
                   help='the whole segmenter/detector, or only its backbone')
    p.add_argument('--atol', type=float, default=1e-4)
    p.add_argument('--rtol', type=float, default=1e-3,
                   help='pass when max|ort - torch| <= atol + rtol * max|torch|, per output')
    p.add_argument('--opset', type=int, default=None, help="ONNX opset (default: exporter's)")
    p.add_argument('--no-verify', action='store_true', help='skip the ONNX Runtime check')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='override config keys, e.g. model.backbone.depths="(1,1,1,1)"')
    args = p.parse_args(argv)
    for name in ('shape', 'verify_shape', 'dynamic_range'):
        value = getattr(args, name)
        if value is not None and min(value) < 1:
            p.error(f'--{name.replace("_", "-")} must be positive, got {value}')
    if args.dynamic_range and not args.dynamic:
        p.error('--dynamic-range needs --dynamic')
    return args


def second_size(shape: tuple[int, int], lo: int, hi: int) -> tuple[int, int]:
    """A size unlike ``shape`` (other padding and window counts), within ``[lo, hi]``."""
    def other(s: int) -> int:
        for candidate in (s * 3 // 4 + 17, s * 5 // 4 + 17, s - 1, s + 1):
            if lo <= candidate <= hi and candidate != s:
                return candidate
        return s

    return tuple(other(s) for s in shape)


def add_metadata(path: str, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(path)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmlinattn.engine.build import build_from_config, load_weights
    from mmlinattn.engine.deploy import (
        DEFAULT_DYNAMIC_RANGE,
        ExportError,
        VerificationError,
        export_onnx,
        graph_for,
        verify_onnx,
    )

    if not osp.isfile(args.config):
        print(f'config not found: {args.config}', file=sys.stderr)
        return 2
    model, scope = build_from_config(args.config, args.cfg_options)
    print(load_weights(model, args.checkpoint))
    model.eval()
    graph = graph_for(model, args.part)
    kind = type(graph).__name__.replace('Graph', '').lower()
    lo, hi = args.dynamic_range or DEFAULT_DYNAMIC_RANGE
    h, w = args.shape
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    print(f'exporting the {kind} of {args.config} at {h}x{w}'
          + (f', dynamic height/width in {lo}..{hi} px' if args.dynamic else ''))
    try:
        info = export_onnx(graph, example, args.out, dynamic=args.dynamic,
                           dynamic_range=(lo, hi), opset=args.opset)
    except (ExportError, ValueError) as exc:
        print(f'export failed: {exc}', file=sys.stderr)
        return 1
    pre = getattr(model, 'data_preprocessor', None)
    meta = dict(mmlinattn_part=kind, config=osp.basename(args.config), scope=scope,
                dynamic=str(args.dynamic), dynamic_range=f'{lo} {hi}' if args.dynamic else '',
                export_shape=f'{h} {w}')
    for key in ('mean', 'std'):
        value = getattr(pre, key, None)
        if value is not None:
            meta[key] = ' '.join(f'{v:g}' for v in value.flatten().tolist())
    if pre is not None:
        meta['rgb_input'] = str(bool(getattr(pre, '_channel_conversion', False)))
    add_metadata(args.out, meta)
    size_mb = osp.getsize(args.out) / 2**20
    print(f'wrote {args.out} ({size_mb:.1f} MiB) in {info["seconds"]:.1f} s; outputs: '
          + ', '.join(info['outputs']))
    if args.no_verify:
        return 0
    sizes = [(h, w)]
    if args.dynamic:
        sizes.append(tuple(args.verify_shape) if args.verify_shape
                     else second_size((h, w), lo, hi))
    try:
        checks = verify_onnx(args.out, graph, sizes, atol=args.atol, rtol=args.rtol)
    except VerificationError as exc:
        print(f'verification FAILED: {exc}', file=sys.stderr)
        return 1
    for check in checks:
        print('onnxruntime vs torch at ' + check.line())
    return 0


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
