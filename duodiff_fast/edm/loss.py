"""EDM's training loss and the multistage authors' per-stage variant.

EDM (Karras et al. 2022): ln(sigma) ~ N(P_mean, P_std^2) per image, n ~ N(0, sigma^2),
loss = lambda(sigma) ||D(y + n; sigma) - y||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2.

Multistage (Zhang et al., the authors' ``EDMMultistageLoss``): one draw from that log-normal picks
the stage of the whole batch (so every batch trains one decoder); each image's sigma is then drawn
from the log-normal restricted to that stage's intervals (by rejection, as they do). The stage is
therefore chosen with probability equal to its log-normal mass.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["EDMLoss", "EDMMultistageLoss", "edm_weight", "stage_of_sigma"]


def edm_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, elementwise."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def stage_of_sigma(sigma: float, stage_interval: Sequence[Sequence[Sequence[float]]]) -> int:
    """The stage whose (lo, hi] intervals hold sigma; ValueError when none does."""
    for s, intervals in enumerate(stage_interval):
        for lo, hi in intervals:
            if lo < sigma <= hi:
                return s
    raise ValueError(f"sigma {sigma} lies in no stage interval of {stage_interval}")


class EDMLoss:
    """Per-element EDM loss (B, C, H, W); ``generator`` makes the sigma and noise draws reproducible."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if not P_std > 0 or not sigma_data > 0:
            raise ValueError(f"P_std and sigma_data must be positive, got {P_std}, {sigma_data}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def _lognormal(self, n: int, generator: Optional[torch.Generator]) -> Tensor:
        """(n,) float32 log-normal draws on the CPU (drawn on the generator's device)."""
        dev = generator.device if generator is not None else "cpu"
        z = torch.randn(n, generator=generator, dtype=torch.float32, device=dev).cpu()
        return (z * self.P_std + self.P_mean).exp()

    def sample_sigma(self, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """(batch,) float32 noise levels on the CPU."""
        return self._lognormal(batch, generator)

    def __call__(self, net, images: Tensor, labels: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, sigma: Optional[Tensor] = None) -> Tensor:
        """net: D(x, sigma, labels); images (B, C, H, W) in [-1, 1] -> loss (B, C, H, W).
        ``sigma`` (B,): the batch's noise levels when the caller drew them (else drawn here)."""
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], generator)
        sigma = sigma.to(images.device, torch.float32).reshape(-1, 1, 1, 1)
        dev = generator.device if generator is not None else images.device
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32, device=dev).to(images.device)
        images = images.float()
        denoised = net(images + noise * sigma, sigma.flatten(), labels)
        return edm_weight(sigma, self.sigma_data) * (denoised - images) ** 2


class EDMMultistageLoss(EDMLoss):
    """EDM loss with one stage per batch; ``stage_interval`` as the multistage net holds it (on sigma)."""

    MAX_DRAWS = 1_000_000  # rejection sampling gives up past this (a stage with ~no log-normal mass)

    def __init__(self, stage_interval, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        super().__init__(P_mean, P_std, sigma_data)
        if not stage_interval:
            raise ValueError("stage_interval must list at least one stage")
        self.stage_interval = [[(float(lo), float(hi)) for lo, hi in st] for st in stage_interval]

    def pick_stage(self, generator: Optional[torch.Generator] = None) -> int:
        """The stage of one log-normal draw (redrawn if it falls outside every stage)."""
        for _ in range(self.MAX_DRAWS):
            s = float(self._lognormal(1, generator))
            try:
                return stage_of_sigma(s, self.stage_interval)
            except ValueError:
                continue
        raise RuntimeError(f"no log-normal draw fell in any stage of {self.stage_interval}")

    def sample_sigma_in_stage(self, stage: int, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """(batch,) log-normal draws kept only when inside ``stage``'s intervals."""
        kept, draws = [], 0
        while len(kept) < batch:
            if draws > self.MAX_DRAWS:
                raise RuntimeError(f"stage {stage} {self.stage_interval[stage]} has almost no log-normal mass")
            cand = self._lognormal(max(batch, 64), generator)
            draws += cand.numel()
            inside = torch.zeros_like(cand, dtype=torch.bool)
            for lo, hi in self.stage_interval[stage]:
                inside |= (cand > lo) & (cand <= hi)
            kept.extend(cand[inside].tolist())
        return torch.tensor(kept[:batch], dtype=torch.float32)

    def sample_sigma(self, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.sample_sigma_in_stage(self.pick_stage(generator), batch, generator)
