"""Device constants that are safe to use while a CUDA graph is being captured.

Solvers compute their per-step scalars (times, update coefficients) on the host. Turning one into
a device tensor is a host-to-device copy, which cannot be captured. Inside
:func:`static_constants`, such tensors come from a :class:`ConstantTable`: while ``recording``
(the eager warm-up run before capture) they are made and kept; while capturing they are only
looked up, so the graph reads tensors that stay alive, and a value that was not recorded raises
:class:`GraphUnsafe` (the runtime then falls back to the plain loop). Outside the block nothing is
cached: behaviour is unchanged.

Host times: the solvers know each step's time on the host. :func:`time_vector` makes the step's
device time vector and remembers the host value, so :func:`host_time` gives it back to a routed
denoiser without a device read, in the plain loop and under capture alike.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ConstantTable", "GraphUnsafe", "static_constants", "device_constant", "cached_time", "host_time",
           "bind_host_time", "time_vector", "table_active"]

_STATE = threading.local()


class GraphUnsafe(RuntimeError):
    """A host value needed on the device during capture was not recorded by the warm-up run."""


class ConstantTable:
    """Device tensors of host constants, keyed by (values, device, dtype[, batch])."""

    def __init__(self):
        self.tensors: Dict[tuple, Tensor] = {}
        self.host_values: Dict[int, float] = {}  # id(time tensor) -> its host time
        self.recording = True

    def get(self, key: tuple, make) -> Tensor:
        t = self.tensors.get(key)
        if t is None:
            if not self.recording:
                raise GraphUnsafe(f"device constant {key[:2]} was not recorded before capture")
            t = make()
            self.tensors[key] = t
        return t

    def __len__(self) -> int:
        return len(self.tensors)


def _table() -> Optional[ConstantTable]:
    return getattr(_STATE, "table", None)


def table_active() -> bool:
    """True inside a :func:`static_constants` block (the sampling runtime)."""
    return _table() is not None


@contextlib.contextmanager
def static_constants(table: ConstantTable, recording: bool = True) -> Iterator[ConstantTable]:
    """Serve device constants from ``table`` in this block (``recording``: create missing ones)."""
    previous = _table()
    table.recording = recording
    _STATE.table = table
    try:
        yield table
    finally:
        _STATE.table = previous


def device_constant(values: Tuple[float, ...], device, dtype: torch.dtype = torch.float64) -> Tensor:
    """``torch.tensor(values)`` on ``device``: cached in the active table, else made fresh."""
    device = torch.device(device)
    make = lambda: torch.tensor([float(v) for v in values], dtype=dtype).to(device)  # noqa: E731
    table = _table()
    if table is None:
        return make()
    return table.get(("const", tuple(float(v) for v in values), str(device), dtype), make)


def cached_time(t, x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """The (B,) device time vector for host time ``t`` (float or 0-d CPU tensor) when a table is
    active; None otherwise (or when ``t`` is a device / per-row tensor the caller converts itself)."""
    table = _table()
    if table is None:
        return None
    if isinstance(t, Tensor) and (t.numel() != 1 or t.device.type != "cpu"):
        return None
    value = float(t)
    B = x.shape[0]
    make = lambda: torch.full((B,), value, dtype=torch.float64).to(device=x.device, dtype=dtype)  # noqa: E731
    vec = table.get(("time", value, str(x.device), dtype, B), make)
    table.host_values[id(vec)] = value
    return vec


# The attribute a time vector made from a host time carries (plain loop; see time_vector).
_HOST_TIME_ATTR = "_duodiff_host_time"


def time_vector(value: float, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The (B,) device time vector of host time ``value`` for batch ``x``, which remembers ``value``:
    :func:`host_time` returns it, so a routed denoiser (DuoDiff, ASE, multistage) picks its route on
    the host instead of reading the device. Inside a :func:`static_constants` block it is the
    table's cached vector (capture-safe); outside, a fresh one (one host-to-device copy, no read)."""
    cached = cached_time(value, x, dtype)
    if cached is not None:
        return cached
    # Filled on the device (a fill kernel): no host-to-device copy, which would wait for the stream.
    # float(value) rounds to ``dtype`` as a float64 tensor cast to it would (round to nearest).
    vec = torch.full((x.shape[0],), float(value), dtype=dtype, device=x.device)
    setattr(vec, _HOST_TIME_ATTR, float(value))
    return vec


def bind_host_time(t_vec: Tensor, value: float) -> None:
    """Declare that ``t_vec`` holds host time ``value`` (a static buffer a graph is captured with)."""
    table = _table()
    if table is None:
        raise GraphUnsafe("bind_host_time needs an active static_constants table")
    table.host_values[id(t_vec)] = float(value)


def host_time(t_vec: Tensor) -> Optional[float]:
    """The host time a time vector was made from (:func:`time_vector`, :func:`cached_time`,
    :func:`bind_host_time`), or None for any other tensor (its values live on the device only)."""
    table = _table()
    if table is not None:
        value = table.host_values.get(id(t_vec))
        if value is not None:
            return value
    return getattr(t_vec, _HOST_TIME_ATTR, None)
