"""Reproducible per-sample noise.

Every sample owns a CPU ``torch.Generator`` seeded from its own seed. Its starting noise x_T and the
noise of every stochastic solver step are drawn from that generator in order, on the CPU in
float32, and only then cast and moved to the target device/dtype. A sample's noise therefore
depends only on its seed (and on how many draws came before), never on the batch size, on which
other samples share its batch, or on the device.

Seeds for large runs come from :func:`seeds_for`, which mixes a base seed with each sample's global
index (so sample k gets the same noise whatever batch it lands in, and neighbouring indices get
decorrelated generator states).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

__all__ = ["NoiseSource", "seeds_for", "mix_seed"]

_MASK64 = (1 << 64) - 1
_MAX_SEED = (1 << 63) - 1  # seeds are kept representable as int64 tensors


def _splitmix64(z: int) -> int:
    """One round of the SplitMix64 output function (a bijective 64-bit mixer)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(base_seed: int, index: int) -> int:
    """Per-sample seed in [0, 2^63) derived from ``base_seed`` and a global sample ``index``."""
    for name, v in (("base_seed", base_seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    h = _splitmix64(_splitmix64(base_seed & _MASK64) ^ (index & _MASK64))
    h = _splitmix64(h ^ (base_seed >> 64))  # keep very large base seeds distinct
    return h & _MAX_SEED


def seeds_for(base_seed: int, start_index: int, count: int) -> List[int]:
    """Seeds of the samples with global indices ``start_index .. start_index + count - 1``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return [mix_seed(base_seed, start_index + k) for k in range(count)]


def _as_seed_list(seeds) -> List[int]:
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise TypeError(f"seeds must be an integer tensor, got dtype {seeds.dtype}")
        if seeds.dim() != 1:
            raise ValueError(f"seeds must have shape (B,), got {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints or a (B,) integer tensor, got {type(seeds).__name__}")
    out = []
    for k, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"seeds[{k}] must be an int, got {type(s).__name__}")
        if s < 0 or s > 0xFFFF_FFFF_FFFF_FFFF:
            raise ValueError(f"seeds[{k}] must lie in [0, 2^64 - 1], got {s}")
        out.append(s)
    return out


class NoiseSource:
    """Standard-normal noise for a batch, one generator per sample.

    Args:
        seeds: per-sample seeds, a sequence of ints or a (B,) integer tensor.
        device: device the noise is returned on.
        dtype: floating dtype the noise is returned in (drawn in float32 first).

    Example::

        ns = NoiseSource(seeds_for(0, 0, 8), device="cuda")
        x_T = ns.initial((8, 4, 32, 32))
        z = ns.step_noise(x_T.shape)
    """

    def __init__(
        self,
        seeds: Union[Sequence[int], Tensor],
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        _generators: List[torch.Generator] | None = None,
    ):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.seeds = _as_seed_list(seeds)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        if _generators is None:
            _generators = [torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]
        self._generators = _generators

    def __len__(self) -> int:
        return len(self.seeds)

    def __repr__(self) -> str:
        return f"NoiseSource(batch={len(self)}, device={self.device}, dtype={self.dtype})"

    def _draw(self, shape, name: str) -> Tensor:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or shape[0] != len(self):
            raise ValueError(
                f"{name} shape must start with the batch size {len(self)} of this NoiseSource, got {shape}"
            )
        if not self._generators:
            return torch.empty(shape, device=self.device, dtype=self.dtype)
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in self._generators]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)

    def initial(self, shape) -> Tensor:
        """Starting noise x_T of ``shape`` = (B, ...)."""
        return self._draw(shape, "initial")

    def step_noise(self, shape) -> Tensor:
        """Fresh noise for one stochastic solver step, ``shape`` = (B, ...)."""
        return self._draw(shape, "step_noise")

    def subset(self, indices) -> "NoiseSource":
        """A NoiseSource for some rows, sharing their generators (draws advance the same streams).

        ``indices``: a sequence of ints, an integer tensor, or a boolean mask of length B.
        """
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
                raise IndexError(f"index {i} out of range for a NoiseSource of batch {len(self)}")
        idx = [i % len(self) for i in idx]
        return NoiseSource(
            [self.seeds[i] for i in idx], self.device, self.dtype, _generators=[self._generators[i] for i in idx]
        )

    def to(self, device=None, dtype=None) -> "NoiseSource":
        """The same streams returning noise on another device/dtype (generators are shared)."""
        return NoiseSource(
            self.seeds,
            self.device if device is None else device,
            self.dtype if dtype is None else dtype,
            _generators=self._generators,
        )
