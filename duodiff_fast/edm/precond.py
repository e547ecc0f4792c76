"""EDM's preconditionings: wrap a raw network F(x, c_noise, class_labels) into a denoiser D(x; sigma).

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), Table 1.
The wrapper holds the network as ``self.model`` so that state-dict keys read ``model.*`` as in
EDM's own code, and an EDM state dict exported with ``torch.save(net.state_dict())`` loads as is.

All three compute in float32 whatever x's dtype is (the Heun sampler keeps its state in float64 and
hands it in): x and sigma are cast to float32, the network runs in ``compute_dtype`` (float32 unless
a bf16/fp16 backend asks otherwise) and its output is cast back to float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "PRECONDITIONINGS"]


def _sigma_column(sigma, x: Tensor) -> Tensor:
    """sigma as a float32 (B or 1, 1, 1, 1) column; refuses non-positive or mis-sized noise levels."""
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"sigma must hold 1 or {x.shape[0]} (batch) noise levels, got {sigma.shape[0]}")
    return sigma


def _labels(label_dim: int, class_labels: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """One-hot (or soft) labels (B, label_dim) float32, zeros when a conditional net gets none."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros(1, label_dim, device=x.device)
    if not class_labels.is_floating_point():  # class ids -> one-hot, as EDM's generate.py builds them
        class_labels = torch.nn.functional.one_hot(class_labels.long(), label_dim)
    return class_labels.to(torch.float32).reshape(-1, label_dim)


class _Precond(torch.nn.Module):
    """Common part: the wrapped network and the image geometry."""

    sigma_min: float = 0.0
    sigma_max: float = float("inf")

    def __init__(self, model: torch.nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0):
        super().__init__()
        self.model = model
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.compute_dtype = torch.float32  # dtype the inner network runs in (a backend may lower it)
        self.channels_last = False  # feed the network NHWC-strided inputs (cuDNN's fast layout on GPUs)

    # The names the package's trainer, data checks and sample runner read.
    img_size = property(lambda self: self.img_resolution)
    in_chans = property(lambda self: self.img_channels)
    num_classes = property(lambda self: self.label_dim)

    def coefficients(self, sigma: Tensor):
        """(c_skip, c_out, c_in, c_noise) for float32 sigma of shape (B, 1, 1, 1)."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """Noise levels the network supports: every positive level for these preconditionings."""
        return torch.as_tensor(sigma)

    def forward(self, x: Tensor, sigma, class_labels: Optional[Tensor] = None, **model_kwargs) -> Tensor:
        """D(x; sigma): x (B, C, H, W) any float dtype, sigma (B,) or scalar -> float32 (B, C, H, W)."""
        x = x.to(torch.float32)
        sigma = _sigma_column(sigma, x)
        labels = _labels(self.label_dim, class_labels, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in = (c_in * x).to(self.compute_dtype)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        f_x = self.model(x_in, c_noise.flatten(), class_labels=labels, **model_kwargs)
        return c_skip * x + c_out * f_x.to(torch.float32)


class EDMPrecond(_Precond):
    """EDM: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, sigma_data: float = 0.5,
                 sigma_min: float = 0.0, sigma_max: float = float("inf")):
        super().__init__(model, img_resolution, img_channels, label_dim)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """Variance preserving (score SDE): c_skip 1, c_out -s, c_in 1/sqrt(s^2+1), c_noise (M-1) t(s)."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, beta_d: float = 19.9,
                 beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5):
        super().__init__(model, img_resolution, img_channels, label_dim)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1.0))

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(sigma), the inverse of :meth:`sigma`."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1.0, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance exploding (score SDE): c_skip 1, c_out s, c_in 1, c_noise ln(s/2)."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, sigma_min: float = 0.02,
                 sigma_max: float = 100.0):
        super().__init__(model, img_resolution, img_channels, label_dim)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        return 1.0, sigma, 1.0, (0.5 * sigma).log()


PRECONDITIONINGS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}
