"""Pure functions of the U-ViT that the model, the layer program and the executors share.

    timestep_embedding   (B,) timestep inputs -> (B, D) float32 sinusoid ([cos | sin] halves)
    patchify/unpatchify  images <-> patch tokens
    final_layer          LayerNorm, patch prediction, drop extra tokens, unpatchify, conv
    init_linear_and_norm the official initialisation of Linear and LayerNorm modules
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.embedding import timestep_embedding_reference


# The sinusoidal time embedding is an op: it lives in duodiff_fast.ops.embedding (the native kernel
# or this reference, chosen there); the reference stays importable from here.
timestep_embedding = timestep_embedding_reference


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), patches in row-major order, channels last."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); inverse of :func:`patchify` for square grids."""
    b, n, d = tokens.shape
    p = int(round(math.sqrt(d // channels)))
    h = w = int(round(math.sqrt(n)))
    if p * p * channels != d or h * w != n:
        raise ValueError(f"cannot unpatchify tokens of shape {tuple(tokens.shape)} with {channels} channels")
    x = tokens.reshape(b, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * p, w * p)


def init_linear_and_norm(module: nn.Module) -> None:
    """The official U-ViT initialisation of every Linear (trunc-normal(0.02) weight, zero bias) and
    LayerNorm (unit weight, zero bias) inside ``module``, in module order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def final_layer(head: nn.Module, extras: int, channels: int, tokens: torch.Tensor) -> torch.Tensor:
    """U-ViT's final layer with the modules of ``head`` (``norm``, ``decoder_pred``, ``final_layer``):
    LayerNorm, patch prediction, drop the ``extras`` leading tokens, unpatchify, conv.

    (B, extras + L, D) -> (B, C, H, W). The U-ViT, AdaDiff's exit heads and multistage decoders share it.
    """
    x = head.decoder_pred(head.norm(tokens))  # (B, extras + L, p*p*C)
    x = unpatchify(x[:, extras:, :], channels)  # (B, C, H, W)
    return head.final_layer(x)
