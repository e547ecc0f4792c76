"""Adapters from a U-ViT or DiT network to the denoiser protocol the solvers use.

A *denoiser* is any callable ``eps = denoiser(x, t, y)``: x (B, C, H, W) float, t (B,) float
continuous time in (0, 1] (t = 1 is pure noise), y (B,) long class ids or None; it returns the
predicted noise with the shape of x. How t is fed to the network (step index, t * 999, ...) is a
property of the noise schedule, so the adapter asks the schedule.

A network with more output than input channels (DiT with ``learn_sigma``: eps, then the variance
interpolation value) is read through ``output(x, t, y)``, the whole network output, which the
improved-DDPM sampler (:mod:`duodiff_fast.samplers.improved_ddpm`) uses; ``denoiser(x, t, y)`` is its
first ``C`` channels (eps) for every other solver. Subclasses (DuoDiff, ASE) override ``output``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import model_dtype
from ..validation import check_image_batch, check_labels, values_trusted


class ModelDenoiser:
    """Wrap ``model(x, timesteps, y)`` as a denoiser on continuous time.

    Args:
        model: a U-ViT (or any module with the same forward signature and ``in_chans``,
            ``img_size``, ``num_classes`` attributes).
        schedule: the noise schedule the model was trained with; ``schedule.model_input(t)`` gives
            the network's timestep input and ``schedule.check_t`` the valid range of t.
    """

    def __init__(self, model: torch.nn.Module, schedule):
        self.model = model
        self.schedule = schedule

    @property
    def in_chans(self) -> int:
        return self.model.in_chans

    @property
    def img_size(self) -> int:
        return self.model.img_size

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def check(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Validate inputs before any network work (image shape/dtype, t range, labels)."""
        check_image_batch(x, self.in_chans, self.img_size)
        if not isinstance(t, torch.Tensor) or t.shape not in ((x.shape[0],), (1,), ()):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape ({x.shape[0]},), got {shape}")
        if not values_trusted():
            self.schedule.check_t(t)
        check_labels(y, x.shape[0], self.num_classes)

    @property
    def uses_improved_ddpm(self) -> bool:
        """True for DiT networks: DDPM/DDIM run DiT's improved-DDPM diffusion (learned variance,
        respacing) instead of the package's plain DDPM/DDIM."""
        return getattr(self.model, "learn_sigma", None) is not None

    def output(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network's whole output (B, C_out, H, W) at continuous times t (C_out = 2C with a learned variance)."""
        self.check(x, t, y)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        return self._run(self.model, x, t, y)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eps (B, C, H, W): the first C channels of :meth:`output`."""
        out = self.output(x, t, y)
        return out if out.shape[1] == x.shape[1] else out[:, : x.shape[1]]

    def _run(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """Feed the schedule's timestep input to ``model``; cast to its dtype and back to x's."""
        timesteps = self.schedule.model_input(t).to(device=x.device, dtype=torch.float32)
        dtype = model_dtype(model)
        return model(x.to(dtype), timesteps, y).to(x.dtype)
