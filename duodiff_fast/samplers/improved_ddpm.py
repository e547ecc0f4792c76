"""The improved-DDPM diffusion as DiT samples it (Nichol & Dhariwal 2021; DiT's ``diffusion/``).

A discrete schedule of N betas (DiT: linear 1e-4..0.02, N = 1000) is *respaced* to K kept steps
(:func:`space_timesteps`, DiT's default "250"): the kept original indices ``timestep_map`` (K,)
get new betas ``1 - abar[i_k] / abar[i_{k-1}]`` and the network is fed the original index
``timestep_map[k]``. Every coefficient of the respaced process is recomputed from those betas in
float64 and rounded to the sample's dtype where it is used, as the official code does, so a
float32 run reproduces it to rounding.

The network predicts eps and, with a learned variance (``2 C`` output channels), the interpolation
value v in [-1, 1]: log var = f log(beta_k) + (1 - f) log(beta~_k), f = (v + 1) / 2 (beta~_k the
posterior variance, its first entry replaced by the second, "clipped"). A ``C``-channel network
gets the fixed "large" variance (beta_k, first entry beta~_1).

Model functions here take ``(x (B, C, H, W), timesteps (B,) long original indices)`` and return the
network output; :func:`denoiser_model_fn` builds one from a package denoiser that has
``output(x, t, y)`` (continuous t = (index + 1) / N, see :class:`~duodiff_fast.methods.DiTDenoiser`).

CUDA graphs (:class:`~duodiff_fast.runtime.graphs.GraphSampler`): inside
:func:`~duodiff_fast.samplers.constants.static_constants` the loop takes its device tables
(coefficients, ``timestep_map``) and per-step index vectors from the constant table recorded by the
warm-up run, so the captured loop makes no host-to-device copy; the step index vector carries its
host value, which follows to the model's timesteps and the denoiser's time (``host_time``), so
routed denoisers (DuoDiff, ASE, classifier-free guidance) choose their route on the host. Outside
that block the loop is unchanged (the tables are copied to the device once per diffusion object).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..schedules import DiscreteSchedule
from .constants import cached_time, device_constant, host_time

__all__ = ["space_timesteps", "ImprovedDiffusion", "denoiser_model_fn", "DEFAULT_RESPACING", "normal_kl",
           "discretized_gaussian_log_likelihood", "vb_terms_bpd"]

DEFAULT_RESPACING = "250"  # DiT's sample.py default (num_sampling_steps)

ModelFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> List[int]:
    """The original step indices kept by a respacing, ascending (DiT's / improved DDPM's rule).

    ``section_counts``: an int or "K" (K steps spread evenly over the whole axis, both ends kept),
    "a,b,c" (the axis cut into equal sections, a steps in the first, ...) or "ddimK" (the stride
    that gives exactly K steps starting at 0, the DDIM paper's spacing). Within a section of size S,
    n steps sit at round(j (S - 1) / (n - 1)) (one step: the section start).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}")
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        try:
            counts = [int(v) for v in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"respacing must be 'K', 'a,b,...' or 'ddimK', got {section_counts!r}") from None
    else:
        counts = [int(v) for v in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing needs positive step counts, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # Python's round: what the official rule uses
            cur += stride
        start += size
    return sorted(set(steps))


def _betas_for(alphas_cumprod: Tensor, kept: Iterable[int]) -> Tensor:
    """Betas of the respaced process: 1 - abar[i_k] / abar[i_{k-1}] (abar before the first = 1)."""
    out, last = [], 1.0
    for i in kept:
        ab = float(alphas_cumprod[i])
        out.append(1.0 - ab / last)
        last = ab
    return torch.tensor(out, dtype=torch.float64)


class ImprovedDiffusion:
    """A (respaced) improved-DDPM Gaussian diffusion: eps prediction, learned-range variance.

    Args:
        betas: the (N,) float64 betas of the full process (e.g. ``DiscreteSchedule.betas``).
        respacing: which steps to keep (see :func:`space_timesteps`); None keeps all N.
    """

    def __init__(self, betas: Tensor, respacing: Union[None, str, int, Sequence[int]] = DEFAULT_RESPACING):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1)")
        self.original_num_steps = int(betas.numel())
        base_ab = torch.cumprod(1.0 - betas, dim=0)
        kept = list(range(self.original_num_steps)) if respacing is None else \
            space_timesteps(self.original_num_steps, respacing)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)  # (K,) original index of each kept step
        b = _betas_for(base_ab, kept)
        self.betas = b
        self.num_timesteps = int(b.numel())
        ab = torch.cumprod(1.0 - b, dim=0)
        abp = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = ab, abp
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / ab)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / ab - 1.0)
        post_var = b * (1.0 - abp) / (1.0 - ab)
        self.posterior_variance = post_var
        # log(beta~) with its first entry (0) replaced by the second: the "clipped" log variance.
        self.posterior_log_variance_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]])) \
            if self.num_timesteps > 1 else torch.log(b.clone())
        self.log_betas = torch.log(b)
        self.fixed_large_log_variance = torch.log(torch.cat([post_var[1:2], b[1:]])) \
            if self.num_timesteps > 1 else torch.log(b.clone())
        self.posterior_mean_coef1 = b * torch.sqrt(abp) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - abp) * torch.sqrt(1.0 - b) / (1.0 - ab)

    @classmethod
    def from_schedule(cls, schedule: DiscreteSchedule, respacing=DEFAULT_RESPACING) -> "ImprovedDiffusion":
        """The diffusion of a discrete schedule's betas (DiT: the "linear" schedule)."""
        if not isinstance(schedule, DiscreteSchedule):
            raise TypeError(f"the improved-DDPM diffusion needs a discrete schedule (betas), got "
                            f"{type(schedule).__name__}")
        return cls(schedule.betas, respacing)

    # ------------------------------------------------------------------ pieces
    def _on(self, arr: Tensor, device: torch.device) -> Tensor:
        """``arr`` (a table of this diffusion, on the CPU) on ``device``: from the active constant
        table when one is (graph capture may not copy from the host), else copied once per device."""
        device = torch.device(device)
        if device.type == "cpu":
            return arr
        made = device_constant(tuple(arr.tolist()), device, arr.dtype) if _table_active() else None
        if made is not None:
            return made
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(arr), str(device))
        if key not in cache:
            cache[key] = arr.to(device)
        return cache[key]

    def _coef(self, arr: Tensor, k: Tensor, x: Tensor) -> Tensor:
        """arr[k] (float64) rounded to x's dtype, shaped (B, 1, ..., 1) to broadcast against x."""
        return self._on(arr, x.device)[k].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, k: Tensor) -> Tensor:
        """Original step indices the network is fed for respaced indices ``k`` (B,) long (a vector
        with the host value of the index's step when ``k`` has one, see the module docstring)."""
        host = host_time(k)
        if host is not None:
            return cached_time(float(self.timestep_map[int(host)]), k, torch.long)
        return self._on(self.timestep_map, k.device)[k]

    def p_mean_variance(self, model_fn: ModelFn, x: Tensor, k: Tensor, clip_denoised: bool = False) -> Dict[str, Tensor]:
        """Mean, log variance and predicted x_0 of p(x_{k-1} | x_k).

        Args:
            model_fn: ``model_fn(x, original_timesteps) -> (B, 2C or C, H, W)``.
            x: (B, C, H, W) sample at respaced step ``k``.
            k: (B,) long respaced indices.
            clip_denoised: clamp the predicted x_0 to [-1, 1] (DiT's latents: False), or a callable
                correcting it (:mod:`.denoised`: clipping or dynamic thresholding).
        Returns:
            {"mean", "log_variance", "pred_xstart", "model_output"} shaped like x (model_output as returned).
        """
        c = x.shape[1]
        out = model_fn(x, self.model_timesteps(k))
        if out.shape[1] == 2 * c:
            eps, v = out[:, :c], out[:, c:]
            min_log = self._coef(self.posterior_log_variance_clipped, k, x)
            max_log = self._coef(self.log_betas, k, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif out.shape[1] == c:
            eps = out
            log_variance = self._coef(self.fixed_large_log_variance, k, x).expand_as(x)
        else:
            raise ValueError(f"the model returned {out.shape[1]} channels for {c}-channel samples "
                             f"(expected {c}, or {2 * c} with a learned variance)")
        pred_xstart = self._coef(self.sqrt_recip_alphas_cumprod, k, x) * x \
            - self._coef(self.sqrt_recipm1_alphas_cumprod, k, x) * eps
        if callable(clip_denoised):
            pred_xstart = clip_denoised(pred_xstart)
        elif clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self._coef(self.posterior_mean_coef1, k, x) * pred_xstart + self._coef(self.posterior_mean_coef2, k, x) * x
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "model_output": out}

    def _loop(self, x_T: Tensor, step: Callable[[Tensor, Tensor, bool], Tensor],
              callback: Optional[StepCallback]) -> Tensor:
        x = x_T
        for s, k in enumerate(reversed(range(self.num_timesteps))):
            kk = cached_time(float(k), x, torch.long)  # with its host value inside static_constants
            if kk is None:
                kk = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
            x = step(x, kk, k > 0)
            if callback is not None:
                t = (self.timestep_map[k].double() + 1.0) / self.original_num_steps
                callback(s, torch.full((x.shape[0],), float(t), dtype=torch.float64), x)
        return x

    def p_sample_loop(self, model_fn: ModelFn, x_T: Tensor, noise_source=None, clip_denoised: bool = False,
                      callback: Optional[StepCallback] = None) -> Tensor:
        """Ancestral sampling from x_T (B, C, H, W) at the noisiest kept step; returns x_0.

        Step s of the loop (0 = noisiest) draws ``noise_source.step_noise(shape)`` (torch's RNG when
        None) except at the last step, which adds no noise.
        """
        from .ddpm import draw_noise

        def step(x, k, noisy):
            out = self.p_mean_variance(model_fn, x, k, clip_denoised)
            if not noisy:
                return out["mean"]
            return out["mean"] + torch.exp(0.5 * out["log_variance"]) * draw_noise(noise_source, x)

        return self._loop(x_T, step, callback)

    def ddim_sample_loop(self, model_fn: ModelFn, x_T: Tensor, eta: float = 0.0, noise_source=None,
                         clip_denoised: bool = False, callback: Optional[StepCallback] = None) -> Tensor:
        """DDIM over the same respaced steps (eps re-derived from the predicted x_0, as the official
        code); ``eta`` > 0 adds sigma_k noise (eta = 0 draws none). Returns x_0."""
        from .ddpm import draw_noise

        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")

        def step(x, k, noisy):
            out = self.p_mean_variance(model_fn, x, k, clip_denoised)
            eps = (self._coef(self.sqrt_recip_alphas_cumprod, k, x) * x - out["pred_xstart"]) \
                / self._coef(self.sqrt_recipm1_alphas_cumprod, k, x)
            ab = self._coef(self.alphas_cumprod, k, x)
            abp = self._coef(self.alphas_cumprod_prev, k, x)
            sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
            mean = out["pred_xstart"] * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma ** 2) * eps
            if noisy and eta > 0:
                return mean + sigma * draw_noise(noise_source, x)
            return mean

        return self._loop(x_T, step, callback)


def _table_active() -> bool:
    from .constants import _table

    return _table() is not None


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats, elementwise) of data x in [-1, 1] quantised to 256 bins under a Gaussian
    (the decoder term of the variational bound); the end bins take the whole tails."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(diffusion: "ImprovedDiffusion", model_output: Tensor, x_start: Tensor, x_t: Tensor,
                 k: Tensor) -> Tensor:
    """The variational-bound term L_{k} of each row, bits per dimension (B,): KL(q(x_{k-1}|x_k, x_0) ||
    p(x_{k-1}|x_k)) for k > 0, the discretised decoder NLL of x_0 at k = 0 (improved DDPM)."""
    c = diffusion._coef
    true_mean = c(diffusion.posterior_mean_coef1, k, x_t) * x_start + c(diffusion.posterior_mean_coef2, k, x_t) * x_t
    true_log_var = c(diffusion.posterior_log_variance_clipped, k, x_t)
    out = diffusion.p_mean_variance(lambda x, ts: model_output, x_t, k)
    dims = tuple(range(1, x_t.dim()))
    log2 = torch.log(torch.tensor(2.0, dtype=x_t.dtype))
    kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=dims) / log2
    nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"]).mean(dim=dims) / log2
    return torch.where(k == 0, nll, kl)


def denoiser_model_fn(denoiser, y: Optional[Tensor], num_original_steps: int) -> ModelFn:
    """``model_fn(x, timesteps)`` from a denoiser with ``output(x, t, y)`` on continuous time:
    original index i is fed as t = (i + 1) / N (the schedule turns it back into i)."""
    output = getattr(denoiser, "output", None)
    if output is None:
        raise TypeError(f"{type(denoiser).__name__} has no output(x, t, y) (the network's full output with the "
                        "learned variance); the improved-DDPM sampler needs one (a DiT denoiser)")

    def model_fn(x: Tensor, timesteps: Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        host = host_time(timesteps)
        if host is not None:  # the step is known on the host: so is t (routes decide there)
            return output(x, cached_time((host + 1.0) / num_original_steps, x, dtype), y)
        t = (timesteps.to(torch.float64) + 1.0) / num_original_steps
        return output(x, t.to(dtype), y)

    return model_fn
