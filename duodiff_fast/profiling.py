"""NVTX ranges for Nsight Systems, off by default and free when off.

Switch on with ``DUODIFF_NVTX=1`` in the environment or :func:`enable` (e.g. the benchmark's
``--nvtx``). When off, :func:`nvtx_range` returns one shared no-op context manager (no CUDA call,
no allocation) and :func:`annotate_module` leaves modules untouched.

    with nvtx_range("ddim step 3"):
        ...
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["enabled", "enable", "nvtx_range", "annotate_module"]

_ENABLED = os.environ.get("DUODIFF_NVTX", "0").strip().lower() in ("1", "true", "on", "yes")
_NULL = contextlib.nullcontext()


def enabled() -> bool:
    """True when NVTX ranges are emitted (and CUDA is present to receive them)."""
    return _ENABLED and torch.cuda.is_available()


def enable(on: bool = True) -> None:
    """Switch NVTX ranges on or off for this process."""
    global _ENABLED
    _ENABLED = bool(on)


@contextlib.contextmanager
def _range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """A context manager that marks an NVTX range ``name`` when enabled, a shared no-op otherwise."""
    if not _ENABLED:
        return _NULL
    if not torch.cuda.is_available():
        return _NULL
    return _range(name)


def annotate_module(module: torch.nn.Module, prefix: str = "") -> int:
    """Wrap ``module`` and its direct block children (``in_blocks``, ``mid_block``, ``out_blocks``
    when present) in NVTX ranges via forward pre/post hooks. Returns the number of modules hooked;
    0 (nothing done) when NVTX is off."""
    if not enabled():
        return 0
    targets = [(prefix or type(module).__name__, module)]
    for attr in ("in_blocks", "out_blocks"):
        for i, blk in enumerate(getattr(module, attr, []) or []):
            targets.append((f"{targets[0][0]}.{attr}[{i}]", blk))
    if getattr(module, "mid_block", None) is not None:
        targets.append((f"{targets[0][0]}.mid_block", module.mid_block))
    for name, m in targets:
        if getattr(m, "_duodiff_nvtx", False):
            continue
        m.register_forward_pre_hook(lambda _m, _a, _n=name: torch.cuda.nvtx.range_push(_n))
        m.register_forward_hook(lambda _m, _a, _o: torch.cuda.nvtx.range_pop())
        m._duodiff_nvtx = True
    return len(targets)
