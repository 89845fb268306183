"""Models the tests compare: built at seed 0, in eval mode, with BatchNorm statistics
that are not the identity (so that a norm applied twice or skipped shows)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from mmlinattn.engine.build import build_from_config


def seeded_model(config: Path, options: Optional[dict] = None) -> Any:
    torch.manual_seed(0)
    model, _ = build_from_config(str(config), options)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()
