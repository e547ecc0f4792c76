"""Noise schedules of variance-preserving diffusion models on a continuous time axis.

Every schedule is seen through one convention: continuous time ``t`` in ``(0, 1]`` (``t = 1`` is
pure noise), given as a float tensor of shape (B,) or a scalar. The forward process is

    x_t = alpha(t) * x_0 + sigma(t) * noise,   alpha(t)^2 + sigma(t)^2 = 1,

with ``alpha(t) = sqrt(alpha_bar(t))``. ``log_alpha(t)`` is the primitive every other quantity is
derived from, and all of them are computed in float64 internally.

Two families:

* :class:`DiscreteSchedule`: ``N`` betas (DDPM). Grid point ``i`` (0-based) sits at
  ``t_i = (i + 1) / N``; between grid points ``log_alpha`` is interpolated linearly in ``t`` (the
  DPM-Solver authors' discrete-time VP convention), so it is exact at grid points.
* :class:`ContinuousVPSchedule`: linear ``beta(t)`` from ``beta_0`` to ``beta_1`` on ``[0, 1]`` (the
  VP SDE of the official U-ViT pixel and ``large`` latent checkpoints).

Return values are on the device of ``t``; they keep ``t``'s dtype when ``t`` is a floating tensor and
are float64 otherwise (python numbers, integer tensors).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "DiscreteSchedule",
    "ContinuousVPSchedule",
    "linear_ddpm",
    "scaled_linear",
    "vp_linear",
    "SCHEDULES",
    "get_schedule",
    "make_schedule",
]


def _to_float64(t) -> tuple[Tensor, torch.dtype, torch.device]:
    """Return ``t`` as a float64 tensor plus the dtype/device results should be given back in."""
    if isinstance(t, Tensor):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be a real tensor, got dtype {t.dtype}")
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        return t.to(torch.float64), out_dtype, t.device
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a float tensor or a number, got {type(t).__name__}")
    return torch.tensor(float(t), dtype=torch.float64), torch.float64, torch.device("cpu")


def _log_alpha_to_lambda(log_alpha: Tensor) -> Tensor:
    """Half log-SNR from log alpha: lambda = log alpha - log sigma, sigma^2 = 1 - alpha^2."""
    return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _lambda_to_log_alpha(lam: Tensor) -> Tensor:
    """Inverse of :func:`_log_alpha_to_lambda`: alpha^2 = 1 / (1 + exp(-2 lambda))."""
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class NoiseSchedule:
    """Base class: a VP noise schedule on continuous time ``t`` in ``[t_min, t_max]``.

    Subclasses implement :meth:`_log_alpha64`, :meth:`_inverse_log_alpha64`,
    :meth:`_model_input64` and :meth:`_step_position64` on float64 tensors; the public methods wrap
    them with dtype/device handling.
    """

    T: int = 1000  # length of the step axis DuoDiff's t_s counts on
    t_min: float
    t_max: float = 1.0

    # ---- subclass hooks (float64 in, float64 out) ---------------------------------------------
    def _log_alpha64(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _inverse_log_alpha64(self, log_alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def _model_input64(self, t: Tensor, src_dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def _step_position64(self, t: Tensor, src_dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    # ---- public API ----------------------------------------------------------------------------
    def log_alpha(self, t) -> Tensor:
        """log of the mean coefficient alpha(t) = sqrt(alpha_bar(t)); same shape as ``t``."""
        t64, dtype, device = _to_float64(t)
        return self._log_alpha64(t64).to(device=device, dtype=dtype)

    def alpha_bar(self, t) -> Tensor:
        """alpha_bar(t) = alpha(t)^2 in (0, 1)."""
        t64, dtype, device = _to_float64(t)
        return torch.exp(2.0 * self._log_alpha64(t64)).to(device=device, dtype=dtype)

    def alpha(self, t) -> Tensor:
        """alpha(t) = sqrt(alpha_bar(t)), the coefficient of x_0 in x_t."""
        t64, dtype, device = _to_float64(t)
        return torch.exp(self._log_alpha64(t64)).to(device=device, dtype=dtype)

    def sigma(self, t) -> Tensor:
        """sigma(t) = sqrt(1 - alpha_bar(t)), the coefficient of the noise in x_t."""
        t64, dtype, device = _to_float64(t)
        la = self._log_alpha64(t64)
        return torch.sqrt(-torch.expm1(2.0 * la)).to(device=device, dtype=dtype)

    def lambda_(self, t) -> Tensor:
        """Half log-SNR lambda(t) = log alpha(t) - log sigma(t); decreasing in t."""
        t64, dtype, device = _to_float64(t)
        return _log_alpha_to_lambda(self._log_alpha64(t64)).to(device=device, dtype=dtype)

    def inverse_lambda(self, lam) -> Tensor:
        """The time t with lambda(t) = lam (inverse of :meth:`lambda_`)."""
        lam64, dtype, device = _to_float64(lam)
        return self._inverse_log_alpha64(_lambda_to_log_alpha(lam64)).to(device=device, dtype=dtype)

    def model_input(self, t) -> Tensor:
        """The timestep value the network is fed at time ``t`` (see the subclass)."""
        t64, dtype, device = _to_float64(t)
        src = t.dtype if isinstance(t, Tensor) and t.is_floating_point() else torch.float64
        return self._model_input64(t64, src).to(device=device, dtype=dtype)

    def step_position(self, t) -> Tensor:
        """Position of ``t`` on the ``T``-step axis, in (0, T] (see the subclass)."""
        t64, dtype, device = _to_float64(t)
        src = t.dtype if isinstance(t, Tensor) and t.is_floating_point() else torch.float64
        return self._step_position64(t64, src).to(device=device, dtype=dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """Forward process: sqrt(alpha_bar(t)) * x0 + sqrt(1 - alpha_bar(t)) * noise.

        Args:
            x0: clean data (B, ...) float.
            noise: standard normal noise, same shape as ``x0``.
            t: (B,) times in [t_min, t_max] (or a scalar for the whole batch).
        Returns:
            x_t, same shape and dtype as ``x0``.
        """
        if not isinstance(x0, Tensor) or not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor, got {_describe(x0)}")
        if not isinstance(noise, Tensor) or noise.shape != x0.shape:
            raise ValueError(
                f"noise must be a tensor of the same shape as x0 {tuple(x0.shape)}, got {_describe(noise)}"
            )
        t64, _, _ = _to_float64(t)
        if t64.dim() > 1 or (t64.dim() == 1 and t64.shape[0] not in (1, x0.shape[0])):
            raise ValueError(f"t must have shape ({x0.shape[0]},) or be a scalar, got {tuple(t64.shape)}")
        self.check_t(t)
        la = self._log_alpha64(t64.to(x0.device))
        a = expand_to(torch.exp(la), x0)
        s = expand_to(torch.sqrt(-torch.expm1(2.0 * la)), x0)
        return a * x0 + s * noise

    def sample_training_t(
        self,
        batch: int,
        device=None,
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training times (batch,): discrete -> uniform over the N grid points; continuous -> U[t_min, 1]."""
        raise NotImplementedError

    def check_t(self, t, name: str = "t") -> None:
        """Raise ValueError naming the valid range if any value of ``t`` is outside [t_min, t_max].

        A relative slack of a few ulps of ``t``'s dtype is allowed so that e.g. ``1e-4`` rounded to
        float32 still counts as ``t_min = 1e-4``.
        """
        if isinstance(t, Tensor):
            if t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
            eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
            t64 = t.detach().to(torch.float64)
        else:
            t64, _, _ = _to_float64(t)
            eps = 0.0
        if t64.numel() == 0:
            return
        if not bool(torch.isfinite(t64).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        slack = 8.0 * max(eps, torch.finfo(torch.float64).eps)
        lo, hi = float(t64.min()), float(t64.max())
        if lo < self.t_min * (1.0 - slack) or hi > self.t_max * (1.0 + slack):
            raise ValueError(
                f"{name} must lie in [t_min, t_max] = [{self.t_min:g}, {self.t_max:g}] for "
                f"{type(self).__name__}, got values in [{lo:g}, {hi:g}]"
            )

    def discrete_grid(self, n: int) -> Tensor:
        """The n-point grid t_i = (i + 1) / n, i = 0..n-1, as a float64 tensor (n,)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return torch.arange(1, n + 1, dtype=torch.float64) / n


def _describe(v) -> str:
    if isinstance(v, Tensor):
        return f"tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    return type(v).__name__


def expand_to(coef: Tensor, x: Tensor) -> Tensor:
    """Cast a (B,) or scalar coefficient to ``x``'s dtype/device and shape it (B, 1, ..., 1)."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.dim() == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))


def _snap_to_int(v: Tensor, src_dtype: torch.dtype, scale: float) -> Tensor:
    """Round values that are within rounding error of an integer (t was a grid point).

    ``scale`` is how much the error of ``t`` is magnified (N for t * N).
    """
    eps = torch.finfo(src_dtype).eps
    tol = min(8.0 * scale * eps, 1e-3)
    r = torch.round(v)
    return torch.where((v - r).abs() <= tol, r, v)


class DiscreteSchedule(NoiseSchedule):
    """DDPM schedule from ``N`` betas, embedded in continuous time.

    Grid point i (0-based, i = 0..N-1) sits at t_i = (i + 1) / N and has alpha_bar =
    alphas_cumprod[i]; ``t_min = 1 / N``. ``log_alpha(t)`` linearly interpolates
    0.5 * log(alphas_cumprod) over the grid, which is exact at grid points.

    Args:
        betas: (N,) betas in (0, 1).
        time_input: what the network is fed: ``"index"`` -> the (fractional) step index
            i = t * N - 1; ``"normalized"`` -> i / N.
    """

    TIME_INPUTS = ("index", "normalized")

    def __init__(self, betas, time_input: str = "index"):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1), got values in [{float(betas.min()):g}, {float(betas.max()):g}]"
            )
        if time_input not in self.TIME_INPUTS:
            raise ValueError(f"time_input must be one of {self.TIME_INPUTS}, got {time_input!r}")
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._log_alpha_grid = 0.5 * torch.log(self.alphas_cumprod)
        self.time_input = time_input
        self.t_min = 1.0 / self.num_timesteps
        self.t_max = 1.0

    def __repr__(self) -> str:
        return f"DiscreteSchedule(N={self.num_timesteps}, time_input={self.time_input!r})"

    def _position(self, t: Tensor) -> Tensor:
        """Fractional grid index p = t * N - 1, snapped to integers at grid points."""
        p = t * self.num_timesteps - 1.0
        return _snap_to_int(p, torch.float64, self.num_timesteps)

    def _log_alpha64(self, t: Tensor) -> Tensor:
        N = self.num_timesteps
        grid = self._log_alpha_grid.to(t.device)
        p = self._position(t)
        i0 = torch.clamp(torch.floor(p), 0, N - 2).long()
        frac = p - i0.to(torch.float64)
        return grid[i0] + frac * (grid[i0 + 1] - grid[i0])

    def _inverse_log_alpha64(self, log_alpha: Tensor) -> Tensor:
        N = self.num_timesteps
        # log alpha decreases along the grid; search on its negation (increasing).
        neg = (-self._log_alpha_grid).to(log_alpha.device)
        q = -log_alpha
        j = torch.searchsorted(neg, q.contiguous())
        i0 = torch.clamp(j - 1, 0, N - 2)
        frac = (q - neg[i0]) / (neg[i0 + 1] - neg[i0])
        return (i0.to(torch.float64) + frac + 1.0) / N

    def _model_input64(self, t: Tensor, src_dtype: torch.dtype) -> Tensor:
        i = _snap_to_int(t * self.num_timesteps - 1.0, src_dtype, self.num_timesteps)
        return i if self.time_input == "index" else i / self.num_timesteps

    def _step_position64(self, t: Tensor, src_dtype: torch.dtype) -> Tensor:
        return torch.round(t * self.num_timesteps) * (self.T / self.num_timesteps)

    def sample_training_t(self, batch, device=None, generator=None, dtype=torch.float32) -> Tensor:
        i = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=_gen_device(generator, device))
        return ((i + 1).to(torch.float64) / self.num_timesteps).to(device=device, dtype=dtype)

    def discrete_grid(self, n: int) -> Tensor:
        if n != self.num_timesteps:
            raise ValueError(
                f"n must equal the number of steps of this discrete schedule ({self.num_timesteps}), got {n!r}"
            )
        return super().discrete_grid(n)


def _gen_device(generator, device):
    if generator is not None:
        return generator.device
    return device


class ContinuousVPSchedule(NoiseSchedule):
    """VP SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0) on t in [0, 1].

    log_alpha(t) = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2. The network is fed
    ``t * time_scale`` (999 for the official U-ViT checkpoints).
    """

    def __init__(
        self,
        beta_0: float = 0.1,
        beta_1: float = 20.0,
        t_min: float = 1e-4,
        time_scale: float = 999.0,
    ):
        if not (0 <= beta_0 <= beta_1) or beta_1 <= 0:
            raise ValueError(f"need 0 <= beta_0 <= beta_1 and beta_1 > 0, got beta_0={beta_0}, beta_1={beta_1}")
        if not (0 < t_min < 1):
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.beta_0 = float(beta_0)
        self.beta_1 = float(beta_1)
        self.t_min = float(t_min)
        self.t_max = 1.0
        self.time_scale = float(time_scale)

    def __repr__(self) -> str:
        return (
            f"ContinuousVPSchedule(beta_0={self.beta_0}, beta_1={self.beta_1}, t_min={self.t_min}, "
            f"time_scale={self.time_scale})"
        )

    def _log_alpha64(self, t: Tensor) -> Tensor:
        return -0.25 * (self.beta_1 - self.beta_0) * t * t - 0.5 * self.beta_0 * t

    def _inverse_log_alpha64(self, log_alpha: Tensor) -> Tensor:
        # Positive root of (b1-b0)/4 t^2 + b0/2 t + log_alpha = 0, in the cancellation-free form
        # t = -2 c / (b + sqrt(b^2 - 4 a c)).
        a = 0.25 * (self.beta_1 - self.beta_0)
        b = 0.5 * self.beta_0
        return -2.0 * log_alpha / (b + torch.sqrt(b * b - 4.0 * a * log_alpha))

    def _model_input64(self, t: Tensor, src_dtype: torch.dtype) -> Tensor:
        return t * self.time_scale

    def _step_position64(self, t: Tensor, src_dtype: torch.dtype) -> Tensor:
        return t * self.T

    def sample_training_t(self, batch, device=None, generator=None, dtype=torch.float32) -> Tensor:
        u = torch.rand((batch,), generator=generator, dtype=torch.float64, device=_gen_device(generator, device))
        return (self.t_min + (1.0 - self.t_min) * u).to(device=device, dtype=dtype)


def linear_ddpm(
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    time_input: str = "index",
) -> DiscreteSchedule:
    """DDPM's linear betas (the DuoDiff paper's schedule)."""
    _check_steps(num_timesteps)
    return DiscreteSchedule(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64), time_input)


def scaled_linear(
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    time_input: str = "index",
) -> DiscreteSchedule:
    """Stable Diffusion's schedule: betas = linspace(sqrt(b0), sqrt(b1))^2 (U-ViT huge latent)."""
    _check_steps(num_timesteps)
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64)
    return DiscreteSchedule(root * root, time_input)


def vp_linear(beta_0: float = 0.1, beta_1: float = 20.0, **kw) -> ContinuousVPSchedule:
    """The continuous VP SDE of the official U-ViT pixel / large-latent checkpoints."""
    return ContinuousVPSchedule(beta_0, beta_1, **kw)


def _check_steps(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {n!r}")


SCHEDULES: Dict[str, Callable[..., NoiseSchedule]] = {
    "linear": linear_ddpm,
    "vp-linear": vp_linear,
    "scaled-linear": scaled_linear,
}


def get_schedule(name: str, **kw) -> NoiseSchedule:
    """Build a schedule by name (one of ``SCHEDULES``); keyword arguments go to its factory."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kw)


def make_schedule(name: str, time_input: str = "index") -> NoiseSchedule:
    """Schedule ``name`` feeding the network ``time_input``.

    ``"index"``: each schedule's native input (discrete: the step index; continuous: t * 999).
    ``"normalized"``: index / N, discrete schedules only (the continuous VP schedule has no step
    index to normalise; a ValueError says so).
    """
    if time_input not in DiscreteSchedule.TIME_INPUTS:
        raise ValueError(f"time_input must be one of {DiscreteSchedule.TIME_INPUTS}, got {time_input!r}")
    schedule = get_schedule(name)
    if time_input == "index":
        return schedule
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"time_input={time_input!r} needs a discrete schedule; {name!r} is continuous "
                         "(its network input is t * 999)")
    return get_schedule(name, time_input=time_input)
