"""Input checks shared by models, samplers and methods.

Every check raises before any computation starts, with a message that names the argument, what
was given and what was expected. Checks only read shapes, dtypes and (for small index tensors)
values, so they are cheap enough to run on every public call.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Sequence

import torch

_STATE = threading.local()


@contextlib.contextmanager
def inputs_validated() -> Iterator[None]:
    """Inside this block, skip the checks that read tensor *values* (ranges of t and labels).

    Reading a value from a GPU tensor synchronises the host with the device, and under
    ``torch.compile`` it breaks the graph. A sampler validates its inputs once, before its first
    step, and then runs its loop inside this block: shape and dtype checks (free) still run.
    """
    previous = getattr(_STATE, "trusted", False)
    _STATE.trusted = True
    try:
        yield
    finally:
        _STATE.trusted = previous


def values_trusted() -> bool:
    """True inside :func:`inputs_validated` or while ``torch.compile`` traces the code."""
    return getattr(_STATE, "trusted", False) or torch.compiler.is_compiling()


def check_image_batch(
    x: torch.Tensor,
    channels: int,
    size: int | Sequence[int],
    name: str = "x",
) -> None:
    """Check that ``x`` is a float image batch of shape (B, channels, H, W).

    Args:
        x: tensor to check.
        channels: expected channel count C.
        size: expected spatial size, an int (square) or (H, W).
        name: argument name used in the error message.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    expected = ("B", channels, *hw)
    if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != hw:
        raise ValueError(
            f"{name} must have shape (B, {channels}, {hw[0]}, {hw[1]}), got {tuple(x.shape)}"
            f" (expected {expected})"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")


def check_timesteps(
    t: torch.Tensor,
    batch: int,
    low: float,
    high: float,
    name: str = "timesteps",
) -> None:
    """Check that ``t`` is a (B,) (or scalar) tensor of values inside [low, high]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must have shape ({batch},) or be a scalar, got {tuple(t.shape)}")
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    if values_trusted():
        return
    if t.numel() and not bool(torch.isfinite(t.float()).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        if lo < low or hi > high:
            raise ValueError(
                f"{name} must lie in [{low:g}, {high:g}], got values in [{lo:g}, {hi:g}]"
            )


def check_labels(
    y: Optional[torch.Tensor],
    batch: int,
    num_classes: int,
    name: str = "y",
) -> None:
    """Check class labels for a model with ``num_classes`` label embeddings.

    ``num_classes <= 0`` means the model is unconditional: then ``y`` must be None. Otherwise
    ``y`` must be an integer tensor of shape (B,) with values in [0, num_classes - 1] (the last id
    being the null class used by classifier-free guidance).
    """
    if num_classes <= 0:
        if y is not None:
            raise ValueError(
                f"{name} was given but the model is unconditional (num_classes={num_classes}); "
                "pass y=None"
            )
        return
    if y is None:
        raise ValueError(
            f"the model is class-conditional (num_classes={num_classes}) and needs labels {name} "
            f"of shape ({batch},)"
        )
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class ids, got dtype {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if values_trusted():
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"class ids in {name} must lie in [0, {num_classes - 1}] "
            f"(the last id, {num_classes - 1}, is the null class), got values in [{lo}, {hi}]"
        )
