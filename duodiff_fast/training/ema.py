"""Exponential moving average of model weights.

The average lives in a separate copy of the (unwrapped) module, so sampling code can use it as a
normal model and its state dict has the model's own key names. Update after each optimizer step:
``ema = decay * ema + (1 - decay) * param`` for floating-point parameters and buffers; other
buffers are copied.

Warm-up (``warmup=True``, the trainer's default): update t (t = 0, 1, ... counts the updates
done before it) uses ``decay_t = min(decay, (1 + t) / (10 + t))``: 0.1 at the first update,
0.5 at t = 8, 0.9 at t = 80, 0.99 at t = 881, reaching 0.9999 only after about 90,000 updates.
Without it, after T updates a fraction ``decay ** T`` of the random initial weights is left in
the average (0.9999 ** 2500 = 78%); with it the initial weights' share is
``prod_t decay_t <= 9 / (T + 9)`` (under 0.4% after 2,500 updates).
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """Shadow copy of ``model`` updated as ``shadow = decay * shadow + (1 - decay) * model``.

    Args:
        model: the module to track (wrappers are removed); the shadow starts as a copy of it.
        decay: averaging factor in [0, 1) (U-ViT: 0.9999).
        warmup: use ``min(decay, (1 + t) / (10 + t))`` at update t (see the module docstring).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.eval()
        self.module.requires_grad_(False)

    def _pairs(self, model: nn.Module):
        src = unwrap_model(model)
        ema_params = dict(self.module.named_parameters())
        ema_buffers = dict(self.module.named_buffers())
        params = [(ema_params[n], p) for n, p in src.named_parameters()]
        buffers = [(ema_buffers[n], b) for n, b in src.named_buffers()]
        if len(params) != len(ema_params) or len(buffers) != len(ema_buffers):
            raise RuntimeError("the model's parameters no longer match the EMA copy")
        return params, buffers

    def current_decay(self) -> float:
        """The decay the next update uses: ``decay``, or with warm-up ``min(decay, (1 + t) / (10 + t))``
        for t = ``num_updates``."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        params, buffers = self._pairs(model)
        decay = self.current_decay()
        shadow = [e for e, _ in params]
        current = [p.detach() for _, p in params]
        if shadow:
            # shadow += (1 - decay) * (current - shadow)  ==  decay * shadow + (1 - decay) * current
            torch._foreach_lerp_(shadow, current, 1.0 - decay)
        for e, b in buffers:
            if e.is_floating_point():
                e.lerp_(b.detach(), 1.0 - decay)
            else:
                e.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the shadow to ``model``'s weights."""
        self.module.load_state_dict(unwrap_model(model).state_dict())

    def state_dict(self) -> Dict[str, Any]:
        """The shadow's state dict (the model's key names)."""
        return self.module.state_dict()

    def meta(self) -> Dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "warmup": self.warmup}

    def load_state_dict(self, state: Dict[str, Any], meta: Dict[str, Any] | None = None) -> None:
        self.module.load_state_dict(state)
        if meta:
            self.num_updates = int(meta.get("num_updates", 0))

    def to(self, *args, **kwargs) -> "EMA":
        self.module.to(*args, **kwargs)
        return self
