"""DuoDiff: a shallow backbone for the noisiest steps, the full backbone for the rest.

Routing is defined, as in the DuoDiff paper, on the 1000-step axis of the discrete DDPM process.
The schedule maps continuous time t to a *step position* p = ``schedule.step_position(t)`` in
(0, T], T = 1000: for the discrete DDPM schedule the step with index i (t = (i + 1) / 1000) has
p = i + 1; for continuous schedules p = t * 1000. The reverse process visits positions from
T downwards, so "the first t_s steps of the reverse process" are the positions

    T - t_s < p <= T        ->  shallow backbone
    0 < p <= T - t_s        ->  full backbone

Concretely, with 1000-step DDPM and t_s = 300, step indices i = 999 ... 700 (300 steps) run the
shallow model and i = 699 ... 0 (700 steps) the full one. A solver with fewer steps (DDIM-50,
DPM-Solver) uses the shallow model for every evaluation whose timestep lies in that noisiest range:
DDIM-50 on indices 980, 960, ..., 0 with t_s = 300 runs the shallow model at i >= 700, i.e. 15 of
its 50 steps. t_s = 0 is the base (full) model everywhere; t_s = T is the shallow model everywhere.

Rows of one batch may sit at different timesteps: they are split between the two backbones and the
results written back in place, so the denoiser is exact for any t. Inside the sampling runtime the
step's time is known on the host (:func:`~duodiff_fast.samplers.constants.host_time`): then the
backbone is chosen without reading the device (no synchronisation), so a CUDA graph can capture
the call, also under classifier-free guidance.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ops.compaction import split_rows, take_rows
from ..samplers.constants import host_time
from .denoiser import ModelDenoiser


def _same_interface(shallow: torch.nn.Module, full: torch.nn.Module) -> None:
    for attr in ("in_chans", "img_size", "patch_size", "num_classes"):
        a, b = getattr(shallow, attr, None), getattr(full, attr, None)
        if a != b:
            raise ValueError(
                f"shallow and full backbones must agree on {attr}: shallow has {a}, full has {b}"
            )


class DuoDiff(ModelDenoiser):
    """Dual-backbone denoiser.

    Args:
        shallow: the shallow backbone (the paper's three-layer U-ViT, config ``<name>-shallow``).
        full: the full backbone.
        schedule: the noise schedule both were trained with.
        t_s: number of steps (on the 1000-step axis) served by the shallow model, in [0, T].
    """

    def __init__(self, shallow: torch.nn.Module, full: torch.nn.Module, schedule, t_s: int):
        super().__init__(full, schedule)
        _same_interface(shallow, full)
        horizon = int(getattr(schedule, "T", 1000))
        if isinstance(t_s, bool) or not isinstance(t_s, (int,)) and not (isinstance(t_s, float) and t_s.is_integer()):
            raise TypeError(f"t_s must be an integer number of steps, got {t_s!r}")
        t_s = int(t_s)
        if not 0 <= t_s <= horizon:
            raise ValueError(f"t_s must lie in [0, {horizon}] (steps on the {horizon}-step axis), got {t_s}")
        self.shallow = shallow
        self.full = full
        self.t_s = t_s
        self.horizon = horizon

    def uses_shallow(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which rows at continuous times t run the shallow backbone."""
        position = self.schedule.step_position(t)
        return position > (self.horizon - self.t_s)

    def routing(self, ts: Sequence[float]) -> list:
        """For a solver's list of evaluation times, the backbone name used at each one."""
        t = torch.as_tensor(list(ts), dtype=torch.float64)
        return ["shallow" if s else "full" for s in self.uses_shallow(t).tolist()]

    def host_route(self, t: torch.Tensor) -> Optional[str]:
        """"shallow" or "full" when every row is at the step whose time the host knows, else None."""
        if self.t_s == 0:
            return "full"
        host = host_time(t)
        if host is None:
            return None
        probe = torch.tensor([host], dtype=torch.float64).to(t.dtype)  # the device value's rounding
        return "shallow" if bool(self.uses_shallow(probe)[0]) else "full"

    def output(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output at times t (eps; with DiT's learned variance 2C channels)."""
        self.check(x, t, y)
        route = self.host_route(t)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if route is not None:
            return self._run(getattr(self, route), x, t, y)

        def run(shallow, rows):
            model = self.shallow if shallow else self.full
            return self._run(model, take_rows(x, rows), take_rows(t, rows), take_rows(y, rows))

        return split_rows(self.uses_shallow(t).to(x.device), (True, False), run)
