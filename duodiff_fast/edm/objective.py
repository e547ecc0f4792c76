"""EDM's loss as an objective of the package's trainer (``Trainer(cfg, model=net, loss_fn=...)``).

``EDMObjective(loss)``: ``(net, x0, y, generator) -> (loss, metrics)`` with the per-element EDM loss
averaged over the batch and pixels (EDM sums over pixels and averages over images: a constant
factor, absorbed by Adam's scale invariance up to epsilon; the package's learning rates assume the mean).

With an :class:`~duodiff_fast.edm.loss.EDMMultistageLoss` the batch's stage is chosen as the
authors' ``EDMMultistageLoss`` chooses it (one log-normal draw; a stage with probability equal to its
log-normal mass), but from a generator seeded by (seed, step) -- told by the trainer through
:meth:`on_step` -- so every DDP rank trains the same decoder in a step and an exact resume replays
the same stages. Each image's sigma is then drawn inside that stage from the per-rank generator.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..seeding import StepSeeded
from .loss import EDMLoss, EDMMultistageLoss

__all__ = ["EDMObjective"]


class EDMObjective(StepSeeded):
    """Trainer objective for EDM-preconditioned nets (single-stage or multistage)."""

    STEP_STREAM = 0xED57A6E  # keeps the stage stream apart from the trainer's other (seed, step) streams

    def __init__(self, loss: Optional[EDMLoss] = None, seed: int = 0):
        self.loss = loss if loss is not None else EDMLoss()
        self.seed, self.step = int(seed), 0

    def stage_for_step(self, step: int) -> int:
        """The stage trained at ``step`` (multistage loss only): the same on every rank."""
        return self.loss.pick_stage(self.step_generator(step))

    def __call__(self, net, x0: torch.Tensor, y: Optional[torch.Tensor], generator=None):
        metrics = {}
        sigma = None
        if isinstance(self.loss, EDMMultistageLoss):
            stage = self.stage_for_step(self.step)
            sigma = self.loss.sample_sigma_in_stage(stage, x0.shape[0], generator)
            metrics["stage"] = torch.tensor(float(stage))
        self.step += 1
        loss = self.loss(net, x0, y, generator, sigma=sigma).mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
