"""Loading of the native extension ``duodiff_fast._C`` (C++/CUDA ops registered as ``torch.ops.duodiff``).

Whether a native op may run on a given device is answered by :mod:`duodiff_fast.ops.availability`
(a CPU-only build has no CUDA kernels: callers ask per device, never just "is it loaded").

The extension is optional: when it is missing (not built, or built against another torch) the
package runs its PyTorch reference ops and logs one warning, the first time a native op is
wanted. ``DUODIFF_FAST_NATIVE=0`` switches the native ops off (the PyTorch path runs, no warning).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

__all__ = ["available", "built_with_cuda", "cuda_available", "build_info", "load_error", "ops", "require"]

_STATE = {"loaded": False, "module": None, "error": None, "warned": False}


def _load() -> None:
    if _STATE["loaded"]:
        return
    _STATE["loaded"] = True
    if os.environ.get("DUODIFF_FAST_NATIVE", "1").strip() in ("0", "false", "off", "no"):
        _STATE["error"] = "switched off by DUODIFF_FAST_NATIVE=0"
        _STATE["warned"] = True  # asked for: no warning
        return
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.duodiff.*)

        _STATE["module"] = _C
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        _STATE["error"] = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """True when ``duodiff_fast._C`` is loaded; warns once (and returns False) when it is not."""
    _load()
    if _STATE["module"] is None and not _STATE["warned"]:
        _STATE["warned"] = True
        warnings.warn(
            f"duodiff_fast._C is not available ({_STATE['error']}); using the PyTorch reference ops. "
            "Build it with `pip install --no-build-isolation -e .` (see README, 'Native ops').",
            RuntimeWarning,
            stacklevel=2,
        )
    return _STATE["module"] is not None


def built_with_cuda() -> bool:
    """True when the loaded extension holds CUDA kernels (False without the extension; no warning)."""
    _load()
    return _STATE["module"] is not None and bool(getattr(_STATE["module"], "with_cuda", False))


def cuda_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return available() and built_with_cuda()


def build_info() -> Optional[str]:
    """How the extension was built (ops, CUDA, architectures), or None without it."""
    _load()
    return None if _STATE["module"] is None else _STATE["module"].build_info()


def load_error() -> Optional[str]:
    """Why the extension did not load (None when it did)."""
    _load()
    return _STATE["error"]


def ops():
    """``torch.ops.duodiff`` (the extension must be loaded: see :func:`require`)."""
    return torch.ops.duodiff


def require(feature: str):
    """``torch.ops.duodiff`` for a feature that only the extension provides; raises without it."""
    if not available():
        raise RuntimeError(f"{feature} needs the native extension duodiff_fast._C: {_STATE['error']}")
    return torch.ops.duodiff
