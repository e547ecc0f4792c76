"""DPM-Solver++ (Lu et al. 2022b) as the official ``dpm_solver_pytorch.py`` runs it
(``algorithm_type="dpmsolver++"``): data prediction, singlestep (2S) and multistep (2M, 3M).

It reuses :class:`~duodiff_fast.samplers.dpm_solver.DPMSolver` (``predict_x0=True``) for the
exponential-integrator updates and differs from it where the official code does:

* Multistep order 3 (3M): the official code's second difference ``D2 = (D1_0 - D1_1) / (r0 + r1)``
  is h^2 times the second *divided* difference (m'' h^2 / 2), and it is multiplied by the same
  coefficient chi_2 that :meth:`DPMSolver._combine` applies to the full h^2 m''. So the 3M update
  here passes ``d2 = h^2 f[0, u1, u2]`` (half of what :meth:`DPMSolver.multistep_update` passes).
* Lower orders at the final steps (multistep): ``min(order, steps + 1 - step)`` is used only when
  ``steps < 10`` (the official rule; at 10 or more steps every step after the warm-up has full order).
* Singlestep time grid: for ``skip_type="logSNR"`` the K + 1 outer times are uniform in lambda; for
  the other skip types they are the points ``cumsum([0] + orders)`` of the ``steps``-point grid, and
  the intermediate points r1, r2 are the lambda fractions of that skip type's own grid between s and t
  (so ``time_uniform`` 2S evaluates at the time midpoint, not the lambda midpoint).
* Defaults: ``order=2``, ``method="multistep"``, ``skip_type="time_uniform"`` (the official
  ``sample`` defaults for DPM-Solver++).

Golden pin: ``dpmpp_reference.pt`` (the official code driving the golden latent U-ViT; see
``tests/samplers/test_dpm_solver_pp.py``).
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..schedules import NoiseSchedule
from .ddpm import Denoiser, check_solver_inputs
from .dpm_solver import DPMSolver, OuterCallback, fast_orders

__all__ = ["DPMSolverPP", "dpm_solver_pp_sample", "PP_METHODS", "LOWER_ORDER_FINAL_BELOW", "pp_outer_steps"]

PP_METHODS = ("multistep", "singlestep")
LOWER_ORDER_FINAL_BELOW = 10  # the official code lowers the final orders only for steps < 10


def pp_outer_steps(method: str, steps: int, order: int) -> int:
    """Number of outer steps (callbacks) of a DPM-Solver++ run of ``steps`` network evaluations."""
    if method == "multistep":
        return steps
    if method == "singlestep":
        return len(fast_orders(steps, order))
    raise ValueError(f"method must be one of {PP_METHODS}, got {method!r}")


class DPMSolverPP(DPMSolver):
    """DPM-Solver++ around a noise-predicting ``denoiser(x, t, y)`` (the data prediction
    x0 = (x - sigma eps) / alpha is formed inside, as the official model wrapper does).

    Args:
        denoiser: noise-predicting callable on continuous time t in (0, 1].
        schedule: the noise schedule.
        solver_type: ``"dpm_solver"`` (the official default ``'dpmsolver'``) or ``"taylor"``.
        fused: first-order updates as one native kernel (see :class:`DPMSolver`).
    """

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, solver_type: str = "dpm_solver",
                 fused: bool = False, x0_fn=None):
        super().__init__(denoiser, schedule, predict_x0=True, solver_type=solver_type, fused=fused, x0_fn=x0_fn)

    def multistep_update(
        self, x: Tensor, prev_t: Sequence[float], prev_m: Sequence[Tensor], t: float, order: int
    ) -> Tensor:
        """One multistep step from prev_t[-1] to t with the last ``order`` data predictions."""
        if order != 3:
            return super().multistep_update(x, prev_t, prev_m, t, order)
        s = prev_t[-1]
        lam_s = self._lam(s)
        h = self._lam(t) - lam_s
        h0 = lam_s - self._lam(prev_t[-2])
        h1 = self._lam(prev_t[-2]) - self._lam(prev_t[-3])
        r0, r1 = h0 / h, h1 / h
        d1_0 = (prev_m[-1] - prev_m[-2]) / r0
        d1_1 = (prev_m[-2] - prev_m[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)  # the official convention: h^2 m'' / 2 (module docstring)
        return self._combine(x, s, t, prev_m[-1], d1, d2)

    def singlestep_grid(self, steps: int, order: int, skip_type: str, t_start: float, t_end: float):
        """(orders, outer times) of a singlestep run, as the official code chooses them."""
        orders = fast_orders(steps, order)
        if skip_type == "logSNR":
            outer = self.time_steps(skip_type, t_start, t_end, len(orders))
        else:
            full = self.time_steps(skip_type, t_start, t_end, steps)
            outer = [full[k] for k in itertools.accumulate([0] + orders)]
        return orders, outer

    def _inner_ratios(self, skip_type: str, s: float, t: float, order: int):
        """Lambda fractions (r1, r2) of the ``order``-point grid of ``skip_type`` between s and t."""
        if order == 1:
            return None, None
        inner = self.time_steps(skip_type, s, t, order)
        lam = [self._lam(v) for v in inner]
        h = lam[-1] - lam[0]
        r1 = (lam[1] - lam[0]) / h
        r2 = (lam[2] - lam[0]) / h if order == 3 else None
        return r1, r2

    def sample(
        self,
        x: Tensor,
        steps: int = 20,
        y: Optional[Tensor] = None,
        t_start: float = 1.0,
        t_end: Optional[float] = None,
        order: int = 2,
        skip_type: str = "time_uniform",
        method: str = "multistep",
        lower_order_final: bool = True,
        denoise_to_zero: bool = False,
        callback: Optional[OuterCallback] = None,
    ) -> Tensor:
        """Integrate from ``x`` (B, ...) at ``t_start`` down to ``t_end`` (default schedule.t_min).

        Args:
            steps: network evaluations (NFE), not counting ``denoise_to_zero``.
            order: 1, 2 or 3. method: ``"multistep"`` (2M/3M) or ``"singlestep"`` (2S/3S; the
                orders of :func:`fast_orders`, e.g. [2]*(steps//2) + [1] for odd steps at order 2).
            skip_type: ``"time_uniform"`` (default), ``"logSNR"`` or ``"time_quadratic"``.
            lower_order_final: multistep: lower orders at the last steps when ``steps < 10``.
            denoise_to_zero: one extra evaluation at t_end returning its data prediction.
            callback: ``callback(step, t, x)`` after each outer step.
        Returns:
            x at t_end, same shape and dtype as ``x``.
        """
        t_start, t_end = self._check_sample_args(x, y, steps, order, method, PP_METHODS, skip_type, t_start, t_end)
        if method == "multistep":
            x = self._sample_multistep(
                x, steps, y, t_start, t_end, order, skip_type, lower_order_final and steps < LOWER_ORDER_FINAL_BELOW,
                callback,
            )
        else:
            orders, outer = self.singlestep_grid(steps, order, skip_type, t_start, t_end)
            for i, o in enumerate(orders):
                s, t = outer[i], outer[i + 1]
                r1, r2 = self._inner_ratios(skip_type, s, t, o)
                x = self.singlestep_update(x, s, t, o, y, r1=r1, r2=r2)
                if callback is not None:
                    callback(i, torch.full((x.shape[0],), s, dtype=torch.float64), x)
        if denoise_to_zero:
            x = self.model_fn(x, t_end, y)
        return x


def dpm_solver_pp_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    y: Optional[Tensor] = None,
    noise_source=None,
    num_steps: int = 20,
    order: int = 2,
    method: str = "multistep",
    skip_type: str = "time_uniform",
    t_end: Optional[float] = None,
    lower_order_final: bool = True,
    callback: Optional[OuterCallback] = None,
) -> Tensor:
    """Functional form of :class:`DPMSolverPP` (deterministic: ``noise_source`` is unused)."""
    check_solver_inputs(x_T, y, noise_source)
    return DPMSolverPP(denoiser, schedule).sample(
        x_T, steps=num_steps, y=y, t_end=t_end, order=order, skip_type=skip_type, method=method,
        lower_order_final=lower_order_final, callback=callback,
    )
