"""``duodiff-fast sample --solver heun``: EDM's Heun sampler on EDM's DDPM++ U-Net or the multistage
authors' U-Net, through the same sharded, resumable runner as the U-ViT methods.

    duodiff-fast sample --solver heun --config edm-cifar10-ddpmpp --checkpoint edm.pt --steps 18 ...
    duodiff-fast sample --solver heun --config auto --checkpoint converted.pt ...   # config in the file

Sample i's starting noise is drawn from its own generator seeded ``mix_seed(seed, i)`` (and churn
noise, when on, from the same per-sample stream), so a run's images do not depend on the batch size.
The runner stores images as round((clamp(x, -1, 1) + 1) * 127.5) in uint8, as for every method.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["add_heun_options", "heun_config_from_args", "EDMSampleJob", "is_edm_run"]


def add_heun_options(p: argparse.ArgumentParser) -> None:
    """EDM Heun settings of ``sample`` (``--steps`` is EDM's N; NFE = 2N - 1)."""
    p.add_argument("--sigma-min", type=float, default=0.002, help="heun: lowest noise level (default 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="heun: highest noise level (default 80)")
    p.add_argument("--rho", type=float, default=7.0, help="heun: grid exponent (default 7)")
    p.add_argument("--s-churn", type=float, default=0.0, help="heun: churn S_churn (default 0: deterministic)")
    p.add_argument("--s-min", type=float, default=0.0, help="heun: churn window lower noise level (default 0)")
    p.add_argument("--s-max", type=float, default=math.inf, help="heun: churn window upper noise level (default inf)")
    p.add_argument("--s-noise", type=float, default=1.0, help="heun: churn noise scale S_noise (default 1)")


def is_edm_run(args) -> bool:
    """True when ``sample`` runs an EDM model (``--solver heun``); refuses mixing EDM and U-ViT settings."""
    from ..edm import EDM_CONFIGS

    edm_config = args.config in EDM_CONFIGS or args.config == "auto"
    if args.solver == "heun" and not edm_config:
        raise ValueError(f"--solver heun is EDM's sampler: --config must name an EDM model ({sorted(EDM_CONFIGS)}) "
                         f"or be 'auto' (config read from a converted --checkpoint), got {args.config!r}")
    if edm_config and args.solver != "heun":
        raise ValueError(f"{args.config!r} is an EDM model: sample it with --solver heun")
    return edm_config


def heun_config_from_args(args):
    from ..edm import HeunConfig

    return HeunConfig(num_steps=18 if args.steps is None else int(args.steps), sigma_min=args.sigma_min,
                      sigma_max=args.sigma_max, rho=args.rho, S_churn=args.s_churn, S_min=args.s_min,
                      S_max=args.s_max, S_noise=args.s_noise)


@dataclass(frozen=True)
class _EDMSpec:
    """The method description the sample runner reads (label for messages and the manifest)."""

    model_type: str

    @property
    def label(self) -> str:
        return "multistage edm heun" if self.model_type == "MultistageUNet" else "edm heun"


class EDMSampleJob:
    """The EDM counterpart of :class:`~duodiff_fast.eval.sample_cmd.SampleJob` (same interface)."""

    def __init__(self, args, device: torch.device):
        from ..edm import build_edm_net, get_edm_config, heun_nfe, normalize_config
        from ..edm.backends import prepare_edm_net
        from ..edm.checkpoint import load_edm_net
        from .manifest import checkpoint_hashes

        # (eval's parser has no --t-s/--method: getattr)
        unsupported = [flag for flag, on in (("--t-s", getattr(args, "t_s", 0)),
                                             ("--shallow-checkpoint", args.shallow_checkpoint),
                                             ("--cfg-scale", args.cfg_scale), ("--autoencoder", args.autoencoder),
                                             ("--schedule", args.schedule), ("--use-ema", args.use_ema),
                                             ("--clip-denoised", getattr(args, "clip_denoised", False)),
                                             ("--thresholding", getattr(args, "thresholding", False)),
                                             ("--method", getattr(args, "method", None) not in (None, "base"))) if on]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)} do not apply to EDM models (--solver heun)")
        self.args, self.device = args, device
        self.heun = heun_config_from_args(args)
        if args.random_weights:
            if args.config == "auto":
                raise ValueError("--config auto reads the config from --checkpoint; --random-weights needs a named config")
            torch.manual_seed(args.seed)
            config = normalize_config(get_edm_config(args.config))
            net = build_edm_net(config)
            files = {}
        else:
            if not args.checkpoint:
                raise ValueError("--checkpoint is required (or --random-weights)")
            net, config = load_edm_net(args.checkpoint, args.config)
            files = {"full": args.checkpoint}
        self.config = config
        self.spec = _EDMSpec(config["model_type"])
        self.net = prepare_edm_net(net, args.backend, device, copy_model=False)
        self.label_dim = int(config.get("label_dim", 0))
        self.shape = (int(config["img_channels"]), int(config["img_resolution"]), int(config["img_resolution"]))
        self.as_uint8 = True
        self.nfe = heun_nfe(self.heun.num_steps)
        self.checkpoints = checkpoint_hashes(files)
        self._labels(np.arange(1))  # bad --class-labels fail before any sampling

    def settings(self) -> Dict[str, object]:
        a = self.args
        return {
            "config": a.config, "model_config": self.config, "method": "edm", "solver": "heun",
            "heun": {k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                     for k, v in vars(self.heun).items()},
            "nfe": self.nfe, "checkpoints": {r: c["sha256"] for r, c in self.checkpoints.items()},
            "random_weights": bool(a.random_weights), "weights_seed": a.seed, "seed": a.seed,
            "class_labels": a.class_labels or "random", "backend": a.backend, "output": "uint8",
        }

    def _labels(self, idx: np.ndarray) -> Optional[np.ndarray]:
        from .sample_cmd import sample_labels

        if not self.label_dim:
            return sample_labels(idx, self.args.seed, self.args.class_labels, 0)
        # sample_labels keeps its last id as a null class; EDM's conditional nets have none.
        labels = sample_labels(idx, self.args.seed, self.args.class_labels, self.label_dim + 1)
        if labels.size and int(labels.max()) >= self.label_dim:
            raise ValueError(f"class ids must lie in [0, {self.label_dim - 1}], got {int(labels.max())}")
        return labels

    def produce(self, start: int, count: int):
        from ..edm import heun_sample
        from ..samplers import NoiseSource, seeds_for

        idx = np.arange(start, start + count)
        labels = self._labels(idx)
        noise = NoiseSource(seeds_for(self.args.seed, start, count), device=self.device)
        latents = noise.initial((count, *self.shape))
        y = None if labels is None else torch.from_numpy(labels).to(self.device)
        with torch.inference_mode():
            x0 = heun_sample(self.net, latents, self.heun, class_labels=y,
                             randn_like=lambda x: noise.step_noise(x.shape).to(x.dtype))
        return x0.float().cpu(), labels
