"""mmlinattn: InLine (injective linear) attention backbones for OpenMMLab dense prediction.

Importing the package registers the backbones in the ``mmlinattn`` registry,
in mmdet's and mmseg's registries when those are installed, and the released
classification models in timm. It needs only torch, timm and mmengine.
"""
from .checkpoint import allow_runner_checkpoint_types
from .version import __version__

# Our own runner checkpoints must load under torch >= 2.6's weights_only default.
allow_runner_checkpoint_types()

from . import engine, models, ops  # noqa: E402  (registration happens on import)

__all__ = ['__version__', 'engine', 'models', 'ops']
