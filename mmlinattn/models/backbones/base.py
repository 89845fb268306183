"""What every InLine backbone shares: the OpenMMLab contract around the stages.

A subclass declares, in its class body, ``arch_settings`` (its arch table) and
``convert_checkpoint`` (released classification keys -> backbone keys). Its
``__init__`` resolves the arch, calls ``super().__init__(num_stages, **contract)``
first, builds its stages, then calls :meth:`_finish_init`. It implements
:meth:`_stem_modules`, :meth:`_stage_modules` (what ``frozen_stages`` freezes) and
:meth:`forward_stages`.

Arguments are declared once and passed on by name. :class:`InLineBackbone` declares
the contract (``out_indices``, ``out_norm``, ``frozen_stages``, ``with_cp``,
``chunk_tokens``, ``pretrained``, ``init_cfg``); a layout base (``PVTBackbone``,
``PVTv2Backbone``, ``SwinBackbone``, ``CSwinBackbone``, ``DeiTBackbone``) declares its
layout with the released defaults and passes the contract on as ``**contract``; a
family takes its attention's own arguments and passes the rest on as ``**layout``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor, nn

from ...checkpoint import (
    adapt_position_tables,
    check_checkpoint_fits,
    drop_derived_buffers,
    extract_state_dict,
    load_state_dict_checked,
    safe_load,
)
from ...parallel import (
    RowSpans,
    SpatialGroup,
    current_group,
    own_rows,
    resized_rows,
    row_spans,
    strided_rows,
    strided_spans,
)
from ..layers import (
    DEFAULT_CHUNK_TOKENS,
    band_rows,
    chunked_block,
    chunked_embed,
    fill_rows,
    row_bands,
    run_block,
)
from ..layers.weight_init import init_transformer_weights

__all__ = ['InLineBackbone', 'StagedBackbone', 'RowSource', 'chunked_inference',
           'init_transformer_weights', 'resolve_arch']


class RowSource:
    """An NCHW input the backbone never holds whole: ``read(r0, r1)`` returns its rows
    ``[r0, r1)`` as ``(B, C, r1 - r0, W)``, e.g. normalised bands decoded from a file.

    Accepted by a chunked backbone's first embedding (``forward(RowSource(...))``),
    which reads the rows each band of its output needs; ``shape`` and ``dim()`` are a
    tensor's, for the checks a backbone makes on its input.
    """

    def __init__(self, shape: Sequence[int], read: Callable[[int, int], Tensor],
                 bands: Optional[Sequence[tuple[int, int]]] = None) -> None:
        if len(shape) != 4:
            raise ValueError(f'RowSource: an NCHW shape is needed, got {tuple(shape)}')
        self.shape = torch.Size(shape)
        self.read = read
        self.bands = None if bands is None else list(bands)

    def dim(self) -> int:
        return 4

    def rows(self, r0: int, r1: int) -> Tensor:
        """Rows ``[r0, r1)``, checked to be what was asked for."""
        band = self.read(r0, r1)
        expected = (self.shape[0], self.shape[1], r1 - r0, self.shape[3])
        if tuple(band.shape) != expected:
            raise RuntimeError(f'RowSource: rows {r0}:{r1} came back as {tuple(band.shape)}, '
                               f'expected {expected}')
        return band


def _check_chunk_tokens(chunk_tokens: Optional[int]) -> Optional[int]:
    if chunk_tokens is True:
        return DEFAULT_CHUNK_TOKENS
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool)
                                     or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f'chunk_tokens must be None (off), True ({DEFAULT_CHUNK_TOKENS}) or a '
                         f'positive number of tokens per band; got {chunk_tokens!r}')
    return chunk_tokens

StateDictConverter = Callable[[Mapping[str, Tensor]], dict]


def resolve_arch(arch: Union[str, dict], table: Mapping[str, dict], family: str,
                 overrides: Mapping[str, object]) -> dict:
    """The arch setting of ``table[arch]`` (or a full dict) with explicit non-None overrides."""
    if isinstance(arch, str):
        key = arch.lower()
        if key not in table:
            raise ValueError(f'unknown {family} arch {arch!r}; expected one of {sorted(table)} '
                             'or a dict')
        setting = dict(table[key])
    elif isinstance(arch, dict):
        setting = dict(arch)
    else:
        raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')
    setting.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in next(iter(table.values())) if k not in setting]
    if missing:
        raise ValueError(f'{family} arch is missing {missing}')
    # Per-stage settings (depths, num_heads, ...) need one entry per stage each.
    per_stage = {k: v for k, v in setting.items() if isinstance(v, (list, tuple))}
    if len({len(v) for v in per_stage.values()}) > 1:
        raise ValueError(f'{family}: ' + ', '.join(f'{k} {list(v)}' for k, v in per_stage.items())
                         + ' must have one entry per stage each')
    return setting


class InLineBackbone(BaseModule):
    """Base of the InLine backbones: out_indices, out_norm, frozen_stages, with_cp, init_cfg.

    Args:
        num_stages: stages the subclass builds (blocks for the plain DeiT); indices
            in ``out_indices`` and ``frozen_stages`` count these.
        out_indices: stages whose outputs ``forward`` returns (negative from the end).
        out_norm: a LayerNorm ``norm{i}`` on each returned stage.
        frozen_stages: -1 none; 0 the stem; k also stages 0..k-1 (eval mode, no grads).
        with_cp: activation checkpointing per block.
        chunk_tokens: token-chunked inference (:mod:`mmlinattn.models.layers.chunked`):
            None (default) off; a number of tokens per band (``True``: 65536). Each
            block, embedding and output norm then runs over its map in bands of rows,
            exactly (up to float summation order), with peak memory a small multiple
            of one map. Used only without autograd and in eval mode; see also
            :func:`chunked_inference`.
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg: mmengine init config; ``Pretrained`` loads released or converted
            checkpoints safely (:meth:`load_pretrained`).
    """

    #: The named architectures (``arch='tiny'``, ...): each a dict of the arch's settings.
    arch_settings: ClassVar[Mapping[str, dict]]
    #: Released classification state dict -> backbone state dict (a staticmethod).
    convert_checkpoint: ClassVar[Optional[StateDictConverter]] = None
    #: How the model resizes its absolute position embeddings at run time; pretrained
    #: embeddings on another grid are resized the same way when loaded.
    pos_embed_interpolation: ClassVar[str] = 'bicubic'

    def __init__(self,
                 num_stages: int,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_norm: bool = True,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None,
                 chunk_tokens: Optional[int] = None) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('pass either pretrained or init_cfg, not both')
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a str or None, got {type(pretrained)}')
            warnings.warn('pretrained is deprecated; use init_cfg=dict(type="Pretrained", '
                          'checkpoint=...)', DeprecationWarning, stacklevel=2)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.num_stages = num_stages
        self.out_norm = out_norm
        out_indices = tuple(out_indices) if not isinstance(out_indices, int) else (out_indices, )
        bad = [i for i in out_indices if not -self.num_stages <= i < self.num_stages]
        if bad:
            raise ValueError(f'out_indices {bad} out of range for {self.num_stages} stages')
        self.out_indices = tuple(sorted(i % self.num_stages for i in out_indices))
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], got '
                             f'{frozen_stages}')
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.chunk_tokens = _check_chunk_tokens(chunk_tokens)

    # -- contract -------------------------------------------------------------------------
    def _stem_modules(self) -> list[nn.Module]:
        """Modules frozen by ``frozen_stages >= 0`` (the patch embedding)."""
        raise NotImplementedError

    def _stage_modules(self, i: int) -> list[nn.Module]:
        """Modules of stage ``i`` (blocks, its embedding or merging, its output norm)."""
        raise NotImplementedError

    def _stage_params(self, i: int) -> list[nn.Parameter]:
        """Bare parameters of stage ``i`` (e.g. position embeddings); none by default."""
        return []

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        modules = list(self._stem_modules())
        params = []
        for i in range(self.frozen_stages):
            modules += self._stage_modules(i)
            params += self._stage_params(i)
        for m in modules:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False
        for p in params:
            p.requires_grad = False

    def train(self, mode: bool = True) -> InLineBackbone:
        super().train(mode)
        self._freeze_stages()
        return self

    @classmethod
    def resolve_arch(cls, arch: Union[str, dict], **overrides: object) -> dict:
        """:func:`resolve_arch` on this class's ``arch_settings``."""
        return resolve_arch(arch, cls.arch_settings, cls.__name__, overrides)

    def _finish_init(self) -> None:
        """After the stages exist: the reference initialisation, then ``frozen_stages``."""
        self.apply(init_transformer_weights)
        self._freeze_stages()

    # -- weights --------------------------------------------------------------------------
    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> None:
        """Load a released classification checkpoint or a converted/backbone state dict.

        The file is read with :func:`mmlinattn.checkpoint.safe_load` (no code in it
        runs); ``backbone.`` prefixes (detector checkpoints) and the classification
        keys are converted; position tables learned for another window or grid are
        interpolated (:func:`~mmlinattn.checkpoint.adapt_position_tables`, logged).
        A checkpoint of which fewer than half the model's keys are found, or whose
        shapes do not fit, raises :class:`~mmlinattn.checkpoint.CheckpointMismatchError`.
        """
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f'{type(self).__name__}: pretrained checkpoint {checkpoint!r} not found. '
                'Download the released ImageNet checkpoint from the InLine release '
                '(https://github.com/LeapLabTHU/InLine) and convert it with '
                f'`python tools/convert_checkpoint.py <released.pth> {checkpoint}`, or set '
                "the backbone's init_cfg=None to train from scratch.")
        state = extract_state_dict(safe_load(checkpoint), source=checkpoint)
        prefix = prefix if prefix is not None else (
            'backbone.' if any(k.startswith('backbone.') for k in state) else None)
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = drop_derived_buffers(state)
        if type(self).convert_checkpoint is not None:
            state = type(self).convert_checkpoint(state)
        check_checkpoint_fits(self, state, source=checkpoint)
        state, resized = adapt_position_tables(state, self.state_dict(),
                                               self.pos_embed_interpolation)
        name = type(self).__name__
        for note in resized:
            print_log(f'{name}: resized {note} from {checkpoint}', logger='current')
        missing, unexpected = load_state_dict_checked(self, state, source=checkpoint)
        print_log(f'{name}: loaded {checkpoint} ({len(state)} tensors, {len(resized)} position '
                  f'table(s) resized); missing {len(missing)}: {missing}; unexpected '
                  f'{len(unexpected)}: {unexpected}', logger='current')
        if unexpected:
            warnings.warn(f'{name}: {len(unexpected)} checkpoint keys were not used: '
                          f'{unexpected[:8]}', stacklevel=2)

    # -- running blocks (ordinary, checkpointed or token-chunked) -------------------------
    @property
    def chunking(self) -> bool:
        """Whether this forward runs token-chunked: ``chunk_tokens`` set, eval mode, no
        autograd (training needs every activation anyway; ``with_cp`` is its remedy)."""
        return (self.chunk_tokens is not None and not self.training
                and not torch.is_grad_enabled())

    def run_block(self, block: nn.Module, x: Tensor, inplace: bool = False,
                  **kwargs: Any) -> Tensor:
        """One block on ``x``: chunked, checkpointed (``with_cp``) or plain. ``inplace``:
        the caller has no further use for ``x`` (a stage's chain of blocks), so a chunked
        block may write its output over it (:func:`chunked_block`)."""
        if self.chunking:
            return chunked_block(block, x, self.chunk_tokens, inplace=inplace, **kwargs)
        return run_block(block, x, self.with_cp, **kwargs)

    def embed(self, module: nn.Module, x: Tensor) -> Tensor:
        """A patch embedding or merge on ``x``, in bands of output rows when chunking;
        this rank's output rows from its input rows and a few of its neighbours' when
        spatially sharded."""
        group = current_group()
        if isinstance(x, RowSource):
            if not self.chunking:
                raise ValueError('a RowSource input needs chunked inference '
                                 '(chunked_inference(model), eval mode, no autograd)')
            if group is None:
                return embed_from_rows(module, x, self.chunk_tokens)
            if x.bands is None or len(x.bands) != group.size:
                raise ValueError('a sharded RowSource needs one band of input rows per rank')
            spans = RowSpans(tuple(a for a, _ in x.bands) + (x.shape[2], ), group.rank)
            out = strided_spans(spans, module.row_geometry[2], module.rows_out(x.shape[2]))
            return embed_from_rows(module, x, self.chunk_tokens, out.mine)
        if group is not None:  # this rank's output rows in one piece, chunked or not
            return sharded_embed(module, x, group)
        return chunked_embed(module, x, self.chunk_tokens) if self.chunking else module(x)

    def add_positions(self, x: Tensor, table: Callable[[], Tensor], size: tuple[int, int],
                      whole: Callable[[int], Tensor]) -> Tensor:
        """``x (B, h, W, C) + positions`` for a map of which this process holds ``h`` rows.

        Chunked, in place and band by band from the small NCHW ``table()`` resized
        bilinearly to ``size`` (the whole map; :func:`resized_rows`), so no whole
        position map is ever allocated. Otherwise ``x + rows_of_whole(whole, h)``.
        """
        if not self.chunking:
            return x + self.rows_of_whole(whole, x.shape[1])
        group = current_group()
        start = 0 if group is None else row_spans(x.shape[1], group).mine[0]
        src = table()
        for r0, r1 in row_bands(x.shape[1], band_rows(self.chunk_tokens, x.shape[2])):
            pos = resized_rows(src, size, start + r0, start + r1)
            x[:, r0:r1] += pos.permute(0, 2, 3, 1).to(x.dtype)
        return x

    @staticmethod
    def rows_of_whole(whole: Callable[[int], Tensor], rows: int, dim: int = 1) -> Tensor:
        """``whole(H)`` (a tensor over all ``H`` rows of a map, e.g. a resized position
        table) for a map of which this process holds ``rows`` rows: all of it, or
        this rank's rows when spatially sharded."""
        group = current_group()
        if group is None:
            return whole(rows)
        spans = row_spans(rows, group)
        return own_rows(whole(spans.total), dim, spans)

    # -- output ---------------------------------------------------------------------------
    @staticmethod
    def to_nchw(x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> contiguous ``(B, C, H, W)``."""
        return x.permute(0, 3, 1, 2).contiguous()

    def _add_out_norms(self, dims: Sequence[int], eps: float) -> None:
        """A LayerNorm ``norm{i}`` of ``dims[i]`` channels on each returned stage when
        ``out_norm``."""
        if self.out_norm:
            for i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(dims[i], eps=eps))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Channels-last outputs ``(B, H_i, W_i, C_i)`` of every stage."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``(B, C_in, H, W)`` -> the ``out_indices`` stage maps, normed, NCHW."""
        stages = self.forward_stages(x)
        outs = []
        for i in self.out_indices:
            norm = getattr(self, f'norm{i}') if self.out_norm else nn.Identity()
            out, stages[i] = stages[i], None  # held once: freed as soon as it is converted
            if self.chunking:  # norm and NCHW copy band by band, into the output only
                rows = band_rows(self.chunk_tokens, out.shape[2])
                outs.append(fill_rows(out.shape[1], rows, lambda r0, r1, out=out, norm=norm:
                                      norm(out[:, r0:r1]).permute(0, 3, 1, 2), dim=2))
            else:
                outs.append(self.to_nchw(norm(out)))
        return tuple(outs)


def embed_from_rows(module: nn.Module, x: RowSource, chunk_tokens: int,
                    out_rows: Optional[tuple[int, int]] = None) -> Tensor:
    """``module`` (an embedding with ``row_geometry`` on NCHW input) on a :class:`RowSource`,
    band by band as :func:`chunked_embed` cuts them, each band reading only its rows;
    ``out_rows=(o0, o1)``: only those output rows (a rank's share)."""
    if not hasattr(module, 'row_geometry') or module.row_geometry[0] != 2:
        raise ValueError(f'{type(module).__name__} cannot read its input by rows: it does not '
                         'declare row_geometry on an NCHW input')
    _, kernel, stride, padding = module.row_geometry
    height = x.shape[2]

    def band(r0: int, r1: int) -> Tensor:
        lo = max(0, r0 * stride - padding)
        hi = min(height, (r1 - 1) * stride - padding + kernel)
        return module.forward_rows(x.rows(lo, hi), r0, r1, offset=lo, height=height)

    width = module.rows_out(x.shape[3])  # the same geometry along the columns
    o0, o1 = out_rows if out_rows is not None else (0, module.rows_out(height))
    return fill_rows(o1 - o0, band_rows(chunk_tokens, width),
                     lambda r0, r1: band(o0 + r0, o0 + r1))


def sharded_embed(module: nn.Module, x: Tensor, group: SpatialGroup) -> Tensor:
    """``module(x)`` on this rank's band of rows: modules that declare ``row_geometry``
    (input row axis, kernel, stride, padding), ``rows_out(H)`` and ``forward_rows``."""
    if not hasattr(module, 'row_geometry'):
        raise ValueError(f'{type(module).__name__} cannot be spatially sharded: it does not '
                         'declare which input rows each output row reads (row_geometry)')
    dim, kernel, stride, padding = module.row_geometry

    def rows(band: Tensor, r0: int, r1: int, offset: int, height: int) -> Tensor:
        return module.forward_rows(band, r0, r1, offset=offset, height=height)

    return strided_rows(rows, x, dim, kernel, stride, padding, module.rows_out, group)


@contextlib.contextmanager
def chunked_inference(model: nn.Module,
                      chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS) -> Iterator[nn.Module]:
    """Within the block, every :class:`InLineBackbone` in ``model`` runs token-chunked
    with ``chunk_tokens`` tokens per band (None: ordinary); restored afterwards.

    ``with chunked_inference(segmentor), torch.no_grad(): segmentor.predict(...)``.
    """
    chunk_tokens = _check_chunk_tokens(chunk_tokens)
    backbones = [m for m in model.modules() if isinstance(m, InLineBackbone)]
    if not backbones:
        raise ValueError(f'{type(model).__name__} contains no InLine backbone to chunk')
    saved = [m.chunk_tokens for m in backbones]
    try:
        for m in backbones:
            m.chunk_tokens = chunk_tokens
        yield model
    finally:
        for m, value in zip(backbones, saved):
            m.chunk_tokens = value


class StagedBackbone(InLineBackbone):
    """The layout of Swin and MLLA: a ``patch_embed`` stem, then ``layers[i]`` stages of
    ``blocks`` and an optional ``downsample``, with the output norms ``norm{i}``
    (parameter names as released). Subclasses build those modules and ``pos_drop``."""

    patch_embed: nn.Module
    pos_drop: nn.Module
    layers: nn.ModuleList

    def _stem_modules(self) -> list[nn.Module]:
        return [self.patch_embed]

    def _stage_modules(self, i: int) -> list[nn.Module]:
        norm = getattr(self, f'norm{i}', None)
        return [self.layers[i]] + ([norm] if norm is not None else [])

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Channels-last stage outputs ``(B, H_i, W_i, C_i)`` (before merging), all stages."""
        x = self.pos_drop(self.embed(self.patch_embed, x))
        outs = []
        for layer in self.layers:
            for block in layer.blocks:  # x: this stage's own map
                x = self.run_block(block, x, inplace=True)
            outs.append(x)
            if layer.downsample is not None:
                x = self.embed(layer.downsample, x)
        return outs
