"""EDM's noise-level grid and its Heun sampler (Karras et al. 2022, Algorithm 2).

The grid is sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho for i < N, then
sigma_N = 0. Each step takes an Euler step and, unless it lands on sigma = 0, corrects it with the
average of the two slopes (Heun): 2N - 1 network evaluations (35 for CIFAR-10's N = 18). The state
lives in float64 between evaluations; the denoiser sees it cast to float32 by its preconditioning.
Optional churn (S_churn, S_min, S_max, S_noise) raises the noise level before a step and adds fresh
noise to match.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["sigma_grid", "HeunConfig", "heun_sample", "heun_nfe"]


def sigma_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device=None) -> Tensor:
    """EDM's noise levels: (num_steps + 1,) float64, from sigma_max down to sigma_min, then 0."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    # One level only: EDM's formula divides by N - 1; the single step starts at sigma_max.
    frac = i / (num_steps - 1) if num_steps > 1 else i
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of a Heun run: 2N - 1 (no correction into sigma = 0)."""
    return 2 * num_steps - 1


@dataclass(frozen=True)
class HeunConfig:
    """Settings of :func:`heun_sample`; the defaults are EDM's deterministic CIFAR-10 sampler."""

    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self):
        sigma_grid(self.num_steps, self.sigma_min, self.sigma_max, self.rho)  # validates
        if self.S_churn < 0 or self.S_noise < 0:
            raise ValueError(f"S_churn and S_noise must be >= 0, got {self.S_churn}, {self.S_noise}")


def heun_sample(
    denoiser: Callable[..., Tensor],
    latents: Tensor,
    config: HeunConfig = HeunConfig(),
    class_labels: Optional[Tensor] = None,
    randn_like: Callable[[Tensor], Tensor] = torch.randn_like,
    callback: Optional[Callable[[int, Tensor], None]] = None,
) -> Tensor:
    """Run EDM's Heun sampler.

    Args:
        denoiser: D(x, sigma, class_labels) -> denoised image (an EDM preconditioning). It is called
            with x (B, C, H, W) float64 and sigma a float64 scalar tensor (the whole batch shares it,
            which is also how a multistage net picks its decoder). Its ``sigma_min``/``sigma_max``
            attributes, when present, clip the grid as EDM does.
        latents: (B, C, H, W) unit Gaussian noise; scaled by sigma_max here.
        config: grid and churn settings.
        class_labels: passed through to the denoiser.
        randn_like: churn noise source (only called when churn is on).
        callback: called as callback(i, x) after step i.

    Returns:
        x_0 (B, C, H, W) float64.
    """
    if not isinstance(latents, Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        raise ValueError(f"latents must be a float (B, C, H, W) tensor, got "
                         f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
    smin = max(config.sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    smax = min(config.sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    t_steps = sigma_grid(config.num_steps, smin, smax, config.rho, device=latents.device)
    n = config.num_steps
    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(n):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        # Churn: raise the noise level to t_hat and add the matching fresh noise.
        gamma = min(config.S_churn / n, math.sqrt(2) - 1) if config.S_min <= float(t_cur) <= config.S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * config.S_noise * randn_like(x_cur)
        # Euler step.
        denoised = denoiser(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Second-order correction, except into sigma = 0.
        if i < n - 1:
            denoised = denoiser(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next
