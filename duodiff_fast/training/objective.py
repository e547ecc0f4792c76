"""Training objectives.

An objective is any callable ``loss, metrics = objective(model, x0, y, generator)``:
    model      the (possibly DDP-wrapped) network; call it as ``model(x_t, timesteps, y)`` so
               DistributedDataParallel sees the forward.
    x0         (B, C, H, W) float clean data on the training device.
    y          (B,) int64 class ids, or None for unconditional models. Under the Trainer these are
               the labels the network must see: the Trainer has already replaced each by the null
               class at rate ``TrainConfig.p_uncond`` (classifier-free guidance), the same way for
               every objective, so an objective passes them on unchanged.
    generator  a torch.Generator on x0's device; every random draw must use it (that is what
               makes resumed runs bit-identical).
It returns a scalar loss to backpropagate and a dict of scalar metrics (tensors or floats) to log.
An objective may also define ``on_step(step, seed)``: the Trainer calls it before every update
with the global step and the run's seed, for draws every rank must agree on (the multistage
objective's stage); such draws must depend on (seed, step) only, so a resumed run repeats them.
AdaDiff, multistage and block-dropping fine-tuning supply their own objective to the same Trainer.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``p_uncond`` (classifier-free guidance).

    Args:
        y: (B,) int64 class ids.
        p_uncond: drop probability in [0, 1].
        null_class: the id of the unconditional class (the model's ``num_classes - 1``).
    Returns:
        (B,) int64, a new tensor.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    if p_uncond == 0.0:
        return y.clone()
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


class DiffusionObjective:
    """Noise-prediction loss L_simple = mean ||eps_theta(x_t, t, y) - eps||^2.

    t is drawn by ``schedule.sample_training_t``, x_t by ``schedule.add_noise`` and the network is
    fed ``schedule.model_input(t)``.

    Args:
        schedule: a noise schedule from ``duodiff_fast.schedules``.
        num_classes: None (default): the labels are passed to the network as they come (under the
            Trainer: already label-dropped, None for unconditional models). For use outside the
            Trainer: the model's label count including the null class (<= 0: unconditional).
        p_uncond: None (default): no label dropout here (the Trainer applies ``TrainConfig.p_uncond``).
            Outside the Trainer, with ``num_classes`` > 0: drop labels to the null class at this rate.
            The Trainer refuses an objective that drops labels itself (they would be dropped twice).
    """

    def __init__(self, schedule, num_classes: Optional[int] = None, p_uncond: Optional[float] = None):
        if p_uncond is not None and not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
        self.schedule = schedule
        self.num_classes = None if num_classes is None else int(num_classes)
        self.p_uncond = None if p_uncond is None else float(p_uncond)

    def sample(self, x0: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, ...]:
        """Draw (t (B,), noise like x0, x_t like x0) for a batch of clean data."""
        b = x0.shape[0]
        t = self.schedule.sample_training_t(b, x0.device, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = self.schedule.add_noise(x0.float(), noise, t).to(torch.float32)
        return t, noise, x_t

    def training_labels(self, y: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """The labels the network sees in training: ``y`` as it came (``num_classes`` None: the
        Trainer prepared it), else (B,) int64 with the null class at rate ``p_uncond`` or None for
        an unconditional model (a conditional one without labels is an error)."""
        if self.num_classes is None:
            return y
        if self.num_classes <= 0:
            return None
        if y is None:
            raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}) but no labels came")
        if self.p_uncond is None:
            return y
        return drop_labels(y, self.p_uncond, self.num_classes - 1, generator)

    def network_timesteps(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B,) float32 time input the network is fed for times ``t`` (``schedule.model_input``)."""
        return self.schedule.model_input(t).to(device=device, dtype=torch.float32)

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: Optional[torch.Tensor],
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        t, noise, x_t = self.sample(x0, generator)
        y = self.training_labels(y, generator)
        eps = model(x_t, self.network_timesteps(t, x0.device), y)  # (B, C, H, W)
        loss = (eps.float() - noise).pow(2).mean()
        return loss, {"loss": loss.detach()}


class HybridObjective(DiffusionObjective):
    """Improved DDPM's hybrid loss for networks that learn their variance (DiT with ``learn_sigma``):
    L_simple on the eps channels plus the variational bound L_vlb (bits per dimension) on the
    variance channels, with eps stopped in L_vlb so that it trains the variance only (DiT's
    ``training_losses`` with its default MSE loss type: loss = mse + vb).

    Args:
        schedule: the discrete schedule the network is trained on (DiT: "linear", 1000 steps).
        num_classes, p_uncond: as :class:`DiffusionObjective`.
    """

    def __init__(self, schedule, num_classes: Optional[int] = None, p_uncond: Optional[float] = None):
        super().__init__(schedule, num_classes, p_uncond)
        from ..samplers.improved_ddpm import ImprovedDiffusion

        self.diffusion = ImprovedDiffusion.from_schedule(schedule, None)  # every training step, no respacing

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: Optional[torch.Tensor],
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        from ..samplers.improved_ddpm import vb_terms_bpd

        t, noise, x_t = self.sample(x0, generator)
        y = self.training_labels(y, generator)
        out = model(x_t, self.network_timesteps(t, x0.device), y).float()  # (B, 2C, H, W)
        c = x0.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"the hybrid loss needs eps and the variance value (2 x {c} channels), got {out.shape[1]}")
        mse = (out[:, :c] - noise).pow(2).mean()
        k = torch.round(t.to(torch.float64) * self.diffusion.num_timesteps - 1.0).long().to(x0.device)
        frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
        vb = vb_terms_bpd(self.diffusion, frozen, x0.float(), x_t, k).mean()
        loss = mse + vb
        return loss, {"loss": loss.detach(), "mse": mse.detach(), "vb": vb.detach()}
