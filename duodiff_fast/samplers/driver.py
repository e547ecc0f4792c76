"""The sampling entry points: :func:`sample` (one batch) and :func:`generate` (many samples).

Both draw every sample's starting noise (and step noise) from its own seeded generator
(:class:`~duodiff_fast.samplers.noise.NoiseSource`); :func:`generate` seeds sample k of a run with
``mix_seed(base_seed, k)``, so a run's images do not depend on ``batch_size``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ..validation import inputs_validated
from ..schedules import NoiseSchedule
from .ddim import DDIMSampler
from .ddpm import DDPMSampler, alpha_bar_grid, check_num_steps
from .denoised import denoised_correction
from .dpm_solver import DPMSolver, fast_orders
from .dpm_solver_pp import DPMSolverPP, pp_outer_steps
from .noise import NoiseSource, seeds_for

__all__ = ["SOLVERS", "DEFAULT_NUM_STEPS", "sample", "generate"]

SOLVERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++")
DEFAULT_NUM_STEPS = {"ddpm": None, "ddim": 50, "dpm_solver": 20, "dpm_solver++": 20}  # None: the full grid
# (order, method, skip_type) when not given: the official U-ViT DPM-Solver-fast, and the official
# DPM-Solver++ sample() defaults (2M, time-uniform steps).
DPM_DEFAULTS = {"dpm_solver": (3, "fast", "logSNR"), "dpm_solver++": (2, "multistep", "time_uniform")}


def _check_shape(shape) -> tuple:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 2:
        raise ValueError(f"shape must be a tuple (B, C, H, W) (at least 2 dims), got {shape!r}")
    for k, s in enumerate(shape):
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"shape[{k}] must be a positive int, got {s!r} in shape {tuple(shape)}")
    return tuple(shape)


def _check_labels(y, batch: int, name: str = "y") -> None:
    if y is None:
        return
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class ids or None, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class ids, got dtype {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} must hold non-negative class ids, got min {int(y.min())}")


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")


def _build(
    solver: str,
    denoiser,
    schedule: NoiseSchedule,
    num_steps,
    eta: float,
    order: Optional[int],
    variance: str,
    spacing: Optional[str],
    method: Optional[str],
    skip_type: Optional[str],
    predict_x0: bool,
    t_end: Optional[float],
    fused: bool = False,
    x0_fn=None,
):
    """Return (run(x_T, y, noise_source, callback) -> x_0, number of progress steps).

    ``x0_fn``: correction of the denoised estimate at each step (see :mod:`.denoised`), or None.
    """
    if solver in ("ddpm", "ddim") and getattr(denoiser, "uses_improved_ddpm", False):
        return _build_improved(solver, denoiser, schedule, num_steps, eta, variance, spacing, fused, x0_fn)
    if num_steps is None:
        num_steps = DEFAULT_NUM_STEPS[solver]
    if solver == "ddpm":
        grid = alpha_bar_grid(schedule)[0].numel()
        num_steps = grid if num_steps is None else check_num_steps(num_steps, grid)
        s = DDPMSampler(schedule, num_steps, variance, spacing or "linspace", fused=fused, x0_fn=x0_fn)
        return (lambda x, y, ns, cb: s.sample(denoiser, x, y, ns, cb)), num_steps
    if solver == "ddim":
        grid = alpha_bar_grid(schedule)[0].numel()
        check_num_steps(num_steps, grid)
        s = DDIMSampler(schedule, num_steps, eta, spacing or "uniform", fused=fused, x0_fn=x0_fn)
        return (lambda x, y, ns, cb: s.sample(denoiser, x, y, ns, cb)), num_steps
    # dpm_solver, dpm_solver++
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int for {solver}, got {num_steps!r}")
    if t_end is not None:
        schedule.check_t(torch.tensor(float(t_end), dtype=torch.float64), "t_end")
    d_order, d_method, d_skip = DPM_DEFAULTS[solver]
    order = d_order if order is None else order
    method = d_method if method is None else method
    skip_type = d_skip if skip_type is None else skip_type
    if solver == "dpm_solver++":
        if predict_x0 is not None and not predict_x0:
            raise ValueError("dpm_solver++ always predicts x0; predict_x0=False is DPM-Solver (solver='dpm_solver')")
        pp = DPMSolverPP(denoiser, schedule, fused=fused, x0_fn=x0_fn)
        n_outer = pp_outer_steps(method, num_steps, order)  # also rejects methods DPM-Solver++ lacks

        def run_pp(x, y, ns, cb):
            return pp.sample(x, steps=num_steps, y=y, t_end=t_end, order=order, skip_type=skip_type, method=method,
                             callback=cb)

        return run_pp, n_outer
    solver_obj = DPMSolver(denoiser, schedule, predict_x0=bool(predict_x0), fused=fused, x0_fn=x0_fn)
    if method == "multistep":
        n_outer = num_steps
    elif method == "singlestep_fixed":
        n_outer = num_steps // order
    else:
        n_outer = len(fast_orders(num_steps, 3 if method == "fast" else order))

    def run(x, y, ns, cb):
        return solver_obj.sample(
            x, steps=num_steps, y=y, t_end=t_end, order=order, skip_type=skip_type, method=method, callback=cb
        )

    return run, n_outer


def _build_improved(solver: str, denoiser, schedule: NoiseSchedule, num_steps, eta: float, variance: str,
                    spacing: Optional[str], fused: bool, x0_fn=None):
    """DDPM/DDIM of a DiT: the improved-DDPM diffusion respaced to ``num_steps`` (DiT's
    ``space_timesteps``; ddpm default 250, ddim 50) with the learned variance. ``x0_fn`` corrects
    the predicted x_0 at each step (clipping or dynamic thresholding), as ADM's ``clip_denoised``."""
    from .improved_ddpm import DEFAULT_RESPACING, ImprovedDiffusion, denoiser_model_fn

    if variance != "beta":
        raise ValueError(f"variance={variance!r}: a DiT's DDPM samples with its learned variance")
    if spacing is not None:
        raise ValueError(f"spacing={spacing!r}: a DiT's DDPM/DDIM respace with DiT's space_timesteps")
    if fused:
        raise ValueError("the fused update is not available for DiT's improved-DDPM sampler")
    if num_steps is None:
        num_steps = int(DEFAULT_RESPACING) if solver == "ddpm" else 50
    grid = alpha_bar_grid(schedule)[0].numel()
    check_num_steps(num_steps, grid)
    diffusion = ImprovedDiffusion.from_schedule(schedule, str(num_steps))

    def run(x, y, ns, cb):
        model_fn = denoiser_model_fn(denoiser, y, diffusion.original_num_steps)
        if solver == "ddpm":
            return diffusion.p_sample_loop(model_fn, x, ns, clip_denoised=x0_fn or False, callback=cb)
        return diffusion.ddim_sample_loop(model_fn, x, eta, ns, clip_denoised=x0_fn or False, callback=cb)

    return run, diffusion.num_timesteps


def sample(
    denoiser: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor],
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    solver: str = "ddim",
    num_steps: Optional[int] = None,
    y: Optional[Tensor] = None,
    seeds=None,
    base_seed: int = 0,
    eta: float = 0.0,
    order: Optional[int] = None,
    variance: str = "beta",
    spacing: Optional[str] = None,
    method: Optional[str] = None,
    skip_type: Optional[str] = None,
    predict_x0: Optional[bool] = None,
    t_end: Optional[float] = None,
    x_T: Optional[Tensor] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    callback: Optional[Callable[[int, Tensor, Tensor], None]] = None,
    noise: str = "torch",
    fused: bool = False,
    clip_denoised: bool = False,
    thresholding: bool = False,
    thresholding_ratio: float = 0.995,
    thresholding_max_value: float = 1.0,
) -> Tensor:
    """Draw one batch of samples.

    Args:
        denoiser: ``eps = denoiser(x, t, y)`` on continuous time t in (0, 1] (e.g. a
            ``ModelDenoiser`` or a ``ClassifierFreeGuidance`` around one).
        schedule: the noise schedule the denoiser was trained with.
        shape: (B, C, H, W) of the batch.
        solver: ``"ddpm"``, ``"ddim"``, ``"dpm_solver"`` or ``"dpm_solver++"`` (data prediction,
            as the official DPM-Solver++ code: :class:`~duodiff_fast.samplers.dpm_solver_pp.DPMSolverPP`).
        num_steps: solver steps (network evaluations for DDPM/DDIM, NFE for DPM-Solver); default
            ddpm: the full grid (1000), ddim: 50, dpm_solver and dpm_solver++: 20. A DiT denoiser
            (``uses_improved_ddpm``) runs DDPM/DDIM as DiT does: the improved-DDPM diffusion
            respaced to ``num_steps`` (ddpm default 250) with its learned variance.
        y: (B,) integer class ids or None.
        seeds: per-sample seeds (B ints or a (B,) integer tensor); default
            ``seeds_for(base_seed, 0, B)``.
        eta: DDIM stochasticity. variance: DDPM ``"beta"`` / ``"beta_tilde"``.
        spacing: DDPM/DDIM step spacing (default ddpm "linspace", ddim "uniform").
        order, method, skip_type, predict_x0, t_end: DPM-Solver options; None takes the solver's
            default (dpm_solver: order 3, "fast", "logSNR", noise prediction -- the official U-ViT
            DPM-Solver-fast; dpm_solver++: order 2, "multistep", "time_uniform"); t_end defaults to
            ``schedule.t_min``.
        x_T: optional starting noise (B, ...); when given, only step noise comes from the seeds.
        device, dtype: where and in which float dtype the sample is computed.
        progress: show a tqdm bar over the solver steps.
        callback: ``callback(step, t, x)`` after each solver step.
        noise: ``"torch"`` (per-sample CPU generators, :class:`NoiseSource`) or ``"philox"``
            (counter-based, drawn on ``device``: :class:`~duodiff_fast.samplers.philox.PhiloxNoise`;
            what the CUDA-graph sampler uses).
        fused: fuse each DDPM/DDIM/first-order DPM-Solver update into one op (native with ``_C``).
        clip_denoised: clip every step's denoised estimate x0 to [-1, 1] (ADM's ``clip_denoised``,
            diffusers' ``clip_sample``); default off, as the papers' samplers.
        thresholding: dynamic thresholding of x0 instead (Imagen / DPM-Solver): per sample s = the
            ``thresholding_ratio`` quantile of |x0|, at least ``thresholding_max_value``; x0 is
            clamped to [-s, s] and divided by s. See :mod:`duodiff_fast.samplers.denoised`.
    Returns:
        x_0 of ``shape`` on ``device`` in ``dtype``.
    """
    _check_solver(solver)
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    shape = _check_shape(shape)
    B = shape[0]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    from ..devices import normalize_device

    device = normalize_device(device)  # "cuda" -> "cuda:<current>": tensors' devices compare equal
    _check_labels(y, B)
    if y is not None:
        y = y.to(device=device, dtype=torch.long)
    if seeds is None:
        seeds = seeds_for(base_seed, 0, B)
    if noise not in ("torch", "philox"):
        raise ValueError(f"noise must be 'torch' or 'philox', got {noise!r}")
    if noise == "philox":
        from .philox import PhiloxNoise

        noise_source = PhiloxNoise(seeds, device=device, dtype=dtype)
    else:
        noise_source = NoiseSource(seeds, device=device, dtype=dtype)
    if len(noise_source) != B:
        raise ValueError(f"seeds must hold one seed per sample ({B}), got {len(noise_source)}")
    x0_fn = denoised_correction(clip_denoised, thresholding, thresholding_ratio, thresholding_max_value)
    run, n_steps = _build(
        solver, denoiser, schedule, num_steps, eta, order, variance, spacing, method, skip_type, predict_x0, t_end,
        fused, x0_fn,
    )
    if x_T is None:
        x_T = noise_source.initial(shape)
    else:
        if not isinstance(x_T, Tensor) or tuple(x_T.shape) != shape:
            got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
            raise ValueError(f"x_T must be a tensor of shape {shape}, got {got}")
        x_T = x_T.to(device=device, dtype=dtype)

    bar = tqdm(total=n_steps, desc=f"{solver}", unit="step", disable=not progress, leave=False)

    def step_cb(i, t, x):
        bar.update(1)
        if callback is not None:
            callback(i, t, x)

    # Validate the denoiser's inputs once (image shape, labels, time range); the loop then skips
    # the value checks that would synchronise with the device at every step.
    check = getattr(denoiser, "check", None)
    if check is not None:
        check(x_T, torch.full((B,), schedule.t_max, dtype=torch.float64, device=device), y)
    try:
        with torch.no_grad(), inputs_validated():
            return run(x_T, y, noise_source, step_cb)
    finally:
        bar.close()


def generate(
    denoiser,
    schedule: NoiseSchedule,
    sample_shape: Sequence[int],
    n_samples: int,
    *,
    batch_size: int = 64,
    y: Optional[Tensor] = None,
    base_seed: int = 0,
    start_index: int = 0,
    postprocess: Optional[Callable[[Tensor], Tensor]] = None,
    progress: bool = True,
    **sample_kwargs,
) -> Tensor:
    """Draw ``n_samples`` samples in batches; sample k is seeded by its global index start_index + k.

    Args:
        sample_shape: (C, H, W) of one sample (same position as ``shape`` in :func:`sample`).
        n_samples: number of samples.
        batch_size: samples per solver call (results do not depend on it).
        y: (n_samples,) integer class ids or None.
        base_seed, start_index: seeds are ``seeds_for(base_seed, start_index + k0, batch)``.
        postprocess: applied to each finished batch on its device (e.g. autoencoder decoding).
        progress: a tqdm bar over samples.
        sample_kwargs: passed to :func:`sample` (solver, num_steps, eta, device, dtype, ...).
    Returns:
        (n_samples, ...) tensor on the CPU.
    """
    if not isinstance(sample_shape, (tuple, list, torch.Size)):
        raise TypeError(
            f"sample_shape must be a tuple (C, H, W), got {type(sample_shape).__name__} "
            "(the order is generate(denoiser, schedule, sample_shape, n_samples, ...))"
        )
    sample_shape = _check_shape((1, *tuple(sample_shape)))[1:]
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative int, got {start_index!r}")
    _check_labels(y, n_samples)
    for key in ("seeds", "x_T", "shape", "y"):
        if key in sample_kwargs:
            raise TypeError(f"generate() does not take {key!r}; seeds come from base_seed and sample indices")
    _check_solver(sample_kwargs.get("solver", "ddim"))
    outputs = []
    with tqdm(total=n_samples, desc="generate", unit="img", disable=not progress) as bar:
        for k0 in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - k0)
            x = sample(
                denoiser,
                schedule,
                (b, *sample_shape),
                y=None if y is None else y[k0 : k0 + b],
                seeds=seeds_for(base_seed, start_index + k0, b),
                progress=False,
                **sample_kwargs,
            )
            if postprocess is not None:
                with torch.no_grad():
                    x = postprocess(x)
            outputs.append(x.cpu())
            bar.update(b)
    return torch.cat(outputs)
