"""Acceleration methods as denoisers for every solver: DuoDiff, AdaDiff, ASE and multistage.

Sampling-side names import eagerly. The training objectives of ASE and multistage
(``ASEObjective``, ``ase_finetune_config``, ``finetune_ase``, ``MultistageObjective``) live in
:mod:`.ase_training` and :mod:`.multistage_training` and are imported on first access, so that
``import duodiff_fast.methods`` does not import the training package.
"""
import importlib

from .denoiser import ModelDenoiser
from .duodiff import DuoDiff
from .adadiff import AdaDiff, AdaDiffObjective, AdaDiffUViT
from .ase import (ASEDenoiser, ASEDiT, ASEUViT, DroppingSchedule, PAPER_SCHEDULES, PAPER_SPEEDUP_PCT, ase_forward,
                  get_dropping_schedule)
from .multistage import CIFAR10_BOUNDARIES, MultistageDenoiser, MultistageUViT, load_multistage, save_multistage
from .stage_clustering import cluster_stages, cluster_three_stages, optimal_denoiser

# name -> submodule that defines it, imported on first access (PEP 562)
_TRAINING = {
    "ASEObjective": "ase_training", "ase_finetune_config": "ase_training", "finetune_ase": "ase_training",
    "MultistageObjective": "multistage_training",
}


def __getattr__(name):
    module = _TRAINING.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["ModelDenoiser", "DuoDiff", "AdaDiff", "AdaDiffObjective", "AdaDiffUViT"]
__all__ += [
    "ASEDenoiser", "ASEDiT", "ASEObjective", "ASEUViT", "DroppingSchedule", "PAPER_SCHEDULES", "PAPER_SPEEDUP_PCT",
    "ase_finetune_config", "ase_forward", "finetune_ase", "get_dropping_schedule",
    "CIFAR10_BOUNDARIES", "MultistageDenoiser", "MultistageObjective", "MultistageUViT", "load_multistage",
    "save_multistage", "cluster_stages", "cluster_three_stages", "optimal_denoiser",
]
