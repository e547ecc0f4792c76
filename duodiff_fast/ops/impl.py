"""The op implementation: which code runs an op -- the native C++/CUDA op of ``duodiff_fast._C``, a
Triton kernel, or PyTorch. This module decides it; every other module asks it.

Vocabulary: a *backend* is an execution backend of :mod:`duodiff_fast.backends` (``reference``,
``eager-bf16``, ``torch.compile``, ``triton``, ``auto``): how a whole model runs. The *op
implementation* ("impl") is chosen per op inside a backend:

    layer ops     ``layer_impl(requested, device, needs_grad)`` -> "torch" | "triton": the U-ViT
                  pieces (embed, blocks, final layer) of one model call, asked by
                  :func:`duodiff_fast.models.executor.executor_for`. A model asks for "torch"
                  (the default), "triton" (the ``triton`` backend sets it) or "auto" (Triton where
                  it runs, else PyTorch with one warning). Calls that record gradients run "torch".
                  ``use_impl(name)`` overrides every model's request in a block.
    matmuls       ``matmul_impl()`` -> "triton" (fused epilogues) | "cublas", inside Triton layers;
                  ``set_matmul`` sets it.
    native ops    ``native(device)`` -> whether the ``torch.ops.duodiff`` ops (timestep embedding,
                  Philox noise, the fused solver update, row compaction) run for tensors on
                  ``device``: ``_C`` loaded with kernels for that device, and not switched off by
                  ``DUODIFF_FAST_NATIVE=0``; else their PyTorch reference runs (same values).

What can run where, and why not, is answered by :mod:`.availability`; this module turns those
answers into choices.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator, Optional

import torch

from .availability import native_available, triton_unavailable_reason

__all__ = ["IMPL_CHOICES", "MATMUL_IMPLS", "BackendUnavailable", "check_impl", "use_impl", "layer_impl",
           "set_matmul", "matmul_impl", "native", "native_timestep_embedding", "triton_unavailable"]

IMPL_CHOICES = ("auto", "torch", "triton")
MATMUL_IMPLS = ("triton", "cublas")


class BackendUnavailable(RuntimeError):
    """A backend, or the Triton op implementation, was asked for by name where it cannot run."""


_STATE = threading.local()
_WARNED = set()
_MATMUL = {"impl": "triton"}


def check_impl(name: str) -> str:
    """``name`` if it is a layer op implementation ("auto", "torch", "triton"), else a ValueError."""
    if name not in IMPL_CHOICES:
        raise ValueError(f"unknown op implementation {name!r}; choose one of {', '.join(IMPL_CHOICES)}")
    return name


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Within this block every model call runs its layer ops with ``name`` ("auto", "torch", "triton")."""
    check_impl(name)
    previous = getattr(_STATE, "override", None)
    _STATE.override = name
    try:
        yield
    finally:
        _STATE.override = previous


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"duodiff_fast: Triton kernels unavailable ({reason}); running the PyTorch "
                      "reference path", RuntimeWarning, stacklevel=4)


def layer_impl(requested: str, device: torch.device, needs_grad: bool = False) -> str:
    """The implementation ("torch" or "triton") of one model call's layer ops.

    Args:
        requested: the model's choice ("auto", "torch", "triton"); a :func:`use_impl` block overrides it.
        device: the device of the call's tensors.
        needs_grad: the call records gradients: always "torch" (the kernels have no backward).
    Raises:
        BackendUnavailable: "triton" was asked for by name and cannot run on ``device``.
    """
    override = getattr(_STATE, "override", None)
    choice = check_impl(override or requested)
    if choice == "torch" or needs_grad:
        return "torch"
    reason = triton_unavailable_reason(device)
    if reason is None:
        return "triton"
    if choice == "triton":
        raise BackendUnavailable(f"the 'triton' backend cannot run: {reason}")
    _warn_once(reason)
    return "torch"


def triton_unavailable(device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can): what the ``triton``
    backend asks before it prepares a model."""
    return triton_unavailable_reason(device)


def set_matmul(impl: str) -> None:
    """Matmul implementation inside Triton layers: "triton" (fused epilogues) or "cublas"."""
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_IMPLS)}, got {impl!r}")
    _MATMUL["impl"] = impl


def matmul_impl() -> str:
    return _MATMUL["impl"]


def native(device) -> bool:
    """Whether the native ``torch.ops.duodiff`` ops run for tensors on ``device`` (warns once, via
    :mod:`.native`, when ``_C`` did not load at all)."""
    return native_available(device)


def native_timestep_embedding(timesteps: torch.Tensor) -> bool:
    """Whether the time embedding of ``timesteps`` runs the native kernel: (B,) CUDA tensors only
    (the CPU keeps the PyTorch reference, which the golden tests compare exactly)."""
    return timesteps.is_cuda and timesteps.dim() == 1 and native(timesteps.device)
