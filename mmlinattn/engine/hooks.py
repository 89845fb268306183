"""Training hooks that turn silent failures into errors naming the problem."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from mmengine.hooks import Hook

from ..registry import HOOKS

__all__ = ['FiniteLossHook', 'ModelSanityHook', 'check_feature_channels']


@HOOKS.register_module()
class FiniteLossHook(Hook):
    """Stop training at the first non-finite loss, naming the loss terms and the iteration.

    Args:
        interval: check every ``interval`` iterations (1: every one).
    """

    priority = 'VERY_HIGH'

    def __init__(self, interval: int = 1) -> None:
        self.interval = interval

    def before_train(self, runner: Any) -> None:
        """Give a :class:`~mmlinattn.engine.optim.FiniteStepMixin` wrapper the names of
        the parameters and each iteration's loss terms, for its messages."""
        wrappers = getattr(runner.optim_wrapper, 'optim_wrappers', None)
        wrappers = list(wrappers.values()) if isinstance(wrappers, dict) else \
            [runner.optim_wrapper]
        wrappers = [w for w in wrappers if hasattr(w, 'loss_terms')]
        if not wrappers:
            return
        model = getattr(runner.model, 'module', runner.model)
        names = {id(p): n for n, p in model.named_parameters()}
        parse = model.parse_losses

        def parse_losses(losses: Any) -> Any:
            loss, log_vars = parse(losses)
            terms = {k: float(v) for k, v in log_vars.items()
                     if isinstance(v, (int, float, torch.Tensor)) and k != 'loss'}
            for w in wrappers:
                w.loss_terms = terms
            return loss, log_vars
        model.parse_losses = parse_losses
        for w in wrappers:
            w.param_names = names
        self._wrappers = wrappers

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        for w in getattr(self, '_wrappers', ()):
            w.iteration = runner.iter + 1

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        if not outputs or not self.every_n_train_iters(runner, self.interval):
            return
        bad = {}
        for name, value in outputs.items():
            v = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if isinstance(v, float) and not math.isfinite(v):
                bad[name] = v
        if bad:
            terms = ', '.join(f'{k}={v}' for k, v in bad.items())
            raise FloatingPointError(
                f'non-finite loss at iteration {runner.iter + 1} (epoch {runner.epoch + 1}): '
                f'{terms}. Lower the learning rate, enable gradient clipping '
                '(optim_wrapper.clip_grad), or check the annotations of this batch.')


def _out_channels(backbone: torch.nn.Module) -> Optional[list[int]]:
    feats = getattr(backbone, 'num_features', None)
    indices = getattr(backbone, 'out_indices', None)
    if not isinstance(feats, (list, tuple)) or indices is None:
        return None
    return [int(feats[i]) for i in indices]


def check_feature_channels(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` if the neck (or decode head) expects other channels than the
    backbone produces, instead of a convolution shape error deep inside torch."""
    backbone = getattr(model, 'backbone', None)
    produced = _out_channels(backbone) if backbone is not None else None
    if produced is None:
        return
    consumer, name = getattr(model, 'neck', None), 'neck'
    if consumer is None:
        consumer, name = getattr(model, 'decode_head', None), 'decode_head'
    expected = getattr(consumer, 'in_channels', None)
    if expected is None:
        return
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    in_index = getattr(consumer, 'in_index', None) if name == 'decode_head' else None
    if isinstance(in_index, (list, tuple)):
        produced = [produced[i] for i in in_index if i < len(produced)]
    if expected != produced:
        raise ValueError(
            f'{name}.in_channels={expected} but {type(backbone).__name__} (out_indices='
            f'{tuple(backbone.out_indices)}) produces {produced} channels: set '
            f'model.{name}.in_channels={produced}')


@HOOKS.register_module()
class ModelSanityHook(Hook):
    """Check before running that the backbone's output channels fit the neck/decode head."""

    priority = 'VERY_HIGH'

    def before_run(self, runner: Any) -> None:
        model = runner.model
        check_feature_channels(getattr(model, 'module', model))
