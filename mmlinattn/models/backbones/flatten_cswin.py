"""FLatten-CSwin: CSwin Transformer whose linear stages use focused linear attention
(FLatten Transformer, Han et al., ICCV 2023), with the released layouts.

The authors released the T model's weights (and configs for S and B, here as archs).
Every one is ``LLSS``: at 224 px the linear stages' split sizes (56, 28;
96, 48 at 384 px) equal their maps, so each focused block is one branch over all
channels and the whole map, as it is here at any size. The ``S`` blocks are CSwin's
softmax stripes (7; 12 at 384 px). A focused branch adds CSwin's LePE (``get_v``) to
its own depthwise convolution (``dwc``, 5x5, shared by the heads).

The positional encoding of k is stored for the stage map at the classification size
and resized bilinearly for other maps, as for FLatten-Swin
(:func:`~mmlinattn.models.layers.resize_positional_encoding` says why).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from ...parallel import current_group, gathered
from ..family import BackboneFamily, BenchmarkVariant, ReleasedModel, register_family
from ..layers import ClassifierHead, FocusedTables
from ..layers.chunked import SummedAttentionPlan
from ..layers.regions import check_map
from .inline_cswin import CSwinBackbone, stripe_branches

__all__ = ['FLattenCSwin', 'FLattenCSwinClassifier', 'FocusedCSwinBranch', 'FLATTEN_CSWIN_ARCHS']

FLATTEN_CSWIN_ARCHS: dict[str, dict] = {
    'tiny': dict(embed_dims=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16),
                 attn_types='LLSS'),
    # FLatten's small is deeper in stage 3 than CSwin-S (2-4-32-2, not 3-6-29-2).
    'small': dict(embed_dims=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16),
                  attn_types='LLSS'),
    'base': dict(embed_dims=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                 attn_types='LLSS'),
}


class FocusedCSwinBranch(FocusedTables):
    """Focused linear attention over a whole map inside a CSwin block (which owns
    ``qkv`` and ``proj``), plus LePE.

    Args:
        dim: channels ``c`` of the branch; num_heads: its heads.
        grid, focusing_factor, kernel_size: as
            :class:`~mmlinattn.models.layers.FocusedLinearAttention`.

    ``forward(q, k, v: (B, H, W, c), x_mean) -> (B, H, W, c)`` (``x_mean`` unused).
    Parameters ``get_v``, ``dwc``, ``scale``, ``positional_encoding`` as released.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int],
                 focusing_factor: float = 3., kernel_size: int = 5) -> None:
        super().__init__()
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.add_focused_parts(dim, num_heads, grid, focusing_factor, kernel_size)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}, '
                f'focusing_factor={self.focusing_factor}')

    def summed_plan(self, h: int, w: int, project_part: Callable[..., Tensor],
                    out: Callable[[Tensor], Tensor]) -> SummedAttentionPlan:
        """Token-chunked inference on an ``h x w`` map with the CSwin block's projections
        (``project_part``) and ``proj`` (``out``), LePE among the local terms."""
        return self.focused_plan(h, w, project_part, out, extra_local=self.get_v)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x_mean: Optional[Tensor] = None) -> Tensor:
        check_map(self, q, self.dim)
        if current_group() is not None:
            return gathered(lambda q, k, v: self.forward(q, k, v), q, k, v)
        b, h, w, c = q.shape
        out = self.attend_focused(q.reshape(b, h * w, c), k.reshape(b, h * w, c),
                                  v.reshape(b, h * w, c), (h, w))
        return out + self.get_v(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class FLattenCSwin(CSwinBackbone):
    """FLatten-CSwin backbone for dense prediction.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``,
            ``depths``, ``num_heads``, ``attn_types`` (``L`` focused linear, ``S``
            softmax stripes, ``M`` mixed).
        pretrain_img_size: the classification size; the positional encodings are
            stored for the stage maps at it (56, 28 at 224).
        focusing_factor: ``p`` (3); kernel_size: of ``dwc`` (5).
        split_size: stripe width of the ``S`` stages (7; 12 at 384 px).
        pad_mask: the padding of stripes masked (True, default: no detector of this
            family was released) or attended (False); see
            :class:`~mmlinattn.models.backbones.inline_cswin.CSwinBranch`.
        Other arguments as :class:`~mmlinattn.models.backbones.InLineCSwin`.

    Input ``(B, in_channels, H, W)`` of any size; outputs at strides 4, 8, 16, 32
    with ``C * 2^i`` channels.
    """

    arch_settings = FLATTEN_CSWIN_ARCHS
    attn_letters = 'LS'

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 *,
                 pretrain_img_size: int = 224,
                 focusing_factor: float = 3.,
                 kernel_size: int = 5,
                 split_size: int = 7,
                 pad_mask: bool = True,
                 attn_impl: str = 'auto',
                 **layout: Any) -> None:

        def make_branches(letter: str, i: int, j: int, dim: int, heads: int,
                          last_stage: bool) -> list[nn.Module]:
            if letter == 'L':
                side = pretrain_img_size // (4 * 2**i)
                return [FocusedCSwinBranch(dim, heads, (side, side), focusing_factor,
                                           kernel_size)]
            return stripe_branches(dim, heads, split_size, last_stage, attn_impl, pad_mask)

        super().__init__(make_branches=make_branches, arch=arch, **layout)


class FLattenCSwinClassifier(ClassifierHead, FLattenCSwin):
    """FLatten-CSwin with the released head: final ``norm`` (eps 1e-5), token mean, ``head``."""


register_family(BackboneFamily(
    name='flatten_cswin', backbone=FLattenCSwin, classifier=FLattenCSwinClassifier,
    key_prefixes=('stage1_conv_embed.', ), key_markers=('.attns.0.positional_encoding', ),
    first_conv='stage1_conv_embed.0',
    # Only the T model's weights were released; S and B (and B at 384 px:
    # pretrain_img_size=384, split_size=12) are the authors' configs, here as archs.
    released=(
        ReleasedModel('flatten_cswin_tiny', 'flatten_cswin_t', 'tiny', 0.2),
    ),
    benchmark=(
        BenchmarkVariant('flatten-cswin-t', 'FLatten-CSwin-T, global focused linear attention '
                         'in stages 1-2, softmax stripes after', (('arch', 'tiny'), )),
    ),
))
