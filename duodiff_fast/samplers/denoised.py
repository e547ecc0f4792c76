"""Corrections of the denoised estimate x0 that every solver can apply at each step.

A young model's x0 estimate ``x0 = (x - sigma eps) / alpha`` can lie far outside the data range
[-1, 1]; at the noisiest steps the division by alpha (0.006 at t = 1 on the linear DDPM schedule)
magnifies any error, and a deterministic solver never corrects it. Two standard remedies:

* **clipping** (``clip``): x0 <- clamp(x0, -1, 1) at every step (ADM / improved-DDPM
  ``clip_denoised=True``, diffusers ``clip_sample=True``);
* **dynamic thresholding** (``thresholding``; Imagen, Saharia et al. 2022, as in DPM-Solver's
  ``correcting_x0_fn="dynamic_thresholding"``): per sample, s = the ``ratio`` quantile of |x0|,
  s <- max(s, max_value); x0 <- clamp(x0, -s, s) / s.

The solvers then continue from the corrected x0, re-deriving the noise estimate from it where they
work on noise (``eps = (x - alpha x0) / sigma``), which is what ADM and diffusers do. Neither is the
papers' own setting (U-ViT, DuoDiff, DPM-Solver's noise-prediction sampler clip nothing), so both
are off by default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = ["DenoisedCorrection", "X0Fn", "denoised_correction"]

X0Fn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DenoisedCorrection:
    """How each step's x0 estimate is corrected: ``mode`` is "clip" or "thresholding".

    ``ratio`` and ``max_value`` are the dynamic-thresholding quantile (default 0.995, DPM-Solver's
    and Imagen's) and the floor of the per-sample threshold s (default 1.0, the data range).
    """

    mode: str
    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        if self.mode not in ("clip", "thresholding"):
            raise ValueError(f"mode must be 'clip' or 'thresholding', got {self.mode!r}")
        for name in ("ratio", "max_value"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"the thresholding ratio must lie in (0, 1], got {self.ratio}")
        if not self.max_value > 0.0:
            raise ValueError(f"the thresholding max value must be > 0, got {self.max_value}")

    def __call__(self, x0: Tensor) -> Tensor:
        """x0 (B, ...) -> the corrected estimate, same shape and dtype."""
        if self.mode == "clip":
            return x0.clamp(-1.0, 1.0)
        flat = x0.abs().reshape(x0.shape[0], -1)
        # torch.quantile needs float32/64; compute the threshold in float32 for half inputs.
        s = torch.quantile(flat if flat.dtype in (torch.float32, torch.float64) else flat.float(), self.ratio, dim=1)
        s = s.clamp_min(self.max_value).to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s

    def settings(self) -> Dict[str, object]:
        """What a manifest records."""
        return asdict(self) if self.mode == "thresholding" else {"mode": "clip"}


def denoised_correction(
    clip_denoised: bool = False,
    thresholding: bool = False,
    thresholding_ratio: float = 0.995,
    thresholding_max_value: float = 1.0,
) -> Optional[DenoisedCorrection]:
    """The correction the user options ask for, or None (the default: the estimate is used as is)."""
    if clip_denoised and thresholding:
        raise ValueError("choose one of clip_denoised (clip x0 to [-1, 1]) and thresholding (dynamic "
                         "thresholding); both were given")
    if thresholding:
        return DenoisedCorrection("thresholding", float(thresholding_ratio), float(thresholding_max_value))
    if clip_denoised:
        return DenoisedCorrection("clip")
    return None
