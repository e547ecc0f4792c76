"""Counter-based (Philox4x32-10) per-sample noise, and the fused solver update that draws it.

A sample's noise is a pure function of (seed, step, element): no generator state, so it does not
depend on the batch the sample is in, it can be drawn inside a kernel (``duodiff_fast._C``), and a
CUDA graph replays it correctly with new seeds written into a static seeds buffer.

Stream (the same as ``csrc/philox.h``): key = the sample's 64-bit seed (low, high words); counter
= (g low, g high, step low, step high) with g = element // 4; the four output words give two
Box-Muller pairs, computed in float64 and rounded to float32:
u1 = (w0 + 1) / 2^32, u2 = w1 / 2^32, (r cos 2 pi u2, r sin 2 pi u2), r = sqrt(-2 ln u1).
``initial`` draws at step 0 and the k-th ``step_noise`` call at step k (per sample).

:func:`philox_normal_reference` is the pure-PyTorch implementation (int64 tensor arithmetic), used
without the extension and to check it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops import impl, solver_ops
from ..devices import normalize_device
from .noise import NoiseSource, _as_seed_list

__all__ = ["PhiloxNoise", "philox_normal", "philox_normal_reference", "philox4x32_10_reference", "fused_update"]

_M32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _as_int64(seed: int) -> int:
    """A seed in [0, 2^64) as the int64 with the same bits."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant a and int64 tensor b (< 2^32), no overflow."""
    p_lo = (a & 0xFFFF) * b  # < 2^48
    p_hi = (a >> 16) * b  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & _M32


def philox4x32_10_reference(counter: Sequence[Tensor], key: Sequence[Tensor]) -> List[Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit words; returns the 4 output words."""
    c0, c1, c2, c3 = (c & _M32 for c in counter)
    k0, k1 = (k & _M32 for k in key)
    for r in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < 9:
            k0, k1 = (k0 + _W0) & _M32, (k1 + _W1) & _M32
    return [c0, c1, c2, c3]


def philox_normal_reference(seeds: Tensor, steps: Union[int, Tensor], sample_shape, dtype=torch.float32) -> Tensor:
    """(B, *sample_shape) standard normals of the Philox stream, in pure PyTorch.

    Args:
        seeds: (B,) int64 seeds (the bits of a 64-bit seed).
        steps: the step of every row (an int) or per row ((B,) int64).
        sample_shape: shape of one sample's noise.
        dtype: output dtype (values are computed in float64 and rounded to float32 first).
    """
    sample_shape = tuple(int(s) for s in sample_shape)
    B = seeds.shape[0]
    per_row = math.prod(sample_shape)
    groups = (per_row + 3) // 4
    dev = seeds.device
    s = seeds.to(torch.int64).reshape(B, 1)
    if isinstance(steps, int):
        # a Python int stays on the host (no host-to-device copy: capturable in a CUDA graph)
        st_lo, st_hi = steps & _M32, (steps >> 32) & _M32
    else:
        st = torch.as_tensor(steps, dtype=torch.int64, device=dev).reshape(-1, 1)
        st_lo, st_hi = st & _M32, (st >> 32) & _M32
    g = torch.arange(groups, dtype=torch.int64, device=dev).reshape(1, groups)
    w = philox4x32_10_reference((g & _M32, g >> 32, st_lo, st_hi), (s & _M32, (s >> 32) & _M32))
    inv32 = 2.0**-32
    normals = []
    for p in range(2):
        u1 = (w[2 * p].double() + 1.0) * inv32
        u2 = w[2 * p + 1].double() * inv32
        r = torch.sqrt(-2.0 * torch.log(u1))
        th = (2.0 * math.pi) * u2
        normals += [(r * torch.cos(th)).float(), (r * torch.sin(th)).float()]
    z = torch.stack(normals, dim=-1).reshape(B, groups * 4)[:, :per_row]
    return z.reshape((B, *sample_shape)).to(dtype)


def philox_normal(seeds: Tensor, step: int, sample_shape, dtype=torch.float32) -> Tensor:
    """:func:`philox_normal_reference` through the native op when ``_C`` is built (same values)."""
    if impl.native(seeds.device):
        return solver_ops.philox_normal(seeds, int(step), sample_shape, dtype)
    return philox_normal_reference(seeds, int(step), sample_shape, dtype)


def _seed_tensor(seeds, device: torch.device) -> Tensor:
    # Compare normalised devices: torch.device("cuda") != torch.device("cuda:0"), and a false
    # mismatch here would copy through .tolist() (a host sync that breaks CUDA-graph capture).
    device = normalize_device(device)
    if isinstance(seeds, Tensor) and seeds.dtype == torch.int64 and seeds.dim() == 1 and seeds.device == device:
        return seeds  # used as is: a CUDA graph runtime refills this buffer between replays
    return torch.tensor([_as_int64(s) for s in _as_seed_list(seeds)], dtype=torch.int64).to(device)


class PhiloxNoise(NoiseSource):
    """Per-sample counter-based noise with the interface of :class:`NoiseSource`.

    Args:
        seeds: per-sample seeds (ints in [0, 2^64) or a (B,) integer tensor). A (B,) int64 tensor
            already on ``device`` is used without a copy, so its contents may change between calls
            (what a CUDA graph's static seeds buffer needs).
        device, dtype: where and in which dtype noise is returned.

    ``initial`` draws step 0 of each sample's stream, each ``step_noise`` the next step. Draws go
    through ``torch.ops.duodiff.philox_normal`` when the extension is built, else through
    :func:`philox_normal_reference`; the values are the same.
    """

    def __init__(self, seeds, device=None, dtype: torch.dtype = torch.float32, _state=None):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device = normalize_device(device)
        self.dtype = dtype
        self.seed_tensor = _seed_tensor(seeds, self.device)
        # Per-sample draw counters, shared with subsets (like NoiseSource's generators).
        self._counters, self._rows = _state if _state is not None else ([0] * self.seed_tensor.shape[0], None)
        self._generators = []  # NoiseSource compatibility (unused)

    @property
    def seeds(self) -> List[int]:
        return [s & 0xFFFFFFFFFFFFFFFF for s in self.seed_tensor.tolist()]

    def __len__(self) -> int:
        return int(self.seed_tensor.shape[0])

    def __repr__(self) -> str:
        return f"PhiloxNoise(batch={len(self)}, device={self.device}, dtype={self.dtype})"

    def _row_ids(self) -> List[int]:
        return list(range(len(self))) if self._rows is None else self._rows

    def next_steps(self) -> List[int]:
        """The Philox step each row draws next."""
        return [self._counters[r] for r in self._row_ids()]

    def advance(self) -> None:
        """Move every row to its next step (what a draw does)."""
        for r in self._row_ids():
            self._counters[r] += 1

    def _draw(self, shape, name: str) -> Tensor:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or shape[0] != len(self):
            raise ValueError(f"{name} shape must start with the batch size {len(self)} of this PhiloxNoise, got {shape}")
        steps = self.next_steps()
        self.advance()
        if not steps:
            return torch.empty(shape, device=self.device, dtype=self.dtype)
        if all(s == steps[0] for s in steps):
            return philox_normal(self.seed_tensor, steps[0], shape[1:], self.dtype)
        st = torch.tensor(steps, dtype=torch.int64, device=self.device)
        return philox_normal_reference(self.seed_tensor, st, shape[1:], self.dtype)

    def subset(self, indices) -> "PhiloxNoise":
        """The rows ``indices`` (ints, an integer tensor or a (B,) bool mask), sharing their counters."""
        if isinstance(indices, Tensor):
            if indices.dtype == torch.bool:
                if indices.shape != (len(self),):
                    raise ValueError(f"boolean indices must have shape ({len(self)},), got {tuple(indices.shape)}")
                indices = torch.nonzero(indices.cpu(), as_tuple=False).reshape(-1)
            elif indices.is_floating_point():
                raise TypeError(f"indices must be integer or boolean, got dtype {indices.dtype}")
            indices = indices.reshape(-1).tolist()
        idx = [int(i) for i in indices]
        for i in idx:
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for a PhiloxNoise of batch {len(self)}")
        idx = [i % len(self) for i in idx]
        rows = self._row_ids()
        sub = self.seed_tensor[torch.tensor(idx, dtype=torch.long, device=self.device)] if idx else self.seed_tensor[:0]
        return PhiloxNoise(sub.clone(), self.device, self.dtype, _state=(self._counters, [rows[i] for i in idx]))

    def to(self, device=None, dtype=None) -> "PhiloxNoise":
        """The same streams on another device/dtype (counters are shared)."""
        device = self.device if device is None else normalize_device(device)
        return PhiloxNoise(self.seed_tensor.to(device), device, self.dtype if dtype is None else dtype,
                           _state=(self._counters, self._rows))


def fused_update(x: Tensor, eps: Tensor, a: float, b: float, c: float, noise_source: Optional[NoiseSource]) -> Tensor:
    """x_next = a x + b eps + c z, z the next step noise of ``noise_source`` (none drawn when c == 0).

    With the extension and a :class:`PhiloxNoise` (or c == 0) this is one kernel
    (``torch.ops.duodiff.solver_update``, the noise drawn inside it); otherwise the same arithmetic
    in PyTorch ops. The coefficients travel as a device tensor (cached under CUDA-graph capture,
    see :mod:`duodiff_fast.samplers.constants`).
    """
    from .constants import device_constant

    draws = c != 0.0
    if draws and noise_source is None:
        z = torch.randn_like(x)
        return a * x + b * eps + c * z
    native_ok = impl.native(x.device) and (not draws or isinstance(noise_source, PhiloxNoise))
    if native_ok and draws:
        steps = noise_source.next_steps()
        native_ok = bool(steps) and all(s == steps[0] for s in steps)
    if native_ok:
        coefs = device_constant((a, b, c), x.device, torch.float64)
        if draws:
            step = noise_source.next_steps()[0]
            noise_source.advance()
            return solver_ops.solver_update(x, eps.to(x.dtype), coefs, noise_source.seed_tensor, step)
        return solver_ops.solver_update(x, eps.to(x.dtype), coefs, None, 0)
    out = a * x + b * eps.to(x.dtype)
    if draws:
        out = out + c * noise_source.step_noise(x.shape).to(device=x.device, dtype=x.dtype)
    return out
