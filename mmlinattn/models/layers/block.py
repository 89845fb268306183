"""The pre-norm transformer block shared by every backbone."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch.utils.checkpoint
from timm.layers import DropPath
from torch import Tensor, nn

from ...parallel import current_group, spatial_parallel
from .chunked import BandPlan, InLineBlockParts, SummedAttentionPlan
from .mlp import Mlp

__all__ = ['TransformerBlock', 'run_block']


def run_block(block: nn.Module, x: Tensor, with_cp: bool = False, **kwargs: Any) -> Tensor:
    """``block(x, **kwargs)``, activation-checkpointed when ``with_cp`` and autograd would
    store anything.

    The block's own parameters count, not only its input: the first trainable
    block after ``frozen_stages`` gets an input that needs no gradient, yet
    without checkpointing it would keep every activation for its weights' grads.
    """
    if with_cp and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in block.parameters())):
        group = current_group()
        if group is not None:
            # The recomputation in backward must run sharded too, wherever backward runs.
            def sharded(*args: Any, **kw: Any) -> Tensor:
                with spatial_parallel(group):
                    return block(*args, **kw)
            return torch.utils.checkpoint.checkpoint(sharded, x, use_reentrant=False, **kwargs)
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


class TransformerBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on ``(B, H, W, C)`` maps.

    The attention module is built by the caller (InLine, window softmax, ...)
    and must map ``(B, H, W, C)`` to the same shape. The MLP is ``fc1 -> GELU ->
    fc2`` (:class:`~.mlp.Mlp`, which keeps one hidden tensor for backward). Parameters ``norm1``,
    ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` as in the released models.
    """

    def __init__(self,
                 dim: int,
                 attn: nn.Module,
                 mlp_ratio: float = 4.,
                 drop: float = 0.,
                 drop_path: float = 0.,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def chunk_plan(self, x: Tensor, hw: Optional[tuple[int, int]] = None
                   ) -> Optional[Union[InLineBlockParts, BandPlan, SummedAttentionPlan]]:
        """How to run this block token-chunked on ``x`` (:mod:`.chunked`): the
        attention's plan, completed with the block's norms and MLP; None runs whole.
        ``x`` is a map ``(B, H, W, C)``, or tokens ``(B, P + h*w, C)`` with ``hw``."""
        if x.dim() == 4:
            plan = self.attn.chunk_plan(*x.shape[1:3]) if hasattr(self.attn, 'chunk_plan') \
                else None
        elif hasattr(self.attn, 'chunk_parts'):  # tokens with a class token: global InLine
            plan = self.attn.chunk_parts()
        elif getattr(self.attn, 'plans_prefix_tokens', False) and hw is not None:
            # Agent attention: the class tokens, normed, are keys in its softmax pass.
            plan = self.attn.chunk_plan(*hw, prefix=self.norm1(x[:, :x.shape[1] - hw[0] * hw[1]]))
        else:
            plan = None
        if isinstance(plan, (InLineBlockParts, SummedAttentionPlan)):
            plan = dataclasses.replace(plan, norm1=self.norm1, norm2=self.norm2, mlp=self.mlp,
                                       drop_path=self.drop_path)
        return plan

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
