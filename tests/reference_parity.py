"""Check our sibling-attention models against the authors' own code, and record the
reference data the tests use where that code is absent.

The authors' repositories are not dependencies: clone them anywhere and point at them::

    git clone https://github.com/LeapLabTHU/Agent-Attention
    git clone https://github.com/LeapLabTHU/FLatten-Transformer
    git clone https://github.com/LeapLabTHU/MLLA
    python tests/reference_parity.py --agent Agent-Attention --flatten FLatten-Transformer \
        --mlla MLLA

For every released model it builds the authors' classifier with random weights, loads
the same weights into ours (timm) and compares the logits at the released size; for
Agent-Swin-T, Agent-PVT-S and MLLA-T also the authors' downstream (detection) backbone
at 320 x 480, 448 x 672 and 333 x 517 (window padding, odd sides).
With ``--record DIR`` it writes ``sibling_state_dicts.json`` (every key and shape of
each released layout) and ``sibling_reference_outputs.json`` (tiny attention modules
of the authors' code: their weights, an input and the output), which
``tests/test_models/test_sibling_families.py`` checks us against.

The authors' files are imported as they are; the only edits are to imports that need
packages we do not use (``einops``, unused there) or mmdet 2.x (their downstream
backbone registers itself in mmdet 2's registry; it is given a stand-in registry).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import types
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmlinattn.models  # noqa: E402,F401  (registers the timm models)
from mmlinattn.checkpoint import DERIVED_BUFFER_SUFFIXES  # noqa: E402
from mmlinattn.models.backbones import MLLA, AgentPVT, AgentSwin  # noqa: E402

DERIVED = DERIVED_BUFFER_SUFFIXES  # what our loaders drop: recomputed, not learned


class _FlattenTokens(torch.nn.Module):
    """Stand-in for einops' ``Rearrange('b c h w -> b (h w) c', ...)`` in the CSwin stems
    (einops is not a dependency of ours)."""

    def __init__(self, pattern: str, **sizes: int) -> None:
        super().__init__()
        if pattern != 'b c h w -> b (h w) c':
            raise ValueError(f'stand-in Rearrange cannot do {pattern!r}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def _register_module(cls=None):
    """mmdet 2's ``@BACKBONES.register_module`` and ``register_module()``: a no-op."""
    return cls if cls is not None else (lambda c: c)


def load_module(path: Path, name: str) -> types.ModuleType:
    """Import the authors' ``path`` as module ``name`` with the import edits above."""
    source = path.read_text()
    edits = {
        'from einops import rearrange': 'rearrange = None  # einops: unused here',
        'from ..builder import BACKBONES': 'BACKBONES = _STAND_IN_REGISTRY',
        'from ...utils import get_root_logger': 'get_root_logger = None',
        'from mmcv.runner import _load_checkpoint': '_load_checkpoint = None',
        'from einops.layers.torch import Rearrange': 'Rearrange = _FlattenTokens',
        # Their timm registrations would replace ours of the same names (agent_deit_*).
        '@register_model\n': '',
        'from .deit import Block': 'from ref_agent_deit_blocks import Block',
    }
    for old, new in edits.items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module._STAND_IN_REGISTRY = types.SimpleNamespace(register_module=_register_module)
    module._FlattenTokens = _FlattenTokens
    sys.modules[name] = module
    exec(compile(source, str(path), 'exec'), module.__dict__)
    return module


def _swin(module, cls: str, dims: int, depths, heads, window: int, size: int, **kw):
    return lambda: getattr(module, cls)(img_size=size, embed_dim=dims, depths=depths,
                                        num_heads=heads, window_size=window, **kw)


def _pvt(module, fn: str, size: int, **kw):
    return lambda: getattr(module, fn)(img_size=size, **kw)


def released_builders(agent: Path | None, flatten: Path | None, mlla: Path | None = None
                      ) -> dict:
    """Our timm name -> (the released file stem, a builder of the authors' classifier)."""
    out = {}
    t, s, b = ([2, 2, 6, 2], [3, 6, 12, 24]), ([2, 2, 18, 2], [3, 6, 12, 24]), \
        ([2, 2, 18, 2], [4, 8, 16, 32])
    if agent is not None:
        m = load_module(agent / 'agent_transformer' / 'models' / 'agent_swin.py', 'ref_agent_swin')
        a = dict(agent_num=[9, 16, 49, 49])
        out.update({
            'agent_swin_tiny': ('agent_swin_t', _swin(m, 'AgentSwinTransformer', 96, *t, 56, 224,
                                                      attn_type='AAAB', **a)),
            'agent_swin_small': ('agent_swin_s', _swin(m, 'AgentSwinTransformer', 96, *s, 56,
                                                       224, attn_type='AABB', **a)),
            'agent_swin_base': ('agent_swin_b', _swin(m, 'AgentSwinTransformer', 128, *b, 56,
                                                      224, attn_type='AAMB2', **a)),
            'agent_swin_small_288': ('agent_swin_s_288', _swin(
                m, 'AgentSwinTransformer', 96, *s, 72, 288, attn_type='AABB', **a)),
            'agent_swin_base_384': ('agent_swin_b_384', _swin(
                m, 'AgentSwinTransformer', 128, *b, 96, 384, attn_type='AAMB2', **a)),
        })
    if agent is not None:
        m = load_module(agent / 'agent_transformer' / 'models' / 'agent_pvt.py', 'ref_agent_pvt')
        for size, stem, name in [('tiny', 't', ''), ('small', 's', ''), ('medium', 'm', ''),
                                 ('medium', 'm', '_256'), ('large', 'l', '')]:
            out[f'agent_pvt_{size}{name}'] = (f'agent_pvt_{stem}{name}', _pvt(
                m, f'agent_pvt_{size}', 256 if name else 224, agent_num=[9, 16, 49, 49],
                attn_type='AAAA', agent_sr_ratios='1111'))
    if agent is not None:
        m = load_module(agent / 'agent_transformer' / 'models' / 'agent_cswin.py',
                        'ref_agent_cswin')
        a = dict(agent_num=['9', '16', '49', '49'], attn_type='AABB')
        for size, stem, fn in [('tiny', 't', 'Agent_CSWin_64_24181_tiny_224'),
                               ('small', 's', 'Agent_CSWin_64_36292_small_224'),
                               ('base', 'b', 'Agent_CSWin_96_36292_base_224'),
                               ('base_384', 'b_384', 'Agent_CSWin_96_36292_base_384')]:
            px = 384 if size.endswith('384') else 224
            out[f'agent_cswin_{size}'] = (f'agent_cswin_{stem}', _pvt(
                m, fn, px, la_split_size='96-48-24-12' if px == 384 else '56-28-14-7', **a))
        load_module(agent / 'agent_transformer' / 'models' / 'deit.py', 'ref_agent_deit_blocks')
        m = load_module(agent / 'agent_transformer' / 'models' / 'agent_deit.py', 'ref_agent_deit')
        # Their factories go through timm 0.4's build_model_with_cfg; the model class
        # with the factories' arguments is the same model.
        for size, stem, px, dim, heads, agents, layers in [
                ('tiny', 't', 224, 192, 3, 49, -1), ('small', 's', 224, 384, 6, 49, -1),
                ('small_448', 's_448', 448, 384, 6, 49, -1), ('base', 'b', 224, 768, 12, 81, 4)]:
            out[f'agent_deit_{size}'] = (f'agent_deit_{stem}', functools.partial(
                m.VisionTransformer, img_size=px, patch_size=16, embed_dim=dim, depth=12,
                num_heads=heads, agent_num=[agents] * 4, agent_layer=layers))
    if flatten is not None:
        m = load_module(flatten / 'models' / 'flatten_cswin.py', 'ref_flatten_cswin')
        # Only T was released (S and B are configs without weights).
        out['flatten_cswin_tiny'] = ('flatten_cswin_t', _pvt(
            m, 'FLatten_CSWin_64_24181_tiny_224', 224, attn_type='LLSS',
            la_split_size='56-28-14-7'))
        m = load_module(flatten / 'models' / 'flatten_pvt_v2.py', 'ref_flatten_pvt_v2')
        out['flatten_pvt_v2_b0'] = ('flatten_pvt_v2_b0', lambda m=m: m.flatten_pvt_v2_b0(
            attn_type='LLLL', la_sr_ratios='1111'))
        m = load_module(flatten / 'models' / 'flatten_pvt.py', 'ref_flatten_pvt')
        out['flatten_pvt_tiny'] = ('flatten_pvt_t', _pvt(m, 'flatten_pvt_tiny', 224,
                                                         attn_type='LLLL', la_sr_ratios='1111'))
        m = load_module(flatten / 'models' / 'flatten_swin.py', 'ref_flatten_swin')
        cls = 'FLattenSwinTransformer'
        out.update({
            'flatten_swin_tiny': ('flatten_swin_t', _swin(m, cls, 96, *t, 56, 224,
                                                          attn_type='LLSS')),
            'flatten_swin_small': ('flatten_swin_s', _swin(m, cls, 96, *s, 56, 224,
                                                           attn_type='LLSS')),
            'flatten_swin_base': ('flatten_swin_b', _swin(m, cls, 128, *b, 56, 224,
                                                          attn_type='LLSS')),
            'flatten_swin_base_384': ('flatten_swin_b_384', _swin(m, cls, 128, *b, 96, 384,
                                                                  attn_type='LLSS')),
        })
    if mlla is not None:
        m = load_module(mlla / 'models' / 'mlla.py', 'ref_mlla')
        out.update({
            'mlla_tiny': ('mlla_t', lambda: m.MLLA(embed_dim=64, depths=[2, 4, 8, 4],
                                                   num_heads=[2, 4, 8, 16])),
            'mlla_small': ('mlla_s', lambda: m.MLLA(embed_dim=64, depths=[3, 6, 21, 6],
                                                    num_heads=[2, 4, 8, 16])),
            'mlla_base': ('mlla_b', lambda: m.MLLA(embed_dim=96, depths=[3, 6, 21, 6],
                                                   num_heads=[3, 6, 12, 24])),
        })
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def learnable(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(DERIVED)}


def compare_classifier(name: str, build, batch: int = 1) -> tuple[float, dict]:
    """Logits of the authors' model and ours with the same random weights."""
    torch.manual_seed(0)
    ref = build().eval()
    state = ref.state_dict()
    ours = timm.create_model(name).eval()
    ours.load_state_dict(learnable(state), strict=True)
    size = ours.pretrained_cfg['input_size'][-1]
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        err = relative_error(ref(x), ours(x))
    layout = {'params': sum(p.numel() for p in ref.parameters()),
              'state_dict': {k: list(v.shape) for k, v in state.items()}}
    return err, layout


#: Input sizes of the downstream comparisons: stage maps that are no multiple of the
#: 7x7 windows (320 x 480: 10 x 15 at stride 32), multiples of them (448 x 672), and odd
#: sides (333 x 517: strides that do not divide them; PVT drops the remainder).
DOWNSTREAM_SIZES = ((320, 480), (448, 672), (333, 517))


def compare_agent_downstream(agent: Path, size: tuple[int, int] = (448, 672)) -> list[float]:
    """The authors' Agent-Swin-T detection backbone (9-12-14-7 agents) and ours at a
    non-square size: the relative error of each output map."""
    m = load_module(agent / 'downstream' / 'detection' / 'mmdet' / 'models' / 'backbones' /
                    'agent_swin.py', 'ref_agent_swin_downstream')
    shapes = [(9, 9), (12, 12), (14, 14), (7, 7)]
    torch.manual_seed(0)
    ref = m.AgentSwinTransformer(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                 window_size=56, drop_path_rate=0., agent_num=[9, 16, 49, 49],
                                 downstream_agent_shapes=shapes, kernel_size=3,
                                 attn_type='AAAB', scale=-0.5).eval()
    ours = AgentSwin('tiny', agent_shapes=shapes, drop_path_rate=0.).eval()
    ours.load_state_dict(learnable(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        return [relative_error(a, b) for a, b in zip(ref(x), ours(x))]


def compare_agent_pvt_downstream(agent: Path, size: tuple[int, int] = (448, 672)
                                  ) -> list[float]:
    """The authors' Agent-PVT-S detection backbone (12-16-28-28 agents; no output norms)
    and ours at a non-square size: the relative error of each output map."""
    m = load_module(agent / 'downstream' / 'detection' / 'mmdet' / 'models' / 'backbones' /
                    'agent_pvt.py', 'ref_agent_pvt_downstream')
    shapes = [(12, 12), (16, 16), (28, 28), (28, 28)]
    torch.manual_seed(0)
    ref = m.AgentPVT(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8],
                     mlp_ratios=[8, 8, 4, 4], qkv_bias=True, depths=[3, 4, 6, 3],
                     agent_num=[9, 16, 49, 49], downstream_agent_shapes=shapes,
                     attn_type='AAAA')
    ref.train(False)  # its train() returns None, so .eval() would too
    ours = AgentPVT('small', agent_shapes=shapes, out_norm=False, drop_path_rate=0.).eval()
    ours.load_state_dict(learnable(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        return [relative_error(a, b) for a, b in zip(ref(x), ours(x))]


def compare_mlla_downstream(mlla: Path, size: tuple[int, int] = (450, 670)) -> list[float]:
    """The authors' MLLA-T detection backbone and ours at a size whose maps are odd
    (the stem pads the image, the merges pad odd maps): each output map's error."""
    m = load_module(mlla / 'downstream' / 'detection' / 'mmdet' / 'models' / 'backbones' /
                    'mlla.py', 'ref_mlla_downstream')
    torch.manual_seed(0)
    ref = m.MLLA(embed_dim=64, depths=[2, 4, 8, 4], num_heads=[2, 4, 8, 16],
                 drop_path_rate=0.).eval()
    ours = MLLA('tiny', drop_path_rate=0.).eval()
    ours.load_state_dict(learnable(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        return [relative_error(a, b) for a, b in zip(ref(x), ours(x))]


def _tensor(t: torch.Tensor) -> dict:
    return {'shape': list(t.shape), 'values': [round(float(v), 8) for v in t.reshape(-1)]}


def record_module_outputs(agent: Path, flatten: Path, mlla: Path) -> dict:
    """Tiny attention modules of the authors' code: weights, input, output."""
    out = {}
    down = sys.modules.get('ref_mlla_downstream') or load_module(
        mlla / 'downstream' / 'detection' / 'mmdet' / 'models' / 'backbones' / 'mlla.py',
        'ref_mlla_downstream')
    torch.manual_seed(2)
    block = down.MLLABlock(16, input_resolution=(4, 4), num_heads=2).eval()
    hw = (3, 5)  # not the 4 x 4 its RoPE buffer was built for: RoPE at run time
    x = torch.randn(2, hw[0] * hw[1], 16)
    with torch.no_grad():
        y = block(x, hw)
    out['mlla_block'] = dict(config=dict(dim=16, num_heads=2, hw=list(hw)),
                             state_dict={k: _tensor(v) for k, v in block.state_dict().items()},
                             input=_tensor(x), output=_tensor(y))
    down = sys.modules.get('ref_agent_swin_downstream') or load_module(
        agent / 'downstream' / 'detection' / 'mmdet' / 'models' / 'backbones' / 'agent_swin.py',
        'ref_agent_swin_downstream')
    torch.manual_seed(0)
    attn = down.AgentAttention(12, input_resolution=(4, 4), window_size=(4, 4), num_heads=3,
                               agent_num=4, downstream_agent_shape=(3, 3)).eval()
    hw = (5, 7)
    x = torch.randn(2, hw[0] * hw[1], 12)
    with torch.no_grad():
        y = attn(x, None, hw)
    out['agent_downstream'] = dict(
        config=dict(dim=12, num_heads=3, agent_num=4, bias_size=[4, 4], agent_shape=[3, 3],
                    hw=list(hw)),
        state_dict={k: _tensor(v) for k, v in attn.state_dict().items()},
        input=_tensor(x), output=_tensor(y))
    fl = sys.modules.get('ref_flatten_swin') or load_module(
        flatten / 'models' / 'flatten_swin.py', 'ref_flatten_swin')
    torch.manual_seed(1)
    attn = fl.FocusedLinearAttention(12, window_size=(4, 4), num_heads=3)
    attn.train(False)  # its eval() returns None
    with torch.no_grad():
        for p in (attn.scale, attn.positional_encoding):  # zeros as initialised: not a test
            p.normal_()
        x = torch.randn(2, 16, 12)
        y = attn(x)
    out['focused'] = dict(config=dict(dim=12, num_heads=3, grid=[4, 4], hw=[4, 4]),
                          state_dict={k: _tensor(v) for k, v in attn.state_dict().items()},
                          input=_tensor(x), output=_tensor(y))
    # DeiT's agent attention: a class token and a 3 x 3 patch map, 4 agents.
    deit = sys.modules.get('ref_agent_deit')
    torch.manual_seed(3)
    attn = deit.AgentAttention(12, num_heads=3, qkv_bias=True, agent_num=4, window=3).eval()
    x = torch.randn(2, 1 + 9, 12)
    with torch.no_grad():
        y = attn(x)
    out['agent_deit'] = dict(config=dict(dim=12, num_heads=3, agent_num=4, hw=[3, 3]),
                             state_dict={k: _tensor(v) for k, v in attn.state_dict().items()},
                             input=_tensor(x), output=_tensor(y))
    # CSwin's global branches take the block's q, k, v: (3, B, h*w, C) on a 4 x 4 map.
    for key, module, cls, extra in [('agent_cswin', 'ref_agent_cswin', 'AgentAttention',
                                     dict(agent_num=4)),
                                    ('focused_cswin', 'ref_flatten_cswin',
                                     'FocusedLinearAttention', {})]:
        torch.manual_seed(4)
        branch = getattr(sys.modules[module], cls)(8, resolution=4, idx=-1, split_size=4,
                                                   num_heads=2, **extra)
        branch.train(False)
        with torch.no_grad():
            for name in ('scale', 'positional_encoding'):  # zeros as initialised
                if isinstance(getattr(branch, name, None), torch.nn.Parameter):
                    getattr(branch, name).normal_()
            qkv = torch.randn(3, 2, 16, 8)
            y = branch(qkv)
        out[key] = dict(config=dict(dim=8, num_heads=2, hw=[4, 4], **extra),
                        state_dict={k: _tensor(v) for k, v in branch.state_dict().items()},
                        input=_tensor(qkv), output=_tensor(y))
    return out


def record_window_blocks(agent: Path) -> dict:
    """The authors' Agent-Swin detection block with window softmax attention
    (``attn_type='B'``, window 4) at maps that are no multiple of the window (padded and
    attended) and one that fits in a window (shifted all the same)."""
    down = sys.modules.get('ref_agent_swin_downstream') or load_module(
        agent / 'downstream' / 'detection' / 'mmdet' / 'models' / 'backbones' / 'agent_swin.py',
        'ref_agent_swin_downstream')
    out = {}
    for key, hw, shift in [('agent_swin_window_block_5x7', (5, 7), 2),
                           ('agent_swin_window_block_3x3', (3, 3), 2),
                           ('agent_swin_window_block_5x7_unshifted', (5, 7), 0)]:
        torch.manual_seed(5)
        block = down.SwinTransformerBlock(12, input_resolution=(4, 4), num_heads=3,
                                          window_size=4, shift_size=shift, attn_type='B')
        block.eval()
        with torch.no_grad():
            block.attn.relative_position_bias_table.normal_()  # zeros as initialised
            x = torch.randn(2, hw[0] * hw[1], 12)
            y = block(x, hw)
        out[key] = dict(config=dict(dim=12, num_heads=3, window=4, shift=shift, hw=list(hw)),
                        state_dict={k: _tensor(v) for k, v in block.state_dict().items()},
                        input=_tensor(x), output=_tensor(y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--agent', type=Path, help='a clone of LeapLabTHU/Agent-Attention')
    parser.add_argument('--flatten', type=Path,
                        help='a clone of LeapLabTHU/FLatten-Transformer')
    parser.add_argument('--mlla', type=Path, help='a clone of LeapLabTHU/MLLA')
    parser.add_argument('--only', nargs='*', help='our timm names to check (default: all)')
    parser.add_argument('--record', type=Path, help='write the reference JSON files here')
    args = parser.parse_args()
    if args.agent is None and args.flatten is None and args.mlla is None:
        parser.error('give --agent, --flatten and/or --mlla')
    layouts = {}
    for name, (stem, build) in released_builders(args.agent, args.flatten, args.mlla).items():
        if args.only and name not in args.only:
            continue
        err, layouts[stem] = compare_classifier(name, build)
        print(f'{name:24s} logits relative error {err:.2e}  '
              f'({layouts[stem]["params"] / 1e6:.1f} M parameters)', flush=True)
    downstream = []
    if args.agent is not None:
        downstream += [('agent_swin_tiny (agents 9-12-14-7)', compare_agent_downstream,
                        args.agent),
                       ('agent_pvt_small (agents 12-16-28-28)', compare_agent_pvt_downstream,
                        args.agent)]
    if args.mlla is not None:
        downstream.append(('mlla_tiny', compare_mlla_downstream, args.mlla))
    for name, compare, root in downstream:
        for size in DOWNSTREAM_SIZES:
            errs = compare(root, size)
            print(f'{name} downstream at {size[0]} x {size[1]}: maps relative error '
                  + ', '.join(f'{e:.2e}' for e in errs), flush=True)
    if args.record is not None:
        if None in (args.agent, args.flatten, args.mlla):
            parser.error('--record needs --agent, --flatten and --mlla')
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / 'sibling_state_dicts.json').write_text(json.dumps(layouts, indent=0))
        (args.record / 'sibling_reference_outputs.json').write_text(
            json.dumps(dict(record_module_outputs(args.agent, args.flatten, args.mlla),
                            **record_window_blocks(args.agent))))
        print(f'wrote {args.record}/sibling_state_dicts.json and sibling_reference_outputs.json')


if __name__ == '__main__':
    main()
