"""Acceleration methods and denoiser adapters (DuoDiff; AdaDiff, ASE and multistage come later)."""
from .denoiser import ModelDenoiser
from .duodiff import DuoDiff
from .adadiff import AdaDiff, AdaDiffObjective, AdaDiffUViT
from .ase import (ASEDenoiser, ASEDiT, ASEObjective, ASEUViT, DroppingSchedule, PAPER_SCHEDULES, PAPER_SPEEDUP_PCT,
                  ase_finetune_config, ase_forward, finetune_ase, get_dropping_schedule)
from .multistage import (CIFAR10_BOUNDARIES, MultistageDenoiser, MultistageObjective, MultistageUViT,
                         load_multistage, save_multistage)
from .stage_clustering import cluster_stages, cluster_three_stages, optimal_denoiser

__all__ = ["ModelDenoiser", "DuoDiff", "AdaDiff", "AdaDiffObjective", "AdaDiffUViT"]
__all__ += [
    "ASEDenoiser", "ASEDiT", "ASEObjective", "ASEUViT", "DroppingSchedule", "PAPER_SCHEDULES", "PAPER_SPEEDUP_PCT",
    "ase_finetune_config", "ase_forward", "finetune_ase", "get_dropping_schedule",
    "CIFAR10_BOUNDARIES", "MultistageDenoiser", "MultistageObjective", "MultistageUViT", "load_multistage",
    "save_multistage", "cluster_stages", "cluster_three_stages", "optimal_denoiser",
]
