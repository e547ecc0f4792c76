"""What can run where, and why not: the one module that answers for the Triton kernels and the
native ops of ``duodiff_fast._C``, per device.

    triton_unavailable_reason(device)   None when the Triton kernels can launch on ``device``, else
                                        every reason (triton_unavailable_reasons: the list)
    native_unavailable_reason(device)   None when ``torch.ops.duodiff`` has kernels for ``device``
    native_available(device)            the same as a bool (warns once when _C is missing)
    report()                            one line per backend and device, for logs and the CLI

A CPU-only build of ``_C`` loads fine but has no CUDA kernels: every question is asked for the
device of the tensors at hand, so such a build serves CPU tensors and CUDA tensors take the
PyTorch path (rather than the op failing with "no CUDA implementation").

Nothing here imports triton or touches CUDA at import time.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import List, Optional

import torch

from . import native

__all__ = ["interpreter_enabled", "kernels_import_error", "triton_import_error", "triton_unavailable_reason",
           "triton_unavailable_reasons", "triton_available",
           "native_unavailable_reason", "native_available", "report"]


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    """Why triton cannot be imported (None when it can); computed once."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # a broken install: report it rather than crash
        return f"triton failed to import ({type(e).__name__}: {e})"
    return None


def interpreter_enabled() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=None)
def kernels_import_error() -> Optional[str]:
    """Why ``duodiff_fast.kernels`` cannot be imported (None when it can); computed once. A bare
    checkout has no such subpackage: setup.py ships the top-level kernels/ folder under that name."""
    if importlib.util.find_spec("duodiff_fast.kernels") is None:
        return ("duodiff_fast.kernels is not importable (a bare checkout: install the package, "
                "`pip install --no-build-isolation -e .`, to ship kernels/ as duodiff_fast.kernels)")
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def triton_unavailable_reasons(device=None) -> List[str]:
    """Every reason the Triton kernels cannot run on ``device`` (default: CUDA if present); empty when
    they can."""
    reasons = []
    for err in (kernels_import_error(), triton_import_error()):
        if err:
            reasons.append(err)
    device = _device(device)
    if device.type == "cuda":
        if interpreter_enabled():
            reasons.append("TRITON_INTERPRET=1 is set, so Triton cannot launch kernels on CUDA tensors")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        else:
            major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} is below 8.0 (the kernels' bfloat16 "
                               "tl.dot needs sm_80 or newer)")
    elif device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("no CUDA device is available (Triton kernels need one; set TRITON_INTERPRET=1 "
                           "before importing triton to run them in the slow CPU interpreter)")
    else:
        reasons.append(f"Triton kernels do not run on {device.type} tensors")
    return reasons


def triton_unavailable_reason(device=None) -> Optional[str]:
    """None when the Triton kernels can run on ``device`` (default: CUDA if present), else every
    reason why not, joined by "; "."""
    reasons = triton_unavailable_reasons(device)
    return "; ".join(reasons) if reasons else None


def triton_available(device=None) -> bool:
    return triton_unavailable_reason(device) is None


def native_unavailable_reason(device=None) -> Optional[str]:
    """None when ``torch.ops.duodiff`` can run on ``device``, else why not (no warning)."""
    error = native.load_error()
    if error is not None:
        return f"duodiff_fast._C is not available ({error})"
    device = _device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if native.built_with_cuda() else "duodiff_fast._C was built without CUDA kernels (CPU-only build)"
    return f"duodiff_fast._C has no kernels for {device.type} tensors"


def native_available(device) -> bool:
    """True when the native ops can run on ``device``; warns once when ``_C`` did not load at all."""
    if not native.available():  # the one warning about a missing extension comes from here
        return False
    return native_unavailable_reason(device) is None


def report() -> List[str]:
    """Human-readable lines: each backend, where it runs, or why not."""
    lines = []
    for dev in ("cpu", "cuda"):
        r = triton_unavailable_reason(torch.device(dev))
        lines.append(f"triton on {dev}: " + ("available" if r is None else f"unavailable: {r}"))
        r = native_unavailable_reason(torch.device(dev))
        lines.append(f"native ops on {dev}: " + ("available" if r is None else f"unavailable: {r}"))
    return lines
