"""The sinusoidal timestep embedding op: the native kernel of ``duodiff_fast._C`` where
:func:`duodiff_fast.ops.impl.native_timestep_embedding` says it runs, else the PyTorch reference."""
from __future__ import annotations

import math

import torch

from . import impl

__all__ = ["timestep_embedding", "timestep_embedding_reference"]


def timestep_embedding_reference(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding, [cos | sin] halves, as U-ViT (and ADM) compute it (the
    PyTorch reference).

    Args:
        timesteps: (B,) float or int tensor, the value the network is fed (e.g. t * 999).
        dim: embedding width D.
    Returns:
        (B, D) float32 tensor; an odd D gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, D) float32: one native kernel instead of five where it runs (the same float32
    operations, equal to within a few ulps of the arguments), else the reference."""
    if impl.native_timestep_embedding(timesteps):
        return torch.ops.duodiff.timestep_embedding(timesteps, dim, 10000.0)
    return timestep_embedding_reference(timesteps, dim)
