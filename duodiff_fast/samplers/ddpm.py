"""DDPM ancestral sampling (Ho et al. 2020), with optional respacing.

The solver works on a grid of ``N`` alpha_bar values: for a :class:`DiscreteSchedule` its own
``alphas_cumprod`` at t_i = (i + 1) / N; for a continuous schedule alpha_bar evaluated on
``schedule.discrete_grid(schedule.T)`` (1000 points). With ``num_steps < N`` an evenly spaced
subsequence of grid indices is kept and the betas are recomputed from the alpha_bar of consecutive
kept steps: beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} (alpha_bar before the first kept step is 1).

One reverse step from kept step k (time t_k) to k-1:

    mean = (x - beta_k / sqrt(1 - ab_k) * eps) / sqrt(1 - beta_k)
    x    = mean + sqrt(var_k) * z,   var_k = beta_k ("beta") or
                                    (1 - ab_{k-1}) / (1 - ab_k) * beta_k ("beta_tilde")

and no noise is added on the final step.

With a correction of the denoised estimate (``x0_fn``, see :mod:`.denoised`) the step goes through
x0 instead, as ADM's ``p_mean_variance`` with ``clip_denoised``: x0 = x0_fn((x - sqrt(1 - ab_k) eps)
/ sqrt(ab_k)) and mean = sqrt(ab_{k-1}) beta_k / (1 - ab_k) x0 + sqrt(1 - beta_k) (1 - ab_{k-1}) /
(1 - ab_k) x (the posterior mean; without a correction it equals the eps form above).

This module also holds the helpers DDIM shares: :func:`alpha_bar_grid`, :func:`respaced_indices`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..profiling import nvtx_range
from .constants import time_vector
from ..schedules import DiscreteSchedule, NoiseSchedule
from .noise import NoiseSource

__all__ = ["DDPMSampler", "ddpm_sample", "alpha_bar_grid", "respaced_indices", "SPACINGS", "VARIANCES"]

SPACINGS = ("uniform", "linspace", "trailing")
VARIANCES = ("beta", "beta_tilde")

Denoiser = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]


def alpha_bar_grid(schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    """The solver grid of a schedule: times t (N,) and alpha_bar (N,), float64, ascending t.

    Discrete schedules: their N grid points and ``alphas_cumprod``. Continuous schedules:
    ``schedule.discrete_grid(schedule.T)`` and alpha_bar evaluated there.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if isinstance(schedule, DiscreteSchedule):
        return schedule.discrete_grid(schedule.num_timesteps), schedule.alphas_cumprod.clone()
    t = schedule.discrete_grid(schedule.T)
    return t, schedule.alpha_bar(t)


def check_num_steps(num_steps, max_steps: int, name: str = "num_steps") -> int:
    """``num_steps`` must be an int in [1, max_steps]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"{name} must be an int, got {type(num_steps).__name__} ({num_steps!r})")
    if not 1 <= num_steps <= max_steps:
        raise ValueError(f"{name} must lie in [1, {max_steps}] for this schedule's grid, got {num_steps}")
    return num_steps


def respaced_indices(num_grid: int, num_steps: int, spacing: str = "uniform") -> Tensor:
    """Ascending grid indices (num_steps,) long of an evenly spaced subsequence of 0..num_grid-1.

    * ``"uniform"``: k * (num_grid // num_steps), k = 0..num_steps-1 — the DDIM paper's
      ``range(0, N, N // steps)`` cut to exactly ``num_steps`` entries (for N=1000, 50 steps:
      0, 20, ..., 980). The noisiest step is then not always the last grid point.
    * ``"linspace"``: round(linspace(0, N - 1, num_steps)); always contains 0 and N - 1
      (one step: just N - 1).
    * ``"trailing"``: round(N - k * N / num_steps) - 1; always contains N - 1.
    """
    check_num_steps(num_steps, num_grid)
    if spacing == "uniform":
        idx = torch.arange(num_steps, dtype=torch.int64) * (num_grid // num_steps)
    elif spacing == "linspace":
        if num_steps == 1:
            idx = torch.tensor([num_grid - 1], dtype=torch.int64)
        else:
            idx = torch.linspace(0, num_grid - 1, num_steps, dtype=torch.float64).round().long()
    elif spacing == "trailing":
        k = torch.arange(num_steps, dtype=torch.float64)
        idx = (num_grid - k * num_grid / num_steps).round().long().flip(0) - 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return idx


def check_solver_inputs(x_T, y, noise_source, num_classes: int | None = None) -> None:
    """Shared checks on the starting sample, labels and noise source of a solver."""
    if not isinstance(x_T, Tensor):
        raise TypeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
    if not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor, got dtype {x_T.dtype}")
    if x_T.dim() < 2 or x_T.shape[0] == 0:
        raise ValueError(f"x_T must have shape (B, ...) with B >= 1, got {tuple(x_T.shape)}")
    B = x_T.shape[0]
    if y is not None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor of class ids or None, got {type(y).__name__}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class ids, got dtype {y.dtype}")
        if tuple(y.shape) != (B,):
            raise ValueError(f"y must have shape ({B},) to match x_T, got {tuple(y.shape)}")
    if noise_source is not None:
        if not isinstance(noise_source, NoiseSource):
            raise TypeError(f"noise_source must be a NoiseSource or None, got {type(noise_source).__name__}")
        if len(noise_source) != B:
            raise ValueError(f"noise_source has {len(noise_source)} samples but x_T has batch {B}")


def time_dtype(x: Tensor) -> torch.dtype:
    """dtype of the (B,) time vector handed to the denoiser: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def call_denoiser(denoiser: Denoiser, x: Tensor, t: float | Tensor, y: Optional[Tensor]) -> Tensor:
    """Evaluate ``denoiser(x, t_vec, y)`` with t broadcast to (B,) and check the output shape."""
    # A host time becomes a device vector that remembers it (samplers.constants.time_vector); under
    # CUDA-graph capture (duodiff_fast.runtime) it comes from a table recorded by the warm-up run: a
    # host-to-device copy cannot be captured.
    if not isinstance(t, Tensor) or (t.numel() == 1 and t.device.type == "cpu"):
        t_vec = time_vector(float(t), x, time_dtype(x))  # knows its host time: routes need no device read
    else:  # a device tensor or per-row times: the denoiser reads them where it must
        t_vec = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t_vec.numel() == 1:
            t_vec = t_vec.expand(x.shape[0])
        t_vec = t_vec.to(device=x.device, dtype=time_dtype(x))
    with nvtx_range("denoiser step"):  # NVTX (DUODIFF_NVTX=1): a shared no-op context when off
        out = denoiser(x, t_vec, y)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the denoiser must return a tensor of shape {tuple(x.shape)}, got {got}")
    return out.to(x.dtype)


def fused_update(x, eps, a, b, c, noise_source):
    """x_next = a x + b eps + c z (see :func:`duodiff_fast.samplers.philox.fused_update`)."""
    from .philox import fused_update as _fused  # late import: philox imports this package's noise

    return _fused(x, eps, a, b, c, noise_source)


def draw_noise(noise_source: Optional[NoiseSource], x: Tensor) -> Tensor:
    """Step noise like ``x``: from the per-sample streams, or torch's global RNG when None."""
    if noise_source is None:
        return torch.randn_like(x)
    return noise_source.step_noise(x.shape).to(device=x.device, dtype=x.dtype)


class DDPMSampler:
    """Ancestral DDPM sampler on a (respaced) grid.

    Args:
        schedule: the noise schedule.
        num_steps: number of reverse steps (= network evaluations); default: the full grid.
        variance: ``"beta"`` (sigma^2 = beta_t) or ``"beta_tilde"`` (the posterior variance).
        spacing: how the kept steps are chosen when ``num_steps`` < N (see :func:`respaced_indices`).
        x0_fn: correction of each step's denoised estimate (e.g. a
            :class:`~duodiff_fast.samplers.denoised.DenoisedCorrection`); None uses it as is.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: Optional[int] = None,
        variance: str = "beta",
        spacing: str = "linspace",
        fused: bool = False,
        x0_fn: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        t_grid, ab_grid = alpha_bar_grid(schedule)
        N = t_grid.numel()
        num_steps = N if num_steps is None else check_num_steps(num_steps, N)
        idx = respaced_indices(N, num_steps, spacing)
        self.schedule = schedule
        self.variance = variance
        self.num_steps = num_steps
        self.indices = idx
        self.times = t_grid[idx]  # (K,) ascending
        self.alpha_bar = ab_grid[idx]
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.betas = 1.0 - self.alpha_bar / self.alpha_bar_prev
        if variance == "beta":
            self.variances = self.betas.clone()
        else:
            self.variances = (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar) * self.betas
        # fused: one a*x + b*eps + c*z update per step (duodiff_fast.samplers.philox.fused_update;
        # one kernel with the native extension and Philox noise). The same step up to rounding; the
        # default (False) keeps the original expressions, so existing results stay bit-identical.
        self.fused = bool(fused)
        if x0_fn is not None and not callable(x0_fn):
            raise TypeError(f"x0_fn must be callable or None, got {type(x0_fn).__name__}")
        self.x0_fn = x0_fn

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        y: Optional[Tensor] = None,
        noise_source: Optional[NoiseSource] = None,
        callback: Optional[StepCallback] = None,
    ) -> Tensor:
        """Run the reverse chain from ``x_T`` (B, ...) at the noisiest kept step; returns x_0.

        ``callback(step, t, x)`` is called after each step with the step counter (0 first), the
        (B,) time the step started from and the updated sample.
        """
        check_solver_inputs(x_T, y, noise_source)
        x = x_T
        for step, k in enumerate(reversed(range(self.num_steps))):
            t = self.times[k]
            eps = call_denoiser(denoiser, x, t, y)
            beta = float(self.betas[k])
            ab = float(self.alpha_bar[k])
            coef_eps = beta / (1.0 - ab) ** 0.5
            if self.x0_fn is not None:
                x = self._corrected_step(k, x, eps, noise_source)
                if callback is not None:
                    callback(step, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
                continue
            if self.fused:
                inv = 1.0 / (1.0 - beta) ** 0.5
                c = float(self.variances[k]) ** 0.5 if k > 0 else 0.0
                x = fused_update(x, eps, inv, -coef_eps * inv, c, noise_source)
                if callback is not None:
                    callback(step, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
                continue
            x = (x - coef_eps * eps) / (1.0 - beta) ** 0.5
            if k > 0:
                x = x + float(self.variances[k]) ** 0.5 * draw_noise(noise_source, x)
            if callback is not None:
                callback(step, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
        return x

    def _corrected_step(self, k: int, x: Tensor, eps: Tensor, noise_source) -> Tensor:
        """One step through the corrected x0: the posterior mean q(x_{k-1} | x_k, x0) plus noise."""
        ab, abp, beta = float(self.alpha_bar[k]), float(self.alpha_bar_prev[k]), float(self.betas[k])
        x0 = self.x0_fn((x - (1.0 - ab) ** 0.5 * eps) / ab**0.5)
        c_x0 = abp**0.5 * beta / (1.0 - ab)
        c_x = (1.0 - beta) ** 0.5 * (1.0 - abp) / (1.0 - ab)
        c_z = float(self.variances[k]) ** 0.5 if k > 0 else 0.0
        if self.fused:  # a x + b x0 + c z in one update, the same noise stream as the eps form
            return fused_update(x, x0, c_x, c_x0, c_z, noise_source)
        x = c_x * x + c_x0 * x0
        return x + c_z * draw_noise(noise_source, x) if k > 0 else x


def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    y: Optional[Tensor] = None,
    noise_source: Optional[NoiseSource] = None,
    num_steps: Optional[int] = None,
    variance: str = "beta",
    spacing: str = "linspace",
    callback: Optional[StepCallback] = None,
    fused: bool = False,
    x0_fn: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Functional form of :class:`DDPMSampler`: returns x_0 with the shape of ``x_T``."""
    return DDPMSampler(schedule, num_steps, variance, spacing, fused, x0_fn).sample(
        denoiser, x_T, y, noise_source, callback)
