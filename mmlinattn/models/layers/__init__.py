"""nn.Modules built on :mod:`mmlinattn.ops`, shared by every backbone."""
from .agent_attention import AgentAttention, AgentBiasTables, agent_bias_for, stage_agent_shapes
from .attention import GlobalSoftmaxAttention, InLineAttention, WindowSoftmaxAttention
from .attn_types import parse_attn_types
from .block import TransformerBlock, run_block
from .chunked import (
    DEFAULT_CHUNK_TOKENS,
    BandPlan,
    InLineBlockParts,
    OwnBands,
    SummedAttentionPlan,
    band_rows,
    chunked_block,
    chunked_embed,
    conv2d_rows,
    conv_out_rows,
    fill_rows,
    linear_slice,
    row_bands,
)
from .embed import ConvRows, PatchEmbed, PatchMerging
from .focused_attention import FocusedLinearAttention, FocusedTables, resize_positional_encoding
from .head import ClassifierHead
from .linear import Linear
from .local_residual import LocalResidual, masked_mean
from .mlla import ConvNormAct, MLLAAttention, MLLABlock, MLLAMerge, MLLAStem
from .mlp import Mlp, gelu_mlp
from .regions import RegionGrid, attend_heads, merge_heads, split_heads, window_region
from .weight_init import init_transformer_weights

__all__ = [
    'InLineAttention', 'WindowSoftmaxAttention', 'merge_heads', 'split_heads',
    'parse_attn_types', 'TransformerBlock', 'run_block', 'PatchEmbed', 'PatchMerging',
    'LocalResidual', 'masked_mean', 'RegionGrid', 'attend_heads', 'ClassifierHead',
    'init_transformer_weights', 'Mlp', 'gelu_mlp', 'DEFAULT_CHUNK_TOKENS', 'BandPlan',
    'InLineBlockParts', 'band_rows', 'chunked_block', 'chunked_embed', 'conv2d_rows',
    'conv_out_rows', 'fill_rows', 'linear_slice', 'row_bands', 'window_region', 'AgentAttention',
    'agent_bias_for', 'stage_agent_shapes', 'FocusedLinearAttention',
    'resize_positional_encoding', 'ConvNormAct', 'MLLAAttention', 'MLLABlock', 'MLLAMerge',
    'MLLAStem', 'AgentBiasTables', 'FocusedTables', 'GlobalSoftmaxAttention', 'OwnBands',
    'SummedAttentionPlan', 'ConvRows', 'Linear'
]
