"""DDIM sampling (Song et al. 2021) with stochasticity ``eta``.

Grid: the same as DDPM's (see :func:`~duodiff_fast.samplers.ddpm.alpha_bar_grid`). Kept steps,
by default ``spacing="uniform"``: grid indices k * (N // num_steps), k = 0..num_steps-1, i.e. the
DDIM paper's ``range(0, N, N // steps)`` cut to exactly ``num_steps`` network evaluations (N=1000,
50 steps: indices 980, 960, ..., 20, 0, i.e. t = 0.981, ..., 0.001). ``"linspace"`` and
``"trailing"`` (which start at t = 1) are available too.

Step from kept time t (alpha_bar ``ab``) to the previous kept time (``ab_prev``; the step after
grid index 0 goes to ab_prev = 1, as in the DDIM paper's code, so the result is x_0 itself):

    x0_pred = (x - sqrt(1 - ab) eps) / sqrt(ab)
    sigma   = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)
    x_prev  = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma^2) eps + sigma z

With a correction of the denoised estimate (``x0_fn``, see :mod:`.denoised`), x0_pred is corrected
and the noise re-derived from it, eps = (x - sqrt(ab) x0_pred) / sqrt(1 - ab), before the update (as
ADM's ``ddim_sample`` and diffusers' ``DDIMScheduler`` with ``clip_sample``).

eta = 0 is deterministic (no noise is drawn); eta = 1 equals DDPM with the "beta_tilde" variance on
the same steps.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..schedules import NoiseSchedule
from .ddpm import (
    Denoiser,
    StepCallback,
    alpha_bar_grid,
    call_denoiser,
    check_num_steps,
    check_solver_inputs,
    draw_noise,
    fused_update,
    respaced_indices,
)
from .noise import NoiseSource

__all__ = ["DDIMSampler", "ddim_sample"]


class DDIMSampler:
    """DDIM on ``num_steps`` evenly spaced grid steps.

    Args:
        schedule: the noise schedule.
        num_steps: network evaluations (default 50, capped to the grid size).
        eta: 0 -> deterministic DDIM; 1 -> DDPM-like ancestral noise.
        spacing: see :func:`~duodiff_fast.samplers.ddpm.respaced_indices`.
        x0_fn: correction of each step's denoised estimate (see :mod:`.denoised`); None: none.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: Optional[int] = 50,
        eta: float = 0.0,
        spacing: str = "uniform",
        fused: bool = False,
        x0_fn: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        if x0_fn is not None and not callable(x0_fn):
            raise TypeError(f"x0_fn must be callable or None, got {type(x0_fn).__name__}")
        self.x0_fn = x0_fn
        t_grid, ab_grid = alpha_bar_grid(schedule)
        N = t_grid.numel()
        if num_steps is None:
            num_steps = min(50, N)
        check_num_steps(num_steps, N)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        idx = respaced_indices(N, num_steps, spacing)
        self.schedule = schedule
        self.num_steps = num_steps
        self.eta = float(eta)
        self.indices = idx
        self.times = t_grid[idx]
        self.alpha_bar = ab_grid[idx]
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        ab, abp = self.alpha_bar, self.alpha_bar_prev
        self.sigmas = self.eta * torch.sqrt((1.0 - abp) / (1.0 - ab)) * torch.sqrt(1.0 - ab / abp)
        self.fused = bool(fused)  # one a*x + b*eps + c*z update per step (see DDPMSampler)

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        y: Optional[Tensor] = None,
        noise_source: Optional[NoiseSource] = None,
        callback: Optional[StepCallback] = None,
    ) -> Tensor:
        """Run DDIM from ``x_T`` (B, ...) at the noisiest kept step; returns x_0.

        ``callback(step, t, x)`` is called after each step (see :class:`DDPMSampler`).
        """
        check_solver_inputs(x_T, y, noise_source)
        x = x_T
        for step, k in enumerate(reversed(range(self.num_steps))):
            t = self.times[k]
            ab, abp, sigma = float(self.alpha_bar[k]), float(self.alpha_bar_prev[k]), float(self.sigmas[k])
            eps = call_denoiser(denoiser, x, t, y)
            dir_coef = max(1.0 - abp - sigma * sigma, 0.0) ** 0.5
            if self.x0_fn is not None:
                x0 = self.x0_fn((x - (1.0 - ab) ** 0.5 * eps) / ab**0.5)
                # x_prev = sqrt(abp) x0 + dir_coef (x - sqrt(ab) x0) / sqrt(1 - ab) + sigma z
                c_x = dir_coef / (1.0 - ab) ** 0.5
                c_x0 = abp**0.5 - c_x * ab**0.5
                if self.fused:
                    x = fused_update(x, x0, c_x, c_x0, sigma, noise_source)
                else:
                    eps = (x - ab**0.5 * x0) / (1.0 - ab) ** 0.5
                    x = abp**0.5 * x0 + dir_coef * eps
                    if sigma > 0:
                        x = x + sigma * draw_noise(noise_source, x)
                if callback is not None:
                    callback(step, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
                continue
            if self.fused:
                a = (abp / ab) ** 0.5
                x = fused_update(x, eps, a, dir_coef - a * (1.0 - ab) ** 0.5, sigma, noise_source)
                if callback is not None:
                    callback(step, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
                continue
            x0_pred = (x - (1.0 - ab) ** 0.5 * eps) / ab**0.5
            x = abp**0.5 * x0_pred + dir_coef * eps
            if sigma > 0:
                x = x + sigma * draw_noise(noise_source, x)
            if callback is not None:
                callback(step, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
        return x


def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    y: Optional[Tensor] = None,
    noise_source: Optional[NoiseSource] = None,
    num_steps: Optional[int] = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    callback: Optional[StepCallback] = None,
    fused: bool = False,
    x0_fn: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Functional form of :class:`DDIMSampler`: returns x_0 with the shape of ``x_T``."""
    return DDIMSampler(schedule, num_steps, eta, spacing, fused, x0_fn).sample(
        denoiser, x_T, y, noise_source, callback)
