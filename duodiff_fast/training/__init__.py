"""Autograd training of U-ViT diffusion models (and of the acceleration methods' modules).

Entry point: ``train(TrainConfig(...)) -> Trainer``. Runs in one process or under ``torchrun``
(DistributedDataParallel, detected from RANK/WORLD_SIZE). Pieces:

    config      TrainConfig (every setting; paper defaults from DuoDiff Table 4)
    objective   DiffusionObjective (noise-prediction L_simple), drop_labels (CFG label dropout)
    data        ImageFolderDataset, NpzDataset, SyntheticDataset, build_dataset, StepSampler
    optim       build_optimizer (AdamW), build_lr_scheduler (linear warm-up, then constant)
    ema         EMA (shadow copy of the unwrapped module)
    checkpoint  CheckpointManager, save_checkpoint, load_checkpoint (weights_only), RNG capture
    distributed init_distributed, DistEnv
    trainer     Trainer, train
"""
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import DIT_RECIPE, TrainConfig, dit_train_config
from .data import (
    ImageFolderDataset,
    NpzDataset,
    StepSampler,
    SyntheticDataset,
    TensorDataset,
    build_dataset,
    check_dataset,
    iterate_batches,
    parse_data_spec,
)
from .distributed import DistEnv, init_distributed
from .ema import EMA, unwrap_model
from .objective import DiffusionObjective, HybridObjective, drop_labels
from .optim import LinearWarmup, build_lr_scheduler, build_optimizer, clip_gradients
from .trainer import Trainer, build_model, resolve_schedule_name, train

__all__ = [
    "DIT_RECIPE", "dit_train_config", "HybridObjective",
    "TrainConfig", "Trainer", "train", "build_model", "resolve_schedule_name",
    "DiffusionObjective", "drop_labels",
    "ImageFolderDataset", "NpzDataset", "SyntheticDataset", "TensorDataset", "build_dataset",
    "check_dataset", "parse_data_spec", "StepSampler", "iterate_batches",
    "build_optimizer", "build_lr_scheduler", "LinearWarmup", "clip_gradients",
    "EMA", "unwrap_model",
    "CheckpointManager", "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
    "CHECKPOINT_FORMAT", "DistEnv", "init_distributed",
]
