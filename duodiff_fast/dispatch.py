"""The backend policy: which implementation ("torch" or "triton") a U-ViT inference call may take.

:func:`resolve_backend` is asked once per model call by :func:`duodiff_fast.models.executor.executor_for`,
the only place that turns the answer into an executor (eager PyTorch with the native ops where
they run, or the Triton custom ops). This module also re-exports the custom ops of
:mod:`duodiff_fast.ops.triton_ops` and the availability answers of :mod:`duodiff_fast.ops.availability`
under their former names.

Backends:
    "torch"   the PyTorch reference modules (``duodiff_fast.models.uvit``); always available, and
              the only path that records gradients (training).
    "triton"  the fused Triton kernels of ``duodiff_fast.kernels``, called through the
              ``torch.library`` custom ops of ``duodiff_fast.ops.triton_ops`` (``duodiff_triton``), each
              with a fake (meta) implementation so ``torch.compile`` traces through them and CUDA
              graph capture records their launches.
    "auto"    "triton" where it can run, else "torch" with one warning that says why.

Where Triton can run: CUDA tensors with ``triton`` importable and a CUDA device present; CPU
tensors only in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported, as
the test suite does on machines without CUDA). Asking for "triton" by name where it cannot run
raises :class:`BackendUnavailable` with the reason.

Choosing:
    per model   ``FusedUViT(model, backend="triton")`` or ``prepare_model(model, "triton")``
    per call    ``with dispatch.use_backend("torch"): ...`` overrides every model's choice
    gradients   a call that needs gradients always runs "torch" (the autograd path)

Matmul implementation inside the "triton" backend (``set_matmul("triton" | "cublas")``):
"triton" (default) runs the fused-epilogue Triton matmuls; "cublas" runs the bare matmuls through
``F.linear`` (cuBLAS) and fuses only what the LayerNorm kernel can absorb. Neither choice has
been measured here (no GPU); ``benchmarks/kernels.py`` reports both.
"""
import contextlib
import threading
import warnings
from typing import Iterator

import torch

from .ops.availability import (interpreter_enabled, triton_available, triton_import_error,  # noqa: F401
                               triton_unavailable_reason)
from .ops.triton_ops import (add_layernorm, attention_qkv, final_layer, frontend, layernorm, linear,  # noqa: F401
                             registered_ops)

BACKEND_CHOICES = ("auto", "torch", "triton")
MATMUL_CHOICES = ("triton", "cublas")


class BackendUnavailable(RuntimeError):
    """The "triton" backend was asked for by name where it cannot run."""


_STATE = threading.local()
_WARNED = set()
_MATMUL = {"impl": "triton"}


# What can run where lives in ops.availability; the names stay importable from here.
_triton_import_error = triton_import_error


# ------------------------------------------------------------------------------ choosing
def check_backend_choice(name: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within this block every fused model runs ``name`` ("auto", "torch", "triton")."""
    check_backend_choice(name)
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
                      "reference path", RuntimeWarning, stacklevel=3)


def resolve_backend(requested: str, device: torch.device, needs_grad: bool = False) -> str:
    """The backend ("torch" or "triton") that runs a call.

    Args:
        requested: the model's choice ("auto", "torch", "triton"); a :func:`use_backend` block
            overrides it.
        device: the device of the call's tensors.
        needs_grad: the call records gradients: always "torch" (the kernels have no backward).
    Raises:
        BackendUnavailable: "triton" was asked for by name and cannot run on ``device``.
    """
    override = getattr(_STATE, "override", None)
    choice = check_backend_choice(override or requested)
    if choice == "torch" or needs_grad:
        return "torch"
    reason = triton_unavailable_reason(device)
    if reason is None:
        return "triton"
    if choice == "triton":
        raise BackendUnavailable(f"the 'triton' backend cannot run: {reason}")
    _warn_once(reason)
    return "torch"


def set_matmul(impl: str) -> None:
    """Matmul implementation of the "triton" backend: "triton" (fused epilogues) or "cublas"."""
    if impl not in MATMUL_CHOICES:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_CHOICES)}, got {impl!r}")
    _MATMUL["impl"] = impl


def matmul_impl() -> str:
    return _MATMUL["impl"]
