"""``TrainConfig``: every setting of a training run, serialisable to plain data."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Union

from ..models.configs import TIME_INPUTS

# DuoDiff paper, Table 4 (and U-ViT's recipe for the warm-up).
PAPER_LR = 2e-4
PAPER_WEIGHT_DECAY = 0.03
PAPER_BETAS = (0.99, 0.999)
PAPER_BATCH_SIZE = 128
WARMUP_STEPS = 1500
DEFAULT_P_UNCOND = 0.1
# U-ViT's ImageNet 256 L/2 recipe drops labels more often.
P_UNCOND_BY_MODEL = {"imagenet256-l2": 0.15, "imagenet256-l2-shallow": 0.15}

# DiT's train.py recipe: AdamW lr 1e-4 without weight decay, no warm-up and no clipping, EMA 0.9999,
# label dropout 0.1 (the learned variance trains through the hybrid loss, objective.HybridObjective).
DIT_RECIPE: Dict[str, Any] = dict(lr=1e-4, weight_decay=0.0, betas=[0.9, 0.999], warmup_steps=0, grad_clip=None,
                                  ema_decay=0.9999, p_uncond=0.1)

AMP_MODES = ("auto", "bf16", "none")
# Recipes whose published training flips images left-right (U-ViT / DuoDiff on CIFAR-10 and
# CelebA 64x64, natural photos where a mirror image is as valid as the original). Every other
# model config trains without flips unless asked (TrainConfig.hflip, --hflip): mirrored digits
# or text are wrong data.
HFLIP_RECIPES = ("cifar10-s2", "cifar10-s2-shallow", "celeba64-s4", "celeba64-s4-shallow")


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run.

    Attributes:
        model: a registry name ("cifar10-s2", "cifar10-s2-shallow", "tiny", ...), a path to a
            JSON model config (see ``duodiff_fast.models.configs``), or a dict of UViT keywords
            (optionally with "name": a registry entry the keywords override).
        model_overrides: UViT keywords replacing those of ``model`` (e.g. {"use_checkpoint": True}).
        schedule: noise schedule name; None takes the registry entry's schedule ("linear" when
            ``model`` is a dict without a name).
        time_input: what the network is fed at time t, "index" or "normalized" (index / N, the
            DuoDiff authors' CIFAR-10/CelebA convention); None takes what the resumed checkpoint
            or ``init_weights`` declares, else the registry entry's (see duodiff_fast.models.checkpoint).
        data: data source spec (see ``duodiff_fast.training.data``).
        batch_size: global batch (split evenly over ranks).
        steps: total optimizer steps of the run.
        lr, weight_decay, betas, adam_eps: AdamW settings.
        warmup_steps: linear LR warm-up length, then constant.
        grad_clip: max global gradient norm; None or 0 disables clipping.
        ema_decay: EMA factor.
        ema_warmup: warm the EMA up: update t (0-based) uses decay_t = min(ema_decay, (1 + t) / (10 + t)),
            so a short run's EMA is not dominated by the random initial weights (False: ema_decay
            from the first update, as U-ViT).
        hflip: random horizontal flips of the training data; None: on only for the recipes in
            :data:`HFLIP_RECIPES` (or as the data spec's "hflip" says), off for everything else.
        p_uncond: label drop rate for conditional models; None: 0.15 for imagenet256-l2, else 0.1.
        seed: seeds model init, data order and noise.
        out_dir: run directory (checkpoints, log.jsonl, config.json).
        save_every: checkpoint period in steps (0: only at the end).
        keep_last: step checkpoints kept besides ``latest.pt``.
        amp: "auto" (bf16 autocast on CUDA, off on CPU), "bf16" or "none".
        log_every: steps between log records.
        device: "auto", "cpu", "cuda" or "cuda:i".
        num_workers: DataLoader workers for datasets read from disk.
        resume: "auto" (resume from ``out_dir``'s latest checkpoint when there is one), a
            checkpoint path, or None / "none" (start fresh; the two are the same).
        init_weights: weights to start from when not resuming (any format the models package
            reads: a plain state dict, an official U-ViT file, a training checkpoint, a checkpoint
            folder or a run folder, whose export/ema is used); the EMA
            starts from them too. For fine-tuning (ASE block dropping, AdaDiff heads).
        progress: show a tqdm progress bar on rank 0.
        compile: wrap the model in ``torch.compile``.
        find_unused_parameters: passed to DistributedDataParallel.
    """

    model: Union[str, Dict[str, Any]] = "cifar10-s2"
    model_overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    schedule: Optional[str] = None
    time_input: Optional[str] = None
    data: Union[str, Dict[str, Any]] = "synthetic"
    batch_size: int = PAPER_BATCH_SIZE
    steps: int = 500_000
    lr: float = PAPER_LR
    weight_decay: float = PAPER_WEIGHT_DECAY
    betas: List[float] = dataclasses.field(default_factory=lambda: list(PAPER_BETAS))
    adam_eps: float = 1e-8
    warmup_steps: int = WARMUP_STEPS
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    hflip: Optional[bool] = None
    p_uncond: Optional[float] = None
    seed: int = 0
    out_dir: str = "runs/train"
    save_every: int = 10_000
    keep_last: int = 3
    amp: str = "auto"
    log_every: int = 100
    device: str = "auto"
    num_workers: int = 0
    resume: Optional[str] = "auto"
    init_weights: Optional[str] = None
    progress: bool = True
    compile: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]
        if isinstance(self.resume, str) and self.resume.lower() == "none":
            self.resume = None  # the CLI's --resume none
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig: {msg}")

        need(isinstance(self.model, (str, dict)) and bool(self.model), f"model must be a name or a dict, got {self.model!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), got {self.betas}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.grad_clip is None or self.grad_clip >= 0, f"grad_clip must be None or >= 0, got {self.grad_clip}")
        need(0 <= self.ema_decay <= 1, f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        need(self.p_uncond is None or 0 <= self.p_uncond <= 1, f"p_uncond must lie in [0, 1], got {self.p_uncond}")
        need(self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}")
        need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        need(self.time_input in (None,) + TIME_INPUTS,
             f"time_input must be None or one of {TIME_INPUTS}, got {self.time_input!r}")
        need(self.hflip in (None, True, False), f"hflip must be None, True or False, got {self.hflip!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")

    @property
    def model_name(self) -> Optional[str]:
        """The registry name behind ``model``, if any."""
        if isinstance(self.model, str):
            return self.model
        return self.model.get("name")

    def resolved_p_uncond(self) -> float:
        if self.p_uncond is not None:
            return float(self.p_uncond)
        return P_UNCOND_BY_MODEL.get(self.model_name or "", DEFAULT_P_UNCOND)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-data copy (what checkpoints and config.json store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def dit_train_config(model: Union[str, Dict[str, Any]], **changes) -> TrainConfig:
    """A :class:`TrainConfig` with DiT's recipe (:data:`DIT_RECIPE`); ``changes`` override any field."""
    return TrainConfig(model=model, **{**DIT_RECIPE, **changes})
