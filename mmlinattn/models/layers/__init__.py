"""nn.Modules built on :mod:`mmlinattn.ops`, shared by every backbone."""
from .attention import InLineAttention, WindowSoftmaxAttention, merge_heads, split_heads
from .attn_types import parse_attn_types
from .block import TransformerBlock, run_block
from .embed import PatchEmbed, PatchMerging
from .local_residual import LocalResidual, masked_mean

__all__ = [
    'InLineAttention', 'WindowSoftmaxAttention', 'merge_heads', 'split_heads',
    'parse_attn_types', 'TransformerBlock', 'run_block', 'PatchEmbed', 'PatchMerging',
    'LocalResidual', 'masked_mean'
]
