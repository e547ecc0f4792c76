"""The native sampler ops of ``duodiff_fast._C``: Philox noise and the fused solver update.

Thin calls of ``torch.ops.duodiff.philox_normal`` and ``torch.ops.duodiff.solver_update``, so that
every op call lives in ``ops/``; whether they run for a device is :func:`duodiff_fast.ops.impl.native`'s
answer, asked by :mod:`duodiff_fast.samplers.philox`, which holds their PyTorch references.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["philox_normal", "solver_update"]


def philox_normal(seeds: Tensor, step: int, sample_shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """(B,) int64 seeds -> (B, *sample_shape) standard normals of Philox step ``step`` (native)."""
    return torch.ops.duodiff.philox_normal(seeds, int(step), [int(s) for s in sample_shape], dtype)


def solver_update(x: Tensor, eps: Tensor, coefs: Tensor, seeds: Optional[Tensor], step: int) -> Tensor:
    """``a * x + b * eps (+ c * z)`` with (a, b, c) = ``coefs`` (float64 device tensor) and z the Philox
    noise of ``seeds`` at ``step`` (none when ``seeds`` is None), in one native kernel."""
    return torch.ops.duodiff.solver_update(x, eps, coefs, seeds, int(step))
