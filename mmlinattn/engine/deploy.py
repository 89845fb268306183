"""Export to ONNX, and the check of the exported file in ONNX Runtime.

What is exported is a plain ``nn.Module`` from one NCHW image tensor (normalised,
as the model's data preprocessor leaves it) to a flat tuple of tensors:

- :class:`BackboneGraph`: a backbone's NCHW feature maps (any InLine family).
- :class:`SegmentorGraph`: an mmseg ``EncoderDecoder``'s segmentation logits at the
  input size (UperNet, Semantic FPN, ...), as its ``encode_decode``.
- :class:`DetectorGraph`: an mmdet detector's neck maps and dense head outputs
  (RPN or single-stage head: per-level class scores and box deltas). Decoding,
  NMS and a two-stage detector's RoI heads stay with the caller.

:func:`export_onnx` runs ``torch.export`` (non-strict) with named height/width
dimensions, so a size-dependent branch the code takes fails the export loudly
instead of being baked in, then converts with ``torch.onnx`` (dynamo). InLine's
operators and layers take their size-generic branches while exporting
(:func:`mmlinattn.ops.exporting`). :func:`verify_onnx` runs the file in ONNX
Runtime on CPU and compares every output with the PyTorch module on the same
input, at as many sizes as asked.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.backbones.base import InLineBackbone, chunked_inference

__all__ = ['DEFAULT_DYNAMIC_RANGE', 'ExportError', 'VerificationError', 'BackboneGraph',
           'SegmentorGraph', 'DetectorGraph', 'SizeCheck', 'export_onnx', 'verify_onnx',
           'graph_for', 'ort_session']

#: Height/width range (px) a dynamic export serves unless told otherwise. torch.export
#: treats a dimension of size 1 as a different graph: below 225 px Swin's stride-32 map
#: fits in one window, below 115 px CSwin's stride-16 stripes become one; the default
#: starts above both.
DEFAULT_DYNAMIC_RANGE = (256, 4096)


class ExportError(RuntimeError):
    """The model could not be exported; the message names the layer and the reason."""


class VerificationError(AssertionError):
    """ONNX Runtime's outputs differ from PyTorch's beyond tolerance."""


def _flat(outputs: Any) -> tuple[Tensor, ...]:
    """Tensors of nested lists/tuples, in order."""
    if isinstance(outputs, Tensor):
        return (outputs, )
    return tuple(t for item in outputs for t in _flat(item))


class BackboneGraph(nn.Module):
    """A backbone as exported: ``(1, 3, H, W) -> (feat0, feat1, ...)``, NCHW maps."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def output_names(self, n: int) -> list[str]:
        return [f'feat{i}' for i in range(n)]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return _flat(self.backbone(x))


def _image_metas(x: Tensor) -> list[dict]:
    # The sizes come from the input, so they stay symbolic under a dynamic export.
    size = tuple(x.shape[2:])
    return [dict(img_shape=size, ori_shape=size, pad_shape=size, batch_input_shape=size,
                 scale_factor=(1.0, 1.0))] * x.shape[0]


class SegmentorGraph(nn.Module):
    """An mmseg ``EncoderDecoder``: ``(1, 3, H, W) -> (logits (1, classes, H, W), )``."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def output_names(self, n: int) -> list[str]:
        return ['seg_logits']

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (self.segmentor.encode_decode(x, _image_metas(x)), )


class DetectorGraph(nn.Module):
    """An mmdet detector up to its dense head's raw outputs:
    ``(1, 3, H, W) -> (feat0..feat{L-1}, cls_score0.., bbox_pred0..)``.

    The dense head is the RPN of a two-stage detector, else the ``bbox_head`` of a
    single-stage one (RetinaNet, FCOS, ...). Box decoding, NMS and RoI heads (which
    need proposals from NMS) are not part of the graph.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        head = getattr(detector, 'rpn_head', None) or getattr(detector, 'bbox_head', None)
        if head is None:
            raise ExportError(f'{type(detector).__name__} has neither an rpn_head nor a '
                              'bbox_head: no dense head to export')
        self.detector = detector
        self.head = head
        #: Neck levels, known after the first forward (``export_onnx`` runs one eagerly
        #: before naming the outputs).
        self.num_levels = 0

    def output_names(self, n: int) -> list[str]:
        levels = self.num_levels
        per_head = (n - levels) // 2
        return ([f'feat{i}' for i in range(levels)] +
                [f'cls_score{i}' for i in range(per_head)] +
                [f'bbox_pred{i}' for i in range(per_head)])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        feats = self.detector.extract_feat(x)
        self.num_levels = len(feats)
        cls_scores, bbox_preds = self.head(feats)[:2]
        return (*feats, *cls_scores, *bbox_preds)


def graph_for(model: nn.Module, part: str = 'model') -> nn.Module:
    """The exportable module for ``model``: ``part='backbone'`` its backbone (or the
    model itself when it is a backbone), else the whole segmentor or detector."""
    backbone = getattr(model, 'backbone', model)
    if part == 'backbone':
        return BackboneGraph(backbone).eval()
    if part != 'model':
        raise ValueError(f"part must be 'model' or 'backbone', got {part!r}")
    if hasattr(model, 'encode_decode'):
        return SegmentorGraph(model).eval()
    if hasattr(model, 'extract_feat'):
        return DetectorGraph(model).eval()
    return BackboneGraph(backbone).eval()


def _unchunked(module: nn.Module) -> contextlib.AbstractContextManager:
    """Token-chunked inference off (its band loops depend on the size) while exporting."""
    if any(isinstance(m, InLineBackbone) for m in module.modules()):
        return chunked_inference(module, None)
    return contextlib.nullcontext()


def _mmseg_upsample_forward(self: nn.Module, x: Tensor) -> Tensor:
    """mmseg's ``Upsample.forward`` with the output size kept symbolic: mmseg computes
    ``int(t * factor)``, and ``int()`` of a size under export bakes in the export size
    (the graph then computes the wrong thing at any other). An integral factor is a
    multiplication of sizes, exact and identical to mmseg's result."""
    from mmseg.models.utils import resize

    if self.size:
        size = self.size
    elif float(self.scale_factor).is_integer():
        size = [t * int(self.scale_factor) for t in x.shape[-2:]]
    else:
        size = [int(t * self.scale_factor) for t in x.shape[-2:]]
    return resize(x, size, None, self.mode, self.align_corners)


def _bins(n_out: int, n_in: int, like: Tensor) -> Tensor:
    """``(n_out, n_in)``: row i averages inputs ``[floor(i n/o), ceil((i+1) n/o))``, the
    bins of adaptive average pooling, built from the (possibly symbolic) input size."""
    i = torch.arange(n_out, device=like.device)
    r = torch.arange(n_in, device=like.device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    inside = ((r[None] >= start[:, None]) & (r[None] < end[:, None])).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


def _adaptive_avg_pool2d_forward(self: nn.Module, x: Tensor) -> Tensor:
    """``nn.AdaptiveAvgPool2d`` as two bin-averaging matrix products. The ONNX
    conversion of adaptive pooling derives a fixed kernel and stride from the export
    size (UperNet's pyramid pooling then averages the wrong bins at any other size);
    the matrices are built from the input's size in the graph."""
    size = self.output_size if isinstance(self.output_size, (tuple, list)) else (
        self.output_size, self.output_size)
    h, w = x.shape[-2:]
    out_h, out_w = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
    return _bins(out_h, h, x) @ x @ _bins(out_w, w, x).transpose(0, 1)


@contextlib.contextmanager
def _export_rewrites() -> Iterator[None]:
    """Replace, for the duration of an export, OpenMMLab code that is correct eagerly but
    turns sizes into Python numbers (and so into constants of the graph)."""
    patches = [(nn.AdaptiveAvgPool2d, 'forward', nn.AdaptiveAvgPool2d.forward,
                _adaptive_avg_pool2d_forward)]
    try:
        from mmseg.models.utils.wrappers import Upsample
    except ImportError:  # mmseg is optional
        Upsample = None
    if Upsample is not None:
        patches.append((Upsample, 'forward', Upsample.forward, _mmseg_upsample_forward))
    for owner, name, _, new in patches:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, old, _ in patches:
            setattr(owner, name, old)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


_OUR_CODE = (f'{os.sep}mmlinattn{os.sep}', f'{os.sep}mmdet{os.sep}', f'{os.sep}mmseg{os.sep}',
             f'{os.sep}mmcv{os.sep}', f'{os.sep}mmengine{os.sep}')


def _where(exc: BaseException) -> str:
    """The innermost frame of the model's own code (the layer) in ``exc``'s traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if any(part in f.filename for part in _OUR_CODE)
              and f'{os.sep}engine{os.sep}deploy.py' not in f.filename]
    if not frames:
        return ''
    f = frames[-1]
    return f'{f.filename}:{f.lineno} in {f.name}: {(f.line or "").strip()}'


def _node_origin(program: Any, exc: BaseException) -> str:
    """The module and source line of the graph node the ONNX conversion failed on.

    The converter names the node (``translating node %conv2d_1``); the exported
    program's node metadata records which module called which line to create it.
    """
    match = next((m for m in (re.search(r'translating node %(\w+)', str(e))
                               for e in _chain(exc)) if m), None)
    if match is None:
        return ''
    node = next((n for n in program.graph.nodes if n.name == match.group(1)), None)
    if node is None:
        return ''
    stack = node.meta.get('nn_module_stack') or {}
    path, cls = next(reversed(stack.values()), ('', None))
    cls_name = getattr(cls, '__name__', str(cls or '')).split('.')[-1]
    lines = [ln.strip() for ln in (node.meta.get('stack_trace') or '').splitlines()
             if ln.strip()]
    source = ' | '.join(lines[-2:]) if lines else ''
    return (f'node {node.name} ({node.target}) in module {path or "<top>"} ({cls_name})'
            + (f': {source}' if source else ''))


def _describe(stage: str, exc: BaseException, origin: str = '') -> str:
    inner = _chain(exc)[-1]
    text = str(inner).strip()
    lines = text.splitlines()
    message = '\n'.join(lines[:12]) + ('\n...' if len(lines) > 12 else '')
    where = origin or _where(inner) or 'inside torch (no frame of the model code)'
    hint = ''
    if 'Constraints violated' in text or 'specializ' in text.lower():
        size = r"L\['\w+'\]\.size\(\)\[\d\]"
        lows = [int(n) for n in re.findall(rf'(\d+) <= {size}', text)]
        highs = [int(n) for n in re.findall(rf'{size} <= (\d+)', text)]
        served = (f'The sizes it serves: pass --dynamic-range {max(lows)} {min(highs)}.'
                  if lows and highs and max(lows) <= min(highs) else
                  'Narrow --dynamic-range as torch suggests above, or export at a fixed size.')
        hint = ('\nThe graph cannot serve every size in the requested range: some code '
                'takes a size-dependent branch there (TORCH_LOGS=+dynamic prints the line '
                f'of each guard). {served}')
    return f'{stage} failed: {type(inner).__name__}\n  at {where}\n{message}{hint}'


def export_onnx(module: nn.Module,
                example: Tensor,
                path: str,
                dynamic: bool = False,
                dynamic_range: tuple[int, int] = DEFAULT_DYNAMIC_RANGE,
                output_names: Optional[Sequence[str]] = None,
                opset: Optional[int] = None) -> dict:
    """Export ``module(example)`` to the ONNX file ``path``.

    Args:
        module: maps one ``(B, 3, H, W)`` tensor to a tensor or (nested) sequence.
        example: the input traced (its size is the export size).
        dynamic: height and width become the ONNX input's dims ``height``, ``width``,
            valid over ``dynamic_range`` (px, inclusive).
        output_names: names of the flattened outputs (default ``out0, out1, ...``).
        opset: ONNX opset (default: the exporter's).

    Returns:
        ``dict(seconds=..., outputs=[names])``. Raises :class:`ExportError` naming the
        layer (file, line, code) and the reason when torch cannot export the model.
    """
    lo, hi = dynamic_range
    if dynamic and not (lo <= example.shape[2] <= hi and lo <= example.shape[3] <= hi):
        raise ValueError(f'export size {tuple(example.shape[2:])} is outside the dynamic '
                         f'range {lo}..{hi} px')
    module = module.eval()
    shapes = None
    if dynamic:
        dims = {2: torch.export.Dim('height', min=lo, max=hi),
                3: torch.export.Dim('width', min=lo, max=hi)}
        shapes = (dims, )
    start = time.perf_counter()
    with torch.no_grad(), _unchunked(module), _export_rewrites():
        n_out = len(_flat(module(example)))
        try:
            # Guards that every size in the range satisfies but sympy cannot prove (pad
            # arithmetic) become runtime asserts instead of errors; a real
            # specialisation still fails here.
            program = torch.export.export(module, (example, ), dynamic_shapes=shapes,
                                          strict=False,
                                          prefer_deferred_runtime_asserts_over_guards=True)
        except Exception as exc:
            raise ExportError(_describe('torch.export', exc)) from exc
        if output_names is None:
            names = (module.output_names(n_out) if hasattr(module, 'output_names')
                     else [f'out{i}' for i in range(n_out)])
        else:
            names = list(output_names)
        try:
            onnx_program = torch.onnx.export(program, (example, ), dynamo=True,
                                             input_names=['input'], output_names=names,
                                             opset_version=opset, verbose=False)
        except Exception as exc:
            raise ExportError(_describe('conversion to ONNX', exc,
                                        _node_origin(program, exc))) from exc
    onnx_program.save(path)
    return dict(seconds=time.perf_counter() - start, outputs=names)


@dataclass
class SizeCheck:
    """ONNX Runtime against PyTorch at one input size."""

    size: tuple[int, int]
    #: Per output: max |ort - torch| and that over max |torch| (relative to the scale).
    max_abs: list[float] = field(default_factory=list)
    max_rel: list[float] = field(default_factory=list)
    ok: bool = True
    torch_ms: float = 0.0
    ort_ms: float = 0.0

    def line(self) -> str:
        return (f'{self.size[0]}x{self.size[1]}: max abs {max(self.max_abs):.3g}, max rel '
                f'{max(self.max_rel):.3g} over {len(self.max_abs)} outputs; torch '
                f'{self.torch_ms:.1f} ms, onnxruntime {self.ort_ms:.1f} ms: '
                f'{"ok" if self.ok else "MISMATCH"}')


def ort_session(path: str, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session for ``path``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError('onnxruntime is not installed: pip install -e .[deploy]') from exc
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def verify_onnx(path: str,
                module: nn.Module,
                sizes: Sequence[tuple[int, int]],
                atol: float = 1e-4,
                rtol: float = 1e-3,
                seed: int = 0) -> list[SizeCheck]:
    """Run ``path`` in ONNX Runtime (CPU) and ``module`` on the same random inputs.

    An output passes when ``max |ort - torch| <= atol + rtol * max |torch|``. Raises
    :class:`VerificationError` listing every size when any output fails; returns the
    checks otherwise.
    """
    session = ort_session(path)
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    checks = []
    module = module.eval()
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=g)
        with torch.no_grad(), _unchunked(module):
            start = time.perf_counter()
            expected = _flat(module(x))
            torch_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        got = session.run(None, {name: x.numpy()})
        check = SizeCheck((h, w), torch_ms=torch_ms, ort_ms=(time.perf_counter() - start) * 1e3)
        if len(got) != len(expected):
            raise VerificationError(f'{h}x{w}: ONNX Runtime gave {len(got)} outputs, '
                                    f'PyTorch {len(expected)}')
        for ref, out in zip(expected, got):
            out = torch.from_numpy(out)
            if tuple(out.shape) != tuple(ref.shape):
                raise VerificationError(f'{h}x{w}: ONNX output shape {tuple(out.shape)} != '
                                        f'PyTorch {tuple(ref.shape)}')
            diff = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
            scale = ref.abs().max().item() if ref.numel() else 0.0
            check.max_abs.append(diff)
            check.max_rel.append(diff / scale if scale > 0 else diff)
            check.ok &= diff <= atol + rtol * scale
        checks.append(check)
    if not all(c.ok for c in checks):
        raise VerificationError('ONNX Runtime differs from PyTorch beyond tolerance '
                                f'(atol {atol}, rtol {rtol}):\n' +
                                '\n'.join(c.line() for c in checks))
    return checks
