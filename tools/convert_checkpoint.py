#!/usr/bin/env python
"""Convert a released InLine ImageNet checkpoint into a plain backbone state dict.

    python tools/convert_checkpoint.py inline_swin_t.pth checkpoints/inline_swin_t_in1k.safetensors
    python tools/convert_checkpoint.py inline_swin_t.pth checkpoints/inline_swin_t_in1k.pth

Recommended output: ``.safetensors`` (the name decides). It holds only tensors: no
pickle, nothing to run, memory-mapped when read; its header records the family, the
arch and the SHA-256 of the source file. Every loader of mmlinattn reads it.

The released file pickles optimizer state and a yacs config next to the
weights; it is read with mmlinattn's safe reader (nothing in it is executed;
TorchScript archives and malformed files are refused with a one-line error and
exit status 1).
A ``.pth`` output is a plain ``{name: tensor}`` file that
``torch.load(weights_only=True)`` and the backbones'
``init_cfg=dict(type='Pretrained', checkpoint=...)`` read.
The classification head is dropped unless ``--keep-head``; every dropped key is
printed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmlinattn.checkpoint import (  # noqa: E402
    DERIVED_BUFFER_SUFFIXES,
    CheckpointError,
    extract_state_dict,
    safe_load,
    write_safetensors,
)
from mmlinattn.models import FAMILIES, detect_family, find_family  # noqa: E402


def family_of(keys: list[str], name: str | None) -> str:
    """``name`` (or an older alias of it), else the family the keys identify."""
    if name is not None:
        return find_family('deit' if name == 'vit' else name).name
    spec = detect_family(keys)
    if spec is None:
        known = '; '.join(f'{s.name}: {", ".join(s.key_prefixes)}' for s in FAMILIES.values())
        raise ValueError(f'cannot tell the model family from the checkpoint keys ({keys[:5]} '
                         f'...); the families are known by these key prefixes: {known}. Pass '
                         '--family')
    return spec.name


def infer_arch(family: str, state: dict, head_kept: bool) -> str | None:
    """The arch of ``family`` whose backbone (or classifier, ``head_kept``) has every key of
    ``state`` with the same shape and the fewest keys beyond it; None when none fits.
    Each arch is built once (a few seconds for the largest)."""
    spec = FAMILIES[family]
    best: tuple[int, str] | None = None
    for arch in spec.archs:
        model = (spec.classifier if head_kept else spec.backbone)(arch=arch)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        del model
        if all(shapes.get(k) == tuple(v.shape) for k, v in state.items()):
            extra = len(set(shapes) - set(state))
            if best is None or extra < best[0]:
                best = (extra, arch)
    return None if best is None else best[1]


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2**20), b''):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='released checkpoint (.pth)')
    parser.add_argument('dst', help='output state-dict file: NAME.safetensors (recommended: '
                        'no pickle, memory-mapped) or NAME.pth')
    parser.add_argument('--family', choices=sorted(FAMILIES) + ['vit'],
                        help="default: from the keys ('vit' is an older name of 'deit')")
    parser.add_argument('--keep-head', action='store_true',
                        help='keep the classification keys (head, final norm) unchanged')
    args = parser.parse_args(argv)

    try:
        state = extract_state_dict(safe_load(args.src), source=args.src)
        family = family_of(list(state), args.family)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    dropped = [k for k in state if k.endswith(DERIVED_BUFFER_SUFFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    if not args.keep_head:
        converted = FAMILIES[family].convert(state)
        renamed = sorted(set(state) - set(converted))
        dropped += [k for k in renamed if k.startswith('head.')]
        renamed = [k for k in renamed if not k.startswith('head.')]
        state = converted
    else:
        renamed = []
    os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
    arch = infer_arch(family, state, args.keep_head)
    if args.dst.endswith('.safetensors'):
        write_safetensors(args.dst, state, dict(
            format='pt', family=family, arch=arch or 'unknown', head='kept' if args.keep_head
            else 'dropped', source=osp.basename(args.src), source_sha256=sha256(args.src),
            converter='mmlinattn tools/convert_checkpoint.py'))
    else:
        from mmlinattn.utils.atomic import atomic_write
        with atomic_write(args.dst) as f:  # whole or absent, even if killed
            torch.save({k: v.contiguous() for k, v in state.items()}, f)
    n_params = sum(v.numel() for v in state.values())
    print(f'family: {family}, arch: {arch or "not one of the arch table"}; wrote '
          f'{len(state)} tensors ({n_params / 1e6:.2f}M values) to {args.dst}')
    if renamed:
        print('renamed (classification -> backbone): ' + ', '.join(renamed))
    print(f'dropped {len(dropped)} key(s): ' + (', '.join(dropped) if dropped else 'none'))
    return 0


if __name__ == '__main__':
    from mmlinattn.utils.cli import run_tool
    raise SystemExit(run_tool(main))
