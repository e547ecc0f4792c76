"""What ``duodiff-fast train --method ...`` trains: the model, its objective and the exported file.

    base        the U-ViT of --config (with --shallow: its DuoDiff shallow twin, depth 2)
    adadiff     exit heads + uncertainty modules on the frozen backbone of --backbone
                (AdaDiffUViT(backbone, freeze_backbone=True), AdaDiffObjective); exports adadiff.pt
    ase         the backbone of --backbone fine-tuned with an ASE dropping schedule (--ase-schedule
                D1..D6; ASEUViT, ASEObjective); exports ase_<D>.pt (plain U-ViT weights)
    multistage  a MultistageUViT (shared encoder, one decoder per stage, --boundaries), started from
                --backbone (MultistageUViT.from_uvit) or fresh from --config; exports multistage.pt

Every method goes through the same Trainer, so labels and their dropout (``TrainConfig.p_uncond``),
EMA, checkpoints and resume work the same way; the export (the EMA weights) is what ``sample``
takes with ``--adadiff-checkpoint``, ``--ase-checkpoint D3=...`` or ``--multistage-checkpoint``.
Backbones load with :func:`duodiff_fast.models.load_model` (whatever it accepts).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch.nn as nn

from .config import TrainConfig

__all__ = ["TRAIN_METHODS", "MethodTraining", "shallow_model", "method_training"]

TRAIN_METHODS = ("base", "adadiff", "ase", "multistage")


@dataclasses.dataclass
class MethodTraining:
    """A method's training set-up: ``Trainer(cfg, model=model, loss_fn=loss_fn)``, then ``export(trainer)``.

    ``model`` / ``loss_fn`` None: the Trainer's own (the U-ViT of ``cfg.model``, noise prediction).
    ``export(trainer)`` writes the method's sampling file and returns its path (None: nothing to write).
    """

    cfg: TrainConfig
    model: Optional[nn.Module] = None
    loss_fn: Any = None
    export: Callable[[Any], Optional[str]] = lambda trainer: None
    description: str = "base"


def shallow_model(model: Union[str, Dict[str, Any]]) -> Union[str, Dict[str, Any]]:
    """The DuoDiff shallow twin of a model spec: ``<name>-shallow``, or the keywords with depth 2."""
    from ..models.configs import SHALLOW_DEPTH, shallow_name

    if isinstance(model, str):
        return shallow_name(model)
    out = dict(model, depth=SHALLOW_DEPTH)
    if out.get("name"):
        out["name"] = shallow_name(out["name"])
        out.pop("depth")
    return out


def _load_backbone(path: Optional[str], config: Optional[Union[str, Dict[str, Any]]], use_ema: bool, method: str):
    from ..models import load_model

    if not path:
        raise ValueError(f"--method {method} trains on a pretrained backbone: pass --backbone (a checkpoint "
                         "or run folder that load_model reads)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--backbone {path!r} does not exist")
    return load_model(path, config, use_ema=use_ema)


def _schedule(cfg: TrainConfig, time_input: Optional[str]):
    from ..schedules import make_schedule
    from .trainer import resolve_schedule_name

    if cfg.time_input and time_input and cfg.time_input != time_input:
        raise ValueError(f"the backbone declares time input {time_input!r} but the run asks for {cfg.time_input!r}")
    return make_schedule(resolve_schedule_name(cfg), cfg.time_input or time_input or _spec_time_input(cfg))


def _spec_time_input(cfg: TrainConfig) -> str:
    if cfg.model_name:
        from ..models import get_spec

        try:
            return get_spec(cfg.model_name).time_input
        except (KeyError, ValueError):
            return "index"
    return "index"


def _export_weights(name: str):
    def export(trainer) -> Optional[str]:
        from ..models import save_weights

        path = os.path.join(trainer.cfg.out_dir, name)
        if trainer.is_main:
            save_weights(trainer.ema.module, path, time_input=trainer.time_input)
        return path

    return export


def method_training(
    method: str,
    cfg: TrainConfig,
    *,
    backbone: Optional[str] = None,
    backbone_config: Optional[Union[str, Dict[str, Any]]] = None,
    use_ema: bool = False,
    shallow: bool = False,
    ase_schedule: Optional[str] = None,
    boundaries: Optional[Sequence[float]] = None,
) -> MethodTraining:
    """Build what ``--method`` trains (see the module docstring); options that do not apply are refused.

    Args:
        method: one of :data:`TRAIN_METHODS`.
        cfg: the run's settings (``cfg.model`` is the backbone's config for the methods).
        backbone: path of the pretrained backbone (adadiff, ase; optional for multistage).
        backbone_config: the config to build it with (None: what ``load_model`` infers or reads).
        use_ema: load the backbone's EMA weights (trainer checkpoints).
        shallow: base only: train the DuoDiff shallow twin of ``cfg.model``.
        ase_schedule: ase only: D1..D6 (rescaled to the model's out-blocks as ``sample`` does).
        boundaries: multistage only: interior stage boundaries (default the CIFAR-10 ones).
    """
    if method not in TRAIN_METHODS:
        raise ValueError(f"unknown training method {method!r}; expected one of {list(TRAIN_METHODS)}")
    if shallow and method != "base":
        raise ValueError(f"--shallow trains DuoDiff's shallow backbone; it does not apply to --method {method}")
    if backbone and method == "base":
        raise ValueError("--backbone is for --method adadiff, ase or multistage (to start from weights, "
                         "the base method has TrainConfig.init_weights)")
    if (ase_schedule is not None) != (method == "ase"):
        raise ValueError("--ase-schedule (D1..D6) is needed with, and only with, --method ase")
    if boundaries is not None and method != "multistage":
        raise ValueError("--boundaries applies to --method multistage only")

    if method == "base":
        if shallow:
            cfg = cfg.replace(model=shallow_model(cfg.model))
        return MethodTraining(cfg, description="DuoDiff shallow backbone" if shallow else "base")

    if method == "adadiff":
        from ..methods import AdaDiffObjective, AdaDiffUViT

        net = _load_backbone(backbone, backbone_config, use_ema, method)
        schedule = _schedule(cfg, getattr(net, "time_input", None))
        model = AdaDiffUViT(net, freeze_backbone=True)
        return MethodTraining(cfg, model, AdaDiffObjective(schedule), _export_weights("adadiff.pt"),
                              "AdaDiff heads + uncertainty modules on a frozen backbone")

    if method == "ase":
        from ..methods import ASEObjective, ASEUViT
        from ..methods.ase import ASEDiT, droppable_blocks, dropping_for
        from ..models import DiT

        net = _load_backbone(backbone, backbone_config, use_ema, method)
        schedule = _schedule(cfg, getattr(net, "time_input", None))
        model = ASEDiT.from_dit(net) if isinstance(net, DiT) else ASEUViT.from_uvit(net)
        model.time_input = getattr(net, "time_input", None)
        # a paper name resolves in the model's own table (U-ViT's D1..D6, DiT's D1/D3/D4/D6) and is
        # rescaled to its depth, as sample does
        dropping = dropping_for(model, ase_schedule)
        dropping.validate(droppable_blocks(model))
        name = ase_schedule.strip().upper()
        what = "blocks" if isinstance(net, DiT) else "out-blocks"
        return MethodTraining(cfg, model, ASEObjective(schedule, dropping), _export_weights(f"ase_{name}.pt"),
                              f"ASE {name} fine-tuning (kept {what} {list(dropping.kept)})")

    # multistage
    from ..methods import MultistageObjective, MultistageUViT, save_multistage
    from ..methods.multistage import CIFAR10_BOUNDARIES

    bounds = tuple(boundaries) if boundaries is not None else CIFAR10_BOUNDARIES
    if backbone:
        net = _load_backbone(backbone, backbone_config, use_ema, method)
        time_input = getattr(net, "time_input", None)
        model = MultistageUViT.from_uvit(net, bounds)
    else:
        from .trainer import build_model

        time_input = None
        model = MultistageUViT(bounds, **build_model(cfg).config)
    schedule = _schedule(cfg, time_input)

    def export(trainer) -> Optional[str]:
        path = os.path.join(trainer.cfg.out_dir, "multistage.pt")
        if trainer.is_main:
            save_multistage(trainer.ema.module, path)
        return path

    # the other stages' decoders get no gradient in a step: DDP must allow unused parameters
    cfg = cfg.replace(find_unused_parameters=True)
    return MethodTraining(cfg, model, MultistageObjective(schedule, model.boundaries, seed=cfg.seed), export,
                          f"multistage, boundaries {list(model.boundaries)}")
