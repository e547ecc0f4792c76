"""ASE fine-tuning: the truncated-forward objective and the trainer settings for a dropping schedule.

Kept apart from :mod:`duodiff_fast.methods.ase` so that sampling with ASE never imports the
training package (the dependency runs training -> methods only here).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.uvit import UViT
from ..training.objective import DiffusionObjective
from .ase import ASEUViT, get_dropping_schedule


class ASEObjective(DiffusionObjective):
    """L_simple through the truncated forward: each row runs the blocks its own t keeps.

    ``model`` must accept ``keep=`` (an :class:`ASEUViT`, possibly DDP-wrapped). The paper's
    re-weighting lambda(t) (its Algorithm 1) is optional: ``time_weight(t) -> (B,)`` multiplies each
    row's loss (default 1, which is what the paper switches to after its re-weighting cycle).
    """

    def __init__(self, schedule, dropping, num_classes: int = 0, p_uncond: float = 0.1, time_weight=None):
        super().__init__(schedule, num_classes, p_uncond)
        self.dropping = get_dropping_schedule(dropping)
        self.time_weight = time_weight

    def __call__(self, model, x0, y, generator=None):
        inner = getattr(model, "module", model)
        if hasattr(inner, "out_blocks"):
            self.dropping.validate(len(inner.out_blocks))
        t, noise, x_t = self.sample(x0, generator)
        y = self.training_labels(y, generator)
        timesteps = self.network_timesteps(t, x0.device)
        keep = self.dropping.kept_blocks(t).to(x0.device)
        eps = model(x_t, timesteps, y, keep=keep)  # (B, C, H, W)
        per_row = (eps.float() - noise).pow(2).flatten(1).mean(1)  # (B,)
        if self.time_weight is not None:
            per_row = per_row * self.time_weight(t).to(per_row)
        loss = per_row.mean()
        return loss, {"loss": loss.detach(), "mean_kept": keep.float().mean()}


ASE_FINETUNE_LR = 2e-5  # the paper's fine-tuning learning rate (constant, AdamW; DiT experiments)
ASE_FINETUNE_EMA = 0.9999


def ase_finetune_config(cfg, **changes):
    """A :class:`~duodiff_fast.training.TrainConfig` for ASE fine-tuning, from a base config.

    Settings (the paper's Appendix B.1): AdamW, learning rate 2e-5, no warm-up, EMA 0.9999 (the
    paper's "teacher" is the EMA of the student), the base run's batch and weight decay. The paper
    used cosine annealing for U-ViT; the foundation trainer has warm-up + constant only, so the rate
    stays constant at 2e-5 here. ``changes`` override any field.
    """
    base = dict(lr=ASE_FINETUNE_LR, warmup_steps=0, ema_decay=ASE_FINETUNE_EMA)
    base.update(changes)
    return cfg.replace(**base)


def finetune_ase(cfg, dropping, model: Optional[UViT] = None, dataset=None, schedule=None):
    """Fine-tune a U-ViT for a dropping schedule with the foundation trainer; returns the Trainer.

    Args:
        cfg: a TrainConfig (its ``init_weights`` can point at the pretrained weights); pass it
            through :func:`ase_finetune_config` for the paper's settings.
        dropping: schedule name, kept list or DroppingSchedule.
        model: the pretrained U-ViT (copied into an :class:`ASEUViT`); default: built from cfg.
        dataset: training data (default ``cfg.data``).
        schedule: the noise schedule (default: the config's).

    The trained weights are plain U-ViT weights (``trainer.export_weights``) for :class:`ASEDenoiser`.
    """
    from ..schedules import get_schedule
    from ..training import build_model, resolve_schedule_name, train

    if model is None:
        torch.manual_seed(cfg.seed)  # the same init as the foundation trainer's own build
    base = model if model is not None else build_model(cfg)
    ase_model = ASEUViT.from_uvit(base)
    dropping = get_dropping_schedule(dropping)
    dropping.validate(len(ase_model.out_blocks))
    schedule = schedule or get_schedule(resolve_schedule_name(cfg))
    objective = ASEObjective(schedule, dropping, ase_model.num_classes, cfg.resolved_p_uncond())
    return train(cfg, model=ase_model, loss_fn=objective, dataset=dataset)


__all__ = ["ASEObjective", "ASE_FINETUNE_LR", "ASE_FINETUNE_EMA", "ase_finetune_config", "finetune_ase"]
