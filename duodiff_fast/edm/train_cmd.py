"""``duodiff-fast train --config <EDM config>``: an EDM U-Net (or the multistage U-Net) through the package trainer.

    duodiff-fast train --config multistage-tiny-ddpmpp --data synthetic --steps 200 --out-dir RUN
    duodiff-fast sample --solver heun --config multistage-tiny-ddpmpp --checkpoint RUN/edm_ema.pt

A SongUNet config trains with :class:`~duodiff_fast.edm.loss.EDMLoss`, a MultistageUNet config with
:class:`~duodiff_fast.edm.loss.EDMMultistageLoss` on the config's own ``stage_interval`` (one stage per
step, the same on every rank; see :mod:`duodiff_fast.edm.objective`). EMA, checkpoints and exact
resume (``--resume``) are the trainer's. At the end the EMA weights are written as the package's EDM
file ``RUN/edm_ema.pt`` (``{format, config, state_dict}``, :func:`~duodiff_fast.edm.checkpoint.save_edm_file`),
which ``sample --solver heun`` reads with the same named config or ``--config auto``.

Optimizer defaults follow EDM's train.py where the trainer has the knob: Adam lr 1e-3, betas
(0.9, 0.999), no weight decay, no gradient clipping; warm-up steps and EMA decay are the trainer's.
"""
from __future__ import annotations

from typing import Any, Dict

from ..training.config import TrainConfig
from ..training.methods import MethodTraining

__all__ = ["EDM_EXPORT_NAME", "EDM_RECIPE", "UNUSED_TRAIN_OPTIONS", "check_edm_train_args", "edm_training"]

EDM_EXPORT_NAME = "edm_ema.pt"
EDM_RECIPE: Dict[str, Any] = dict(lr=1e-3, weight_decay=0.0, betas="0.9,0.999", grad_clip=0.0)

# train options that mean nothing for an EDM U-Net: (attribute, flag, value when not given)
UNUSED_TRAIN_OPTIONS = (
    ("method", "--method", "base"), ("shallow", "--shallow", False), ("backbone", "--backbone", None),
    ("use_ema", "--use-ema", False), ("ase_schedule", "--ase-schedule", None), ("boundaries", "--boundaries", None),
    ("schedule", "--schedule", None), ("p_uncond", "--p-uncond", None),
    ("gradient_checkpointing", "--gradient-checkpointing", False),
)


def check_edm_train_args(args) -> None:
    """Usage error (SystemExit with a message) for a train option that does not apply to EDM configs."""
    given = [flag for attr, flag, unset in UNUSED_TRAIN_OPTIONS if getattr(args, attr, unset) != unset]
    if given:
        raise SystemExit(f"options that do not apply to EDM config {args.config!r}: {', '.join(given)} (an EDM "
                         "U-Net trains with EDM's loss on sigma; a multistage config uses its own stage intervals)")


def edm_training(name: str, cfg: TrainConfig) -> MethodTraining:
    """The EDM net of config ``name``, its objective and the export of its EMA weights.

    ``cfg.model`` should be ``name`` (it is recorded in the run folder); ``cfg.time_input`` is set
    to "index" because EDM nets take sigma, not a DDPM time, and the trainer must not look the name
    up in the U-ViT registry."""
    import os

    import torch

    from .checkpoint import save_edm_file
    from .configs import build_edm_net, get_edm_config
    from .loss import EDMLoss, EDMMultistageLoss
    from .objective import EDMObjective

    config = get_edm_config(name)
    torch.manual_seed(cfg.seed)  # the init is the run's seed's, as for the trainer's own models
    net = build_edm_net(config)
    if config["model_type"] == "MultistageUNet":
        loss, what = EDMMultistageLoss(config["stage_interval"]), f"multistage EDM U-Net {name}"
    else:
        loss, what = EDMLoss(), f"EDM U-Net {name}"
    run_cfg = cfg.replace(time_input="index")

    def export(trainer):
        path = os.path.join(trainer.cfg.out_dir, EDM_EXPORT_NAME)
        if trainer.is_main:
            save_edm_file(trainer.ema.module, config, path)
        return path

    return MethodTraining(run_cfg, net, EDMObjective(loss, seed=cfg.seed), export, what)
