"""Multistage training: each batch drawn from one stage of the time axis.

Kept apart from :mod:`duodiff_fast.methods.multistage` so that sampling with multistage never
imports the training package.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..seeding import StepSeeded
from ..training.objective import DiffusionObjective
from .multistage import check_boundaries


class MultistageObjective(StepSeeded, DiffusionObjective):
    """L_simple with each batch drawn from one stage.

    Per batch: a stage i uniformly from the n stages, then t uniformly inside (t_i, t_{i+1}] (the
    routing's intervals; discrete schedules: uniformly over the grid times in it; continuous:
    U(max(t_i, t_min), t_{i+1}]),
    so the update touches the shared part and stage i's decoder only. ``metrics["stage"]`` records i.

    The stage is a function of (seed, step) only (:meth:`stage_for_step`), not of the per-rank
    generator: under DistributedDataParallel every rank trains the same stage in a step, so one
    optimizer update is one stage's, and an exact resume replays the same stage sequence. The
    Trainer announces each step through :meth:`on_step`; without it the objective counts its own
    calls from 0. t, noise and label drops still come from the per-rank generator. Under DDP set
    ``find_unused_parameters=True`` (the other decoders get no grad).
    """

    # Keeps the stage stream apart from other (seed, step) streams (data order, ...).
    STEP_STREAM = 0x57A6E

    def __init__(self, schedule, boundaries: Sequence[float], num_classes: Optional[int] = None,
                 p_uncond: Optional[float] = None,
                 seed: int = 0):
        super().__init__(schedule, num_classes, p_uncond)
        self.boundaries = check_boundaries(boundaries)
        edges = (0.0,) + self.boundaries + (1.0,)
        self.intervals = list(zip(edges[:-1], edges[1:]))
        self.seed = int(seed)
        self.step = 0
        grid = self._grid()
        if grid is not None:
            for i, (a, b) in enumerate(self.intervals):
                if not self._grid_mask(grid, i).any():
                    raise ValueError(f"stage {i} ({a}, {b}] holds no time of the {grid.numel()}-step schedule")

    def stage_for_step(self, step: int) -> int:
        """The stage trained at ``step``: uniform over the stages, the same on every rank."""
        return int(torch.randint(0, len(self.intervals), (1,), generator=self.step_generator(step)))

    def _grid(self) -> Optional[torch.Tensor]:
        n = getattr(self.schedule, "num_timesteps", None)
        return None if n is None else self.schedule.discrete_grid(int(n))

    def _grid_mask(self, grid: torch.Tensor, i: int) -> torch.Tensor:
        a, b = self.intervals[i]
        return ((grid >= a) if i == 0 else (grid > a)) & (grid <= b)

    def sample_stage_t(self, batch: int, device, generator, stage: Optional[int] = None) -> tuple:
        """(stage i, t (batch,) float32 inside stage i); ``stage`` defaults to the current step's."""
        gdev = generator.device if generator is not None else device
        i = self.stage_for_step(self.step) if stage is None else int(stage)
        if not 0 <= i < len(self.intervals):
            raise ValueError(f"stage must lie in [0, {len(self.intervals) - 1}], got {i}")
        grid = self._grid()
        if grid is not None:
            pts = grid[self._grid_mask(grid, i)]
            j = torch.randint(0, pts.numel(), (batch,), generator=generator, device=gdev).cpu()
            t = pts[j]
        else:
            a, b = self.intervals[i]
            a = max(a, float(getattr(self.schedule, "t_min", 0.0)))
            u = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64).cpu()
            t = b - (b - a) * u  # u in [0, 1): t in (a, b]
        return i, t.to(device=device, dtype=torch.float32)

    def __call__(self, model, x0, y, generator=None):
        stage, t = self.sample_stage_t(x0.shape[0], x0.device, generator)
        self.step += 1
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = self.schedule.add_noise(x0.float(), noise, t).to(torch.float32)
        y = self.training_labels(y, generator)
        eps = model(x_t, self.network_timesteps(t, x0.device), y, stage=stage)
        loss = (eps.float() - noise).pow(2).mean()
        return loss, {"loss": loss.detach(), "stage": torch.tensor(float(stage))}
