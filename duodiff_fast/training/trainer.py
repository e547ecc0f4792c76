"""The training loop: one process or DistributedDataParallel under ``torchrun``.

    from duodiff_fast.training import TrainConfig, train
    trainer = train(TrainConfig(model="cifar10-s2-shallow", data="folder:/data/cifar10", out_dir="runs/s"))

What is reproducible: model init (from ``seed``), the batch order and flips (a function of
``(seed, step, rank)``), and the noise, timesteps and label drops (a per-rank generator whose
state is checkpointed). On CPU, a run resumed from a checkpoint ends bit-identical to the
uninterrupted run.

Run folder (``cfg.out_dir``): ``config.json`` (the run's settings), ``log.jsonl``,
``ckpt_<step>.pt`` / ``latest.pt`` (resumable training state), and at every checkpoint the
exports ``export/ema/`` and ``export/raw/``: checkpoint folders (``config.json`` +
``model.safetensors``, see ``duodiff_fast.models.pretrained``) of the EMA and raw weights, which
``duodiff-fast sample --checkpoint RUN`` (the EMA) or ``RUN/export/raw`` load without --config.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..io_utils import append_jsonl, atomic_write_json
from ..seeding import mix_seed
from .checkpoint import CHECKPOINT_FORMAT, CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from .config import TrainConfig
from .data import StepSampler, build_dataset, check_dataset, default_hflip, iterate_batches
from .distributed import DistEnv, all_gather_objects, all_reduce_mean, barrier, cleanup, init_distributed
from .ema import EMA, unwrap_model
from .objective import DiffusionObjective, HybridObjective, drop_labels
from .optim import build_lr_scheduler, build_optimizer, clip_gradients, trainable_parameters

LossFn = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor], Optional[torch.Generator]],
                  Tuple[torch.Tensor, Dict[str, Any]]]
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------------------ construction
def build_model(cfg: TrainConfig) -> nn.Module:
    """The UViT or DiT that ``cfg.model`` (+ ``cfg.model_overrides``) names."""
    from ..models import UViT, create_model

    if isinstance(cfg.model, str):
        return create_model(cfg.model, **cfg.model_overrides)
    kwargs = dict(cfg.model)
    name = kwargs.pop("name", None)
    kwargs.update(cfg.model_overrides)
    if name is not None:
        return create_model(name, **kwargs)
    return UViT(**kwargs)


def resolve_schedule_name(cfg: TrainConfig) -> str:
    """``cfg.schedule``, else the registry entry's schedule, else "linear" (DuoDiff's DDPM)."""
    if cfg.schedule:
        return cfg.schedule
    if cfg.model_name:
        from ..models import get_spec

        return get_spec(cfg.model_name).schedule
    return "linear"


def _loss_schedule(loss_fn: Any):
    """The noise schedule inside a loss function, when it exposes one (``.schedule`` or ``.base.schedule``)."""
    for holder in (loss_fn, getattr(loss_fn, "base", None)):
        schedule = getattr(holder, "schedule", None)
        if schedule is not None and hasattr(schedule, "model_input"):
            return schedule
    return None


def resolve_train_time_input(cfg: TrainConfig, resume_path: Optional[str], loss_fn: Any = None,
                             model: Optional[nn.Module] = None) -> str:
    """What the network is fed at time t during this run ("index" or "normalized").

    ``cfg.time_input`` when set, else what the resumed checkpoint, ``cfg.init_weights`` or the
    given model (``model.time_input`` / ``model.backbone.time_input``, set when its weights were
    loaded from a checkpoint that declares one) declares, else the registry entry's, else "index".
    A ``loss_fn`` brings its own schedule: its convention wins, and any declared or configured one
    that differs is an error (the run would otherwise train one convention and record another).
    """
    from ..models.checkpoint import checkpoint_info

    sources: List[Tuple[str, str]] = []
    if cfg.time_input is not None:
        sources.append(("TrainConfig.time_input", cfg.time_input))
    for what, holder in (("the model", model), ("the model's backbone", getattr(model, "backbone", None))):
        declared = getattr(holder, "time_input", None)
        if isinstance(declared, str):
            sources.append((what, declared))
    for what, path in (("resumed checkpoint", resume_path), ("init_weights", None if resume_path else cfg.init_weights)):
        if path and os.path.exists(path):  # a file, or a checkpoint / run folder
            declared = checkpoint_info(path).time_input
            if declared is not None:
                sources.append((f"{what} {path!r}", declared))
    schedule = _loss_schedule(loss_fn)
    if schedule is not None:
        sources.insert(0, ("the loss function's schedule", getattr(schedule, "time_input", "index")))
    values = {v for _, v in sources}
    if len(values) > 1:
        raise ValueError("conflicting time inputs for this run: " + ", ".join(f"{w}: {v}" for w, v in sources))
    if sources:
        return sources[0][1]
    if cfg.model_name:
        from ..models import get_spec

        return get_spec(cfg.model_name).time_input
    return "index"


def resolve_hflip(cfg: TrainConfig, dataset: Optional[torch.utils.data.Dataset]) -> bool:
    """Whether this run flips its data left-right.

    ``cfg.hflip`` when set; else the data spec's ``"hflip"``; else on only for the recipes in
    :data:`~.config.HFLIP_RECIPES` with pixel data read from files. A dataset passed to the
    trainer directly (``dataset`` None here) is flipped only when ``cfg.hflip`` says so.
    """
    from .config import HFLIP_RECIPES
    from .data import parse_data_spec

    spec_flip = parse_data_spec(cfg.data).get("hflip") if dataset is not None else None
    if cfg.hflip is not None:
        if spec_flip is not None and bool(spec_flip) != cfg.hflip:
            raise ValueError(f"TrainConfig.hflip={cfg.hflip} contradicts the data spec's hflip={spec_flip}")
        return cfg.hflip
    if dataset is None:
        return False
    if spec_flip is not None:
        return bool(spec_flip)
    if cfg.model_name not in HFLIP_RECIPES:
        return False
    return default_hflip(cfg.data, dataset)


def export_spec(cfg: TrainConfig, model: nn.Module, time_input: str):
    """The model config a run's exports record (None when ``model`` is not a plain UViT or DiT).

    The registry entry or JSON config ``cfg.model`` names, with the built model's keywords, the
    run's schedule and time input.
    """
    import dataclasses as dc

    from ..models import DiT, UViT, get_spec
    from ..models.configs import ModelSpec

    config = _plain_config(model)
    if not isinstance(model, (UViT, DiT)) or config is None:
        return None
    kwargs = {k: v for k, v in config.items() if k != "use_checkpoint"}
    model_type = "dit" if isinstance(model, DiT) else "uvit"
    base = get_spec(cfg.model_name) if cfg.model_name else ModelSpec("custom", kwargs, "linear",
                                                                     source="TrainConfig.model", model_type=model_type)
    return dc.replace(base, kwargs=kwargs, schedule=resolve_schedule_name(cfg), time_input=time_input,
                      source=f"trained by duodiff-fast from {base.name}" if cfg.model_name else base.source)


def _objectives_of(loss_fn: Any) -> List[Any]:
    """The loss function and the objective it wraps (``.base``), when it has one."""
    out = [loss_fn]
    base = getattr(loss_fn, "base", None)
    if base is not None:
        out.append(base)
    return out


def check_objective_labels(loss_fn: Any, num_classes: int) -> None:
    """Refuse an objective that would drop labels a second time or disagrees on conditioning.

    The Trainer drops labels itself (``TrainConfig.p_uncond``) for every objective; an objective
    built with its own ``p_uncond`` would drop them again, and one built for another label count
    would feed the network wrong labels (or none).
    """
    for obj in _objectives_of(loss_fn):
        p = getattr(obj, "p_uncond", None)
        if p is not None:
            raise ValueError(
                f"{type(obj).__name__} was built with p_uncond={p}: the Trainer drops labels itself "
                "(TrainConfig.p_uncond) for every objective; build the objective without p_uncond")
        n = getattr(obj, "num_classes", None)
        if n is not None and (n > 0) != (num_classes > 0) or (n is not None and n > 0 and n != num_classes):
            raise ValueError(f"{type(obj).__name__} was built for num_classes={n} but the model has "
                             f"num_classes={num_classes}; leave num_classes unset (the Trainer passes the labels)")


def _plain_config(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The model's constructor keywords when they are plain data (stored in checkpoints)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        return None
    ok = all(v is None or isinstance(v, (bool, int, float, str)) for v in config.values())
    return dict(config) if ok else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Trainer:
    """Trains ``model`` (default: the UViT ``cfg.model`` names) with ``loss_fn`` (default:
    :class:`DiffusionObjective`, noise prediction) on ``dataset`` (default: ``cfg.data``).

    Args:
        cfg: the run's settings.
        model: a module to train instead of building one (e.g. an AdaDiff model whose backbone
            is frozen: only parameters with ``requires_grad`` are optimised).
        loss_fn: ``(model, x0, y, generator) -> (loss, metrics)``; see ``objective.py``.
        dataset: a dataset to use instead of ``cfg.data``.
        env: the distributed environment (default: detected from torchrun's variables).

    Attributes: ``model`` (unwrapped), ``net`` (what the loss calls: DDP/compiled wrapper or the
    model), ``ema``, ``optimizer``, ``scheduler``, ``step``, ``history`` (the log records).
    """

    def __init__(self, cfg: TrainConfig, model: Optional[nn.Module] = None, loss_fn: Optional[LossFn] = None,
                 dataset: Optional[torch.utils.data.Dataset] = None, env: Optional[DistEnv] = None):
        cfg.validate()
        self.cfg = cfg
        self.env = env or init_distributed(cfg.device)
        self.device = self.env.device
        self.is_main = self.env.is_main
        self.history: List[Dict[str, Any]] = []

        # Model init is seeded identically on every rank (DDP also broadcasts rank 0's weights).
        _seed_everything(cfg.seed)
        self.model = (model if model is not None else build_model(cfg)).to(self.device)
        self.model_config = _plain_config(self.model)
        self.num_classes = int(getattr(self.model, "num_classes", 0) or 0)
        self.ema = EMA(self.model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.params = trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.params, cfg.lr, cfg.weight_decay, cfg.betas, cfg.adam_eps)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.warmup_steps)

        self.checkpoints = CheckpointManager(cfg.out_dir, cfg.keep_last)
        resume_path = self._resume_path()
        self.schedule = None
        self.time_input = resolve_train_time_input(cfg, resume_path, loss_fn, model)
        if loss_fn is None:
            from ..schedules import make_schedule

            self.schedule = make_schedule(resolve_schedule_name(cfg), self.time_input)
            objective = HybridObjective if getattr(self.model, "learn_sigma", False) else DiffusionObjective
            loss_fn = objective(self.schedule)
        if hasattr(self.model, "label_dropout_in_forward"):
            # DiT drops labels inside its forward in training; the Trainer already drops them
            # (p_uncond) from the run's generator, so that resumed runs repeat the same draws.
            self.model.label_dropout_in_forward = False
        check_objective_labels(loss_fn, self.num_classes)
        # Labels and their dropout are the Trainer's, the same for every objective (train_step).
        self.p_uncond = cfg.resolved_p_uncond() if self.num_classes > 0 else 0.0
        self.loss_fn = loss_fn
        # Carried by the model, so that save_weights / export_weights keep the convention.
        self.model.time_input = self.time_input
        self.ema.module.time_input = self.time_input
        self.export_spec = export_spec(cfg, self.model, self.time_input)

        if dataset is None:
            self.dataset = self._build_dataset()
        else:
            self.dataset = dataset
            if hasattr(self.model, "img_size") and hasattr(self.model, "in_chans"):
                check_dataset(dataset, int(self.model.img_size), int(self.model.in_chans), self.num_classes)
        hflip = resolve_hflip(cfg, self.dataset if dataset is None else None)
        self.sampler = StepSampler(len(self.dataset), cfg.batch_size, self.env.rank, self.env.world_size,
                                   cfg.seed, hflip=hflip)

        # Per-rank randomness (noise, t, label drops; global RNGs for anything else).
        rank_seed = mix_seed(cfg.seed, self.env.rank, 7)
        _seed_everything(rank_seed)
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed)

        self.step = 0
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.resumed_from: Optional[str] = None
        if resume_path is not None:
            self.load(resume_path)
        elif cfg.init_weights:
            self.load_initial_weights(cfg.init_weights)

        self.net: nn.Module = self.model
        if self.env.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def _build_dataset(self) -> torch.utils.data.Dataset:
        img_size = getattr(self.model, "img_size", None)
        in_chans = getattr(self.model, "in_chans", None)
        if img_size is None or in_chans is None:
            raise ValueError("the model has no img_size/in_chans attributes; pass a dataset explicitly")
        return build_dataset(self.cfg.data, int(img_size), int(in_chans), self.num_classes)

    def _resume_path(self) -> Optional[str]:
        resume = self.cfg.resume
        if not resume:
            return None
        if resume == "auto":
            return self.checkpoints.latest()
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"resume checkpoint {resume!r} does not exist")
        return resume

    # ------------------------------------------------------------------------------ precision
    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """bf16 when autocast is on, else None."""
        amp = self.cfg.amp
        if amp == "bf16" or (amp == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ---------------------------------------------------------------------------- one update
    def train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimizer update on a batch; returns detached metrics (tensors on the device).

        Args:
            x: (b, C, H, W) float clean data on the device; y: (b,) int64 labels or None.
        """
        self.net.train()
        y = self.training_labels(y)
        on_step = getattr(self.loss_fn, "on_step", None)
        if callable(on_step):  # randomness shared by every rank at this step (e.g. the multistage stage)
            on_step(self.step, self.cfg.seed)
        with self._autocast():
            loss, metrics = self.loss_fn(self.net, x, y, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.params, self.cfg.grad_clip)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])  # the lr of this update
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        out = {k: (v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
               for k, v in metrics.items()}
        out.setdefault("loss", loss.detach().float())
        if grad_norm is not None:
            out["grad_norm"] = grad_norm.detach().float()
        return out

    def training_labels(self, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The labels every objective hands the network: None for an unconditional model, else
        (b,) int64 with each replaced by the null class (``num_classes - 1``) at rate
        ``TrainConfig.p_uncond``, drawn from the per-rank generator."""
        if self.num_classes <= 0:
            return None
        if y is None:
            raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}) "
                             "but the data has no labels")
        return drop_labels(y, self.p_uncond, self.num_classes - 1, self.generator)

    # ---------------------------------------------------------------------------------- loop
    def batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches for steps ``self.step``, ``self.step + 1``, ... on the device."""
        pin = self.device.type == "cuda"
        for x, y in iterate_batches(self.dataset, self.sampler, self.step, self.cfg.num_workers, pin):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def fit(self, steps: Optional[int] = None) -> Dict[str, Any]:
        """Train until ``steps`` (default ``cfg.steps``) updates are done; returns the last log record."""
        total = self.cfg.steps if steps is None else int(steps)
        cfg = self.cfg
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            atomic_write_json(os.path.join(cfg.out_dir, CONFIG_NAME), self.run_config())
        if self.step >= total:
            return self.history[-1] if self.history else {}
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not (self.is_main and cfg.progress),
                   desc="train", dynamic_ncols=True)
        window: Dict[str, torch.Tensor] = {}
        window_steps = 0
        t_window = time.perf_counter()
        last_saved = self.step if self.resumed_from else -1
        stream = self.batches()
        try:
            for x, y in stream:
                metrics = self.train_step(x, y)
                for k, v in metrics.items():
                    window[k] = window[k] + v if k in window else v.clone()
                window_steps += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == total:
                    record = self._log(window, window_steps, time.perf_counter() - t_window)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    window, window_steps, t_window = {}, 0, time.perf_counter()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    last_saved = self.step
                if self.step >= total:
                    break
        finally:
            stream.close()
            bar.close()
        if last_saved != self.step:
            self.save()
        return self.history[-1] if self.history else {}

    def _log(self, window: Dict[str, torch.Tensor], n: int, seconds: float) -> Dict[str, Any]:
        keys = sorted(window)
        means = torch.stack([window[k].to(self.device) / n for k in keys])
        means = all_reduce_mean(means, self.env).tolist()
        record: Dict[str, Any] = {"step": self.step, **dict(zip(keys, means))}
        record["lr"] = self.last_lr
        record["epoch"] = self.sampler.epoch_at(self.step)
        record["steps_per_s"] = n / max(seconds, 1e-9)
        record["samples_per_s"] = record["steps_per_s"] * self.cfg.batch_size
        record["time"] = time.time()
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"training loss is {record['loss']} at step {self.step}")
        self.history.append(record)
        if self.is_main:
            append_jsonl(os.path.join(self.cfg.out_dir, LOG_NAME), record)
        return record

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resume needs (collective under DDP: every rank must call it)."""
        rng = all_gather_objects(capture_rng_state(self.generator), self.env)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model_state_dict": self.model.state_dict(),
            "ema_state_dict": self.ema.state_dict(),
            "ema_meta": self.ema.meta(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": {"seed": self.cfg.seed, "step": self.step, "epoch": self.sampler.epoch_at(self.step),
                     "global_batch": self.cfg.batch_size, "world_size": self.env.world_size,
                     "num_samples": len(self.dataset), "hflip": self.sampler.hflip},
            "config": self.cfg.to_dict(),
            "model_config": self.model_config,
            "time_input": self.time_input,
        }

    def run_config(self) -> Dict[str, Any]:
        """What the run folder's ``config.json`` holds: the settings (``hflip`` resolved), the
        model's keywords and the exports' folders."""
        train = dict(self.cfg.to_dict(), hflip=bool(self.sampler.hflip))
        exports = None
        if self.export_spec is not None:
            exports = {"ema": "export/ema", "raw": "export/raw", "default": "ema",
                       "ema_decay": self.cfg.ema_decay, "ema_warmup": self.cfg.ema_warmup}
        return {"train": train, "model": self.model_config, "world_size": self.env.world_size, "exports": exports}

    def save(self) -> Optional[str]:
        """Write a checkpoint for the current step and the exports ``export/ema`` and
        ``export/raw`` (rank 0 writes; all ranks must call)."""
        state = self.state_dict()
        path = None
        if self.is_main:
            path = self.checkpoints.save(state, self.step)
            if self.export_spec is not None:
                from ..models.pretrained import export_folder

                for kind in ("ema", "raw"):
                    self.export_pretrained(export_folder(self.cfg.out_dir, kind), ema=kind == "ema")
                if self.cfg.progress or self.step >= self.cfg.steps:
                    print(f"step {self.step}: exported the EMA weights (decay {self.cfg.ema_decay}"
                          f"{', warm-up' if self.cfg.ema_warmup else ''}; {self.ema.num_updates} updates) to "
                          f"{export_folder(self.cfg.out_dir, 'ema')} (what the run folder gives `sample`) and "
                          f"the raw weights to {export_folder(self.cfg.out_dir, 'raw')}", flush=True)
        barrier(self.env)
        return path

    def export_pretrained(self, folder: str, ema: bool = True) -> str:
        """Write the EMA (default) or raw weights as a checkpoint folder (``config.json`` +
        ``model.safetensors``, recording the model config, ``weights``: "ema"/"raw", the step and
        the EMA settings). Call on rank 0; returns the folder."""
        from ..models.pretrained import save_pretrained

        if self.export_spec is None:
            raise ValueError(f"{type(self.model).__name__} is not a plain U-ViT: it has no model config to export; "
                             "use export_weights(path)")
        module = self.ema.module if ema else self.model
        extra = {"weights": "ema" if ema else "raw", "step": self.step,
                 "ema": {"decay": self.cfg.ema_decay, "warmup": self.cfg.ema_warmup,
                         "num_updates": self.ema.num_updates}}
        return save_pretrained(module, folder, self.export_spec, extra=extra, time_input=self.time_input)

    def load(self, path: str) -> None:
        """Restore model, EMA, optimizer, scheduler, step and RNG states from a checkpoint."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.ema.load_state_dict(ckpt["ema_state_dict"], ckpt.get("ema_meta"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        data = ckpt.get("data", {})
        changed = [k for k, mine in (("seed", self.cfg.seed), ("global_batch", self.cfg.batch_size),
                                     ("num_samples", len(self.dataset)))
                   if k in data and data[k] != mine]
        if changed:
            warnings.warn(f"resuming {path!r} with a different {', '.join(changed)}: the data order "
                          "will differ from the original run")
        rng = ckpt.get("rng") or []
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank], self.generator)
        else:
            warnings.warn(f"{path!r} was written by {len(rng)} rank(s), this run has {self.env.world_size}; "
                          "random streams are re-seeded from (seed, step, rank)")
            seed = mix_seed(self.cfg.seed, self.env.rank, self.step)
            _seed_everything(seed)
            self.generator.manual_seed(seed)
        self.resumed_from = path
        if self.is_main and self.cfg.progress:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def load_initial_weights(self, path: str) -> None:
        """Start from the weights in ``path`` (model and EMA); optimizer and step stay fresh.

        ``path``: any file ``models.load_weights`` reads, a checkpoint folder, or a run folder (its
        ``export/ema``); a config the weights record must agree with this run's model."""
        from ..models import load_weights

        if not os.path.exists(path):
            raise FileNotFoundError(f"init_weights file or folder {path!r} does not exist")
        load_weights(self.model, path)
        self.model.time_input = self.time_input  # resolved with this file's declaration in __init__
        self.ema.copy_from(self.model)

    def export_weights(self, path: str, ema: bool = True) -> None:
        """Write the weights (EMA by default) for sampling, atomically.

        ``path`` ending in ``.pt``/``.pth``/``.safetensors``: one file (``models.save_weights``)
        that records the time input and, for a U-ViT, its model config (``model_config``), so
        ``load_model`` needs no config. Any other path: a checkpoint folder
        (:meth:`export_pretrained`).
        """
        from ..models import save_weights

        module = self.ema.module if ema else self.model
        if self.is_main:
            if os.fspath(path).endswith((".pt", ".pth", ".safetensors")):
                save_weights(module, path, time_input=self.time_input, record_config=self.export_spec is not None)
            else:
                self.export_pretrained(path, ema=ema)
        barrier(self.env)

    def close(self) -> None:
        """Tear down the process group if this trainer started it."""
        cleanup(self.env)


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, loss_fn: Optional[LossFn] = None,
          dataset: Optional[torch.utils.data.Dataset] = None) -> Trainer:
    """Build a :class:`Trainer` from ``cfg``, run it to ``cfg.steps`` and return it.

    The returned trainer holds the trained ``model``, its ``ema`` and the log ``history``.
    """
    trainer = Trainer(cfg, model=model, loss_fn=loss_fn, dataset=dataset)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer
