"""Pure torch functions: no module state, nothing about backbones."""
from .agent import AgentSums, agent_attention, pool_agents, pool_agents_rows
from .dense import linear, linear_backend, set_linear_backend
from .focused import focused_linear_attention, focusing_map
from .implementations import (
    ATTENTION_FUNCTIONS,
    ATTENTION_IMPLS,
    ATTENTIONS,
    QKV_ATTENTIONS,
    SUMMED_ATTENTIONS,
    AttentionImpl,
    attention,
    get_attention_impl,
    register_attention_impl,
    resolve_kernel,
)
from .inline import (
    KERNELS,
    InLineSums,
    get_kernel,
    inline_attention,
    inline_attention_weights,
    inline_readout,
    linear_attention,
    linear_readout,
    softmax_attention,
)
from .labels import class_argmax, upsampled_class_argmax
from .local import dynamic_depthwise_conv3x3
from .mlla import apply_rope, mlla_linear_attention, rope_rotations
from .rows import conv2d_rows, conv_out_rows
from .tracing import exporting
from .windows import ceil_to, pad_to, pad_to_multiple, valid_mask, window_merge, window_partition

__all__ = [
    'ATTENTION_IMPLS', 'ATTENTIONS', 'SUMMED_ATTENTIONS', 'AttentionImpl', 'attention',
    'get_attention_impl',
    'register_attention_impl', 'resolve_kernel', 'ATTENTION_FUNCTIONS', 'KERNELS', 'get_kernel',
    'inline_attention', 'InLineSums', 'inline_readout',
    'inline_attention_weights', 'linear_attention', 'softmax_attention',
    'dynamic_depthwise_conv3x3', 'linear', 'linear_backend', 'set_linear_backend', 'class_argmax',
    'upsampled_class_argmax',
    'conv2d_rows', 'conv_out_rows', 'pad_to_multiple',
    'valid_mask', 'window_merge',
    'window_partition', 'exporting', 'ceil_to', 'pad_to', 'QKV_ATTENTIONS', 'linear_readout',
    'focusing_map', 'focused_linear_attention', 'AgentSums', 'agent_attention', 'pool_agents',
    'pool_agents_rows', 'rope_rotations', 'apply_rope', 'mlla_linear_attention'
]
