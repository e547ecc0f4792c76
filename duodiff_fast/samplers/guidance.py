"""Classifier-free guidance as a denoiser wrapper: U-ViT's form, and DiT's ``forward_with_cfg``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .constants import host_time, time_vector
from .ddpm import Denoiser

__all__ = ["ClassifierFreeGuidance", "DiTGuidance", "make_guidance", "DIT_GUIDED_CHANNELS"]

DIT_GUIDED_CHANNELS = 3  # DiT's forward_with_cfg guides the first 3 output channels only


class ClassifierFreeGuidance:
    """Guided denoiser: ``cond + scale * (cond - uncond)`` (the U-ViT convention).

    The conditional and unconditional rows are evaluated in ONE batched call of the wrapped
    denoiser: x and t are concatenated twice, y with a row of ``null_class`` labels. With
    ``scale == 0`` only the conditional batch is evaluated and returned.

    Args:
        denoiser: ``eps = denoiser(x, t, y)``.
        scale: guidance scale s >= 0 (U-ViT's ``cond + s (cond - uncond)``; DPM-Solver's
            ``uncond + w (cond - uncond)`` is w = s + 1).
        null_class: label id of the "no class" embedding (the last id of a U-ViT label table).
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_class: int):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"scale must be a number >= 0, got {scale!r}")
        if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
            raise ValueError(f"null_class must be a non-negative int, got {null_class!r}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_class = null_class

    def host_route(self, t: Tensor):
        """The wrapped denoiser's host-side route for time ``t`` (see DuoDiff.host_route), if it has one."""
        inner = getattr(self.denoiser, "host_route", None)
        return "model" if inner is None else inner(t)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale}, null_class={self.null_class})"

    def check(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> None:
        """Validate inputs (and the null class) against the wrapped denoiser, if it can check."""
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y of shape (B,), got None")
        inner = getattr(self.denoiser, "check", None)
        if inner is not None:
            inner(x, t, y)
            inner(x[:1], t.reshape(-1)[:1], torch.full_like(y[:1], self.null_class))

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        """x (B, ...) float, t (B,) float, y (B,) integer class ids -> guided eps (B, ...)."""
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y of shape (B,), got None")
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class ids, got {getattr(y, 'dtype', type(y).__name__)}")
        B = x.shape[0]
        if tuple(y.shape) != (B,):
            raise ValueError(f"y must have shape ({B},), got {tuple(y.shape)}")
        if self.scale == 0.0:
            return self.denoiser(x, t, y)
        host = host_time(t)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        null = torch.full_like(y, self.null_class)
        x2 = torch.cat([x, x])
        # The doubled time vector keeps the host value of the step, so a routed denoiser (DuoDiff,
        # ASE, multistage) decides on the host: no device read, and the call captures in a graph.
        t2 = time_vector(host, x2, t.dtype) if host is not None else None
        both = self.denoiser(x2, torch.cat([t, t]) if t2 is None else t2, torch.cat([y, null]))
        cond, uncond = both[:B], both[B:]
        return cond + self.scale * (cond - uncond)


class DiTGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance exactly as DiT's ``forward_with_cfg``: ``uncond + w (cond - uncond)``
    on the first 3 output channels only (the official code keeps this for exact reproduction),
    every other channel (the 4th eps channel of SD latents, the learned variance) from the
    conditional rows.

    ``scale`` is the package's s (``cond + s (cond - uncond)``), so DiT's w = 1 + s: DiT's
    published w = 1.5 is s = 0.5. The wrapped denoiser must have ``output(x, t, y)`` (the whole
    network output, :class:`~duodiff_fast.methods.ModelDenoiser`).
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_class: int):
        super().__init__(denoiser, scale, null_class)
        if not callable(getattr(denoiser, "output", None)):
            raise TypeError(f"DiT guidance needs a denoiser with output(x, t, y), got {type(denoiser).__name__}")

    @property
    def uses_improved_ddpm(self) -> bool:
        return bool(getattr(self.denoiser, "uses_improved_ddpm", False))

    def __repr__(self) -> str:
        return f"DiTGuidance(scale={self.scale} (DiT's {1.0 + self.scale}), null_class={self.null_class})"

    def output(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        """Guided network output (B, C_out, H, W): rows of ``forward_with_cfg``'s conditional half."""
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y of shape (B,), got None")
        B = x.shape[0]
        if self.scale == 0.0:
            return self.denoiser.output(x, t, y)
        host = host_time(t)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        x2 = torch.cat([x, x])
        t2 = time_vector(host, x2, t.dtype) if host is not None else None
        both = self.denoiser.output(x2, torch.cat([t, t]) if t2 is None else t2, torch.cat([y, torch.full_like(y, self.null_class)]))
        g = DIT_GUIDED_CHANNELS
        cond, uncond = both[:B, :g], both[B:, :g]
        return torch.cat([uncond + (1.0 + self.scale) * (cond - uncond), both[:B, g:]], dim=1)

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        """Guided eps (B, C, H, W): the first C channels of :meth:`output`."""
        if y is not None and (not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool):
            raise TypeError(f"y must be an integer tensor of class ids, got {getattr(y, 'dtype', type(y).__name__)}")
        return self.output(x, t, y)[:, : x.shape[1]]


def make_guidance(denoiser: Denoiser, scale: float, null_class: int) -> ClassifierFreeGuidance:
    """The guidance of the denoiser's network: :class:`DiTGuidance` for DiT (``uses_improved_ddpm``),
    :class:`ClassifierFreeGuidance` otherwise; ``scale`` is s of ``cond + s (cond - uncond)``."""
    if getattr(denoiser, "uses_improved_ddpm", False):
        return DiTGuidance(denoiser, scale, null_class)
    return ClassifierFreeGuidance(denoiser, scale, null_class)
