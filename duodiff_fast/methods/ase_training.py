"""ASE fine-tuning: the truncated-forward objective and the trainer settings for a dropping schedule.

Kept apart from :mod:`duodiff_fast.methods.ase` so that sampling with ASE never imports the
training package (the dependency runs training -> methods only here).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.dit import DiT
from ..models.uvit import UViT
from ..training.objective import DiffusionObjective
from .ase import ASEDiT, ASEUViT, droppable_blocks, dropping_for, get_dropping_schedule


class ASEObjective(DiffusionObjective):
    """L_simple through the truncated forward: each row runs the blocks its own t keeps.

    ``model`` must accept ``keep=`` (an :class:`ASEUViT` or :class:`ASEDiT`, possibly DDP-wrapped).
    A network with a learned variance (DiT) is trained with the hybrid loss L_simple + L_vlb, as the
    paper fine-tunes DiT (improved DDPM's, :class:`~duodiff_fast.training.objective.HybridObjective`). The paper's
    re-weighting lambda(t) (its Algorithm 1) is optional: ``time_weight(t) -> (B,)`` multiplies each
    row's loss (default 1, which is what the paper switches to after its re-weighting cycle).
    """

    def __init__(self, schedule, dropping, num_classes: Optional[int] = None, p_uncond: Optional[float] = None,
                 time_weight=None):
        super().__init__(schedule, num_classes, p_uncond)
        self.dropping = get_dropping_schedule(dropping)
        self.time_weight = time_weight

    def __call__(self, model, x0, y, generator=None):
        inner = getattr(model, "module", model)
        if hasattr(inner, "out_blocks") or hasattr(inner, "t_embedder"):
            self.dropping.validate(droppable_blocks(inner))
        t, noise, x_t = self.sample(x0, generator)
        y = self.training_labels(y, generator)
        timesteps = self.network_timesteps(t, x0.device)
        keep = self.dropping.kept_blocks(t).to(x0.device)
        out = model(x_t, timesteps, y, keep=keep).float()  # (B, C or 2C, H, W)
        c = x0.shape[1]
        per_row = (out[:, :c] - noise).pow(2).flatten(1).mean(1)  # (B,)
        if out.shape[1] == 2 * c:  # learned variance: + L_vlb with eps stopped (the hybrid loss)
            from ..samplers.improved_ddpm import ImprovedDiffusion, vb_terms_bpd

            if getattr(self, "_diffusion", None) is None:
                self._diffusion = ImprovedDiffusion.from_schedule(self.schedule, None)
            k = torch.round(t.to(torch.float64) * self._diffusion.num_timesteps - 1.0).long().to(x0.device)
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            per_row = per_row + vb_terms_bpd(self._diffusion, frozen, x0.float(), x_t, k)
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
    """Fine-tune a U-ViT or DiT for a dropping schedule with the foundation trainer; returns the Trainer.

    Args:
        cfg: a TrainConfig (its ``init_weights`` can point at the pretrained weights); pass it
            through :func:`ase_finetune_config` for the paper's settings.
        dropping: schedule name, kept list or DroppingSchedule.
        model: the pretrained U-ViT or DiT (copied into an :class:`ASEUViT` / :class:`ASEDiT`);
            default: built from cfg. A paper name resolves for the model's architecture and depth
            (:func:`dropping_for`).
        dataset: training data (default ``cfg.data``).
        schedule: the noise schedule (default: the config's).

    The trained weights are plain U-ViT / DiT weights (``trainer.export_weights``) for :class:`ASEDenoiser`.
    """
    from ..schedules import get_schedule
    from ..training import build_model, resolve_schedule_name, train

    if model is None:
        torch.manual_seed(cfg.seed)  # the same init as the foundation trainer's own build
    base = model if model is not None else build_model(cfg)
    ase_model = ASEDiT.from_dit(base) if isinstance(base, DiT) else ASEUViT.from_uvit(base)
    dropping = dropping_for(ase_model, dropping)
    dropping.validate(droppable_blocks(ase_model))
    schedule = schedule or get_schedule(resolve_schedule_name(cfg))
    objective = ASEObjective(schedule, dropping)  # labels and their dropout: the Trainer's
    return train(cfg, model=ase_model, loss_fn=objective, dataset=dataset)
