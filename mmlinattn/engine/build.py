"""A detector or segmenter from a config file, and a synthetic batch for it.

Shared by the benchmark, ``tools/analysis/get_flops.py`` and ``tools/test.py``: the
config's ``default_scope`` (mmdet or mmseg) decides the registry and the data
sample type.
"""
from __future__ import annotations

import importlib
import os.path as osp
from typing import Any, Optional, Union

import torch
from mmengine.config import Config

__all__ = ['clear_pretrained', 'build_from_config', 'load_weights', 'synthetic_batch',
           'synthetic_train_batch']


def clear_pretrained(cfg: Config) -> bool:
    """Drop the backbone's ``init_cfg`` (its ImageNet checkpoint): for a model whose
    weights come from elsewhere (a trained checkpoint) or do not matter (timing,
    FLOPs). Returns whether there was one."""
    backbone = cfg.model.get('backbone', {})
    if backbone.get('init_cfg'):
        backbone.init_cfg = None
        return True
    return False


def build_from_config(config: Union[str, Config], cfg_options: Optional[dict] = None,
                      pretrained: bool = False) -> tuple[Any, str]:
    """``(model, scope)`` built from ``config`` in its default scope (``mmdet`` if unset).

    ``pretrained=False`` (the default) skips the backbone's ImageNet checkpoint.
    """
    from mmengine.registry import DefaultScope

    import mmlinattn  # noqa: F401  (registers the backbones)

    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if not pretrained:
        clear_pretrained(cfg)
    scope = cfg.get('default_scope', 'mmdet')
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model)
    return model, scope


def load_weights(model: Any, checkpoint: Optional[str]) -> str:
    """Load a runner or state-dict ``checkpoint`` into ``model`` through the safe reader
    (no code in the file runs) after checking it fits; ``None``/``'none'``: keep the
    random weights. Returns a line saying what was loaded."""
    from ..checkpoint import (
        check_checkpoint_fits,
        extract_state_dict,
        load_runner_checkpoint,
        load_state_dict_checked,
    )

    if checkpoint is None or checkpoint.lower() == 'none':
        return 'checkpoint none: random weights; predictions are meaningless (measurements)'
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    state = extract_state_dict(load_runner_checkpoint(checkpoint, 'cpu'), source=checkpoint)
    check_checkpoint_fits(model, state, source=checkpoint)
    missing, unexpected = load_state_dict_checked(model, state, source=checkpoint)
    return f'loaded {checkpoint}: {len(missing)} missing, {len(unexpected)} unexpected keys'


def synthetic_batch(model: Any, scope: str, h: int, w: int, batch: int = 1,
                    seed: int = 0) -> tuple[torch.Tensor, list]:
    """``(inputs, data_samples)`` for ``batch`` random ``h x w`` images, through the
    model's own data preprocessor (normalisation, padding to its divisor)."""
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1., 1.),
                batch_input_shape=(h, w))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for _ in range(batch)]
    data = model.data_preprocessor(
        dict(inputs=images, data_samples=[Sample(metainfo=meta) for _ in range(batch)]), False)
    return data['inputs'], data['data_samples']


def _num_classes(model: Any) -> int:
    for path in ('roi_head.bbox_head', 'bbox_head', 'decode_head'):
        head = model
        for part in path.split('.'):
            head = getattr(head, part, None)
        if head is not None and hasattr(head, 'num_classes'):
            return int(head.num_classes)
    return 1


def synthetic_train_batch(model: Any, scope: str, h: int, w: int, batch: int = 1,
                          seed: int = 0) -> dict:
    """A packed batch for ``model.train_step``: ``batch`` random ``h x w`` images with
    ground truth (mmdet: 5 boxes each, with masks when the model has a mask head;
    mmseg: a random label map). A segmenter's preprocessor pads to ``(h, w)``."""
    torch.manual_seed(seed)
    num_classes = _num_classes(model)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs

        roi_head = getattr(model, 'roi_head', None)
        with_mask = roi_head is not None and getattr(roi_head, 'with_mask', False)
        return demo_mm_inputs(batch_size=batch, image_shapes=[(3, h, w)] * batch,
                              num_items=[5] * batch, num_classes=num_classes,
                              with_mask=with_mask)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    if getattr(model.data_preprocessor, 'size', None) is not None:
        model.data_preprocessor.size = (h, w)  # the crop it pads training batches to
    samples = []
    for _ in range(batch):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w)))
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
                        for _ in range(batch)], data_samples=samples)
