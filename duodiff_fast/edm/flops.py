"""Compute per network evaluation, as the multistage paper's Tables 1 and 2 report it.

A multistage net runs a different decoder in each stage, so the cost of a sampling run is the
GFLOPs of each evaluation's stage, averaged over the run's evaluations ("GFLOPs per evaluation
weighted by the steps in each stage"). FLOPs are counted by PyTorch's ``FlopCounterMode`` for one
image (matmuls, convolutions, attention; 2 FLOPs per multiply-add; normalisations and
elementwise ops are not counted).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .sampler import HeunConfig, sigma_grid
from .unet import MultistageUNet

__all__ = ["forward_gflops", "heun_eval_sigmas", "weighted_gflops"]


def forward_gflops(net, sigma: float = 1.0, stage: Optional[int] = None) -> float:
    """GFLOPs of one evaluation D(x; sigma) for a batch of one image (``stage`` forces a decoder)."""
    p = next(net.parameters())
    x = torch.zeros(1, net.img_channels, net.img_resolution, net.img_resolution, device=p.device)
    s = torch.full((1,), float(sigma), device=p.device)
    labels = torch.zeros(1, dtype=torch.long, device=p.device) if net.label_dim else None
    kwargs = {} if stage is None else {"stage": stage}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x, s, labels, **kwargs)
    return counter.get_total_flops() / 1e9


def heun_eval_sigmas(config: HeunConfig) -> List[float]:
    """The noise level of each of the 2N - 1 evaluations of a Heun run (t_hat_i, then t_{i+1} when corrected)."""
    grid = sigma_grid(config.num_steps, config.sigma_min, config.sigma_max, config.rho)
    out = []
    n = config.num_steps
    for i in range(n):
        t = float(grid[i])
        gamma = min(config.S_churn / n, math.sqrt(2) - 1) if config.S_min <= t <= config.S_max else 0.0
        out.append(t * (1 + gamma))
        if i < n - 1:
            out.append(float(grid[i + 1]))
    return out


def weighted_gflops(net, config: HeunConfig) -> Dict[str, object]:
    """{"gflops_per_eval": mean over the run's evaluations, "nfe", "evals_per_stage", "gflops_per_stage"}."""
    sigmas = heun_eval_sigmas(config)
    model = net.model
    if isinstance(model, MultistageUNet):
        from .unet import stage_from_sigma

        stages = [stage_from_sigma(s, model.stage_interval) for s in sigmas]
        per_stage = [forward_gflops(net, stage=s) for s in range(model.stage_num)]
    else:
        stages = [0] * len(sigmas)
        per_stage = [forward_gflops(net)]
    counts = [stages.count(s) for s in range(len(per_stage))]
    mean = sum(per_stage[s] for s in stages) / len(stages)
    return {"gflops_per_eval": mean, "nfe": len(sigmas), "evals_per_stage": counts, "gflops_per_stage": per_stage}
