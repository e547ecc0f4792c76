"""Optimizer and learning-rate schedule (DuoDiff paper, Table 4: AdamW, lr 2e-4, wd 0.03,
betas (0.99, 0.999); linear warm-up then constant, as U-ViT trains)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR


def trainable_parameters(model: nn.Module) -> list:
    """Parameters with ``requires_grad`` (frozen backbones, as AdaDiff trains, are left out)."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float = 2e-4,
    weight_decay: float = 0.03,
    betas: Sequence[float] = (0.99, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over ``params`` with weight decay on every parameter (the official U-ViT setting)."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if len(betas) != 2:
        raise ValueError(f"betas must hold two values, got {betas!r}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(float(betas[0]), float(betas[1])),
                             eps=eps)


class LinearWarmup:
    """LR multiplier: ``min((step + 1) / warmup_steps, 1)`` where ``step`` counts finished updates.

    The first update runs at ``lr / warmup_steps`` and update number ``warmup_steps`` (and every
    later one) at the full ``lr``. ``warmup_steps <= 0`` means constant ``lr``. A class, not a
    lambda, so the scheduler's state dict stays plain data.
    """

    def __init__(self, warmup_steps: int):
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min((step + 1) / self.warmup_steps, 1.0)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 1500) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` updates, then constant; call ``.step()`` after each
    optimizer step."""
    return LambdaLR(optimizer, LinearWarmup(warmup_steps))


def clip_gradients(params: Sequence[torch.nn.Parameter], max_norm: Optional[float]) -> Optional[torch.Tensor]:
    """Clip the global gradient norm to ``max_norm`` (None or <= 0: no clipping).

    Returns the total norm before clipping (a 0-dim tensor), or None when not clipping.
    """
    if max_norm is None or max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
