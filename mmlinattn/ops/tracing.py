"""Whether the code runs under a graph export (``torch.export``, ONNX).

Eager code takes shortcuts decided from concrete shapes: skip padding when a map
is already a multiple, attend a map smaller than a window as a whole, read
tokens in cache-sized chunks. Under an export with dynamic height and width
each such decision would be baked into the graph for the export size (or
become a guard the exported file never checks), and the graph would compute
the wrong thing at another size. While :func:`exporting` is True the operators
and layers take the branch that is correct for every size instead; its results
equal the shortcut's where the shortcut applies.
"""
from __future__ import annotations

import torch

__all__ = ['exporting']


def exporting() -> bool:
    """True while ``torch.export`` (which ``torch.onnx.export(dynamo=True)`` uses) or the
    TorchScript-based ONNX exporter traces the model."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())
