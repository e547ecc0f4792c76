"""The Triton custom ops (namespace ``duodiff_triton``), one per fused kernel family.

Each op is registered with ``torch.library.custom_op`` and a fake (meta) implementation, so
``torch.compile`` traces through it and CUDA graph capture records its launches. The kernels
themselves live in ``duodiff_fast.kernels``; whether they can run on a device is answered by
:mod:`duodiff_fast.ops.availability`, and which path a model call takes is chosen by
:mod:`duodiff_fast.models.executor`.
"""
from typing import List, Optional, Tuple

import torch

# ------------------------------------------------------------------------------ custom ops
# The kernels module is imported lazily (inside each op), so importing duodiff_fast.dispatch never
# imports triton and never touches CUDA; TRITON_INTERPRET is read when the kernels are first used.
def _k():
    import duodiff_fast.kernels as kernels

    return kernels


def _on_device_of(t: torch.Tensor):
    """Enter ``t``'s CUDA device for the whole launcher (allocation, tuning, launch): Triton launches
    on the current device, not the tensors' (``kernels._common.device_guard``; no-op on the CPU)."""
    from duodiff_fast.kernels import _common

    return _common.device_guard(t)


@torch.library.custom_op("duodiff_triton::layernorm", mutates_args=())
def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis (Triton). (..., D) -> (..., D)."""
    with _on_device_of(x):
        return _k().layernorm(x, weight, bias, eps)


@layernorm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("duodiff_triton::add_layernorm", mutates_args=())
def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x + residual), x + residual) in one pass (Triton)."""
    with _on_device_of(x):
        return _k().layernorm(x, weight, bias, eps, residual=residual)


@add_layernorm.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("duodiff_triton::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    x2: Optional[torch.Tensor],
    gelu: bool,
) -> torch.Tensor:
    """``epilogue(cat[x, x2] @ weight^T + bias)`` (Triton); see ``kernels.linear``."""
    with _on_device_of(x):
        return _k().linear(x, weight, bias, activation="gelu" if gelu else None, residual=residual, x2=x2)


@linear.register_fake
def _(x, weight, bias, residual, x2, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("duodiff_triton::adaln_layernorm", mutates_args=())
def adaln_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """DiT's ``modulate(norm(x), shift, scale)``, norm without affine (Triton).
    x (B, N, D), shift/scale (B, D) (strided chunk views allowed) -> (B, N, D)."""
    with _on_device_of(x):
        return _k().adaln_layernorm(x, shift, scale, eps)


@adaln_layernorm.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("duodiff_triton::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu_tanh(x @ weight^T + bias)`` (Triton; DiT's fc1): (..., K) -> (..., N)."""
    with _on_device_of(x):
        return _k().linear(x, weight, bias, activation="gelu_tanh")


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("duodiff_triton::linear_gated_residual", mutates_args=())
def linear_gated_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``residual + gate[:, None, :] * (x @ weight^T + bias)`` (Triton; DiT's gated proj and fc2).
    x (B, T, K), residual (B, T, N), gate (B, N) (a strided chunk view allowed) -> (B, T, N)."""
    with _on_device_of(x):
        return _k().linear(x, weight, bias, residual=residual, gate=gate)


@linear_gated_residual.register_fake
def _(x, weight, bias, residual, gate):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("duodiff_triton::attention_qkv", mutates_args=())
def attention_qkv(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention from the fused qkv output: (B, N, 3C) -> (B, N, C) (Triton)."""
    with _on_device_of(qkv):
        return _k().attention_qkv(qkv, num_heads, scale)


@attention_qkv.register_fake
def _(qkv, num_heads, scale):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3))


@torch.library.custom_op("duodiff_triton::frontend", mutates_args=())
def frontend(
    images: torch.Tensor,
    patch_weight: torch.Tensor,
    patch_bias: torch.Tensor,
    pos_embed: torch.Tensor,
    time_token: torch.Tensor,
    label_table: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
) -> torch.Tensor:
    """U-ViT token front end: (B, C, H, W) -> (B, E + L, D) (Triton)."""
    with _on_device_of(images):
        return _k().frontend(images, patch_weight, patch_bias, pos_embed, time_token, label_table, y)


@frontend.register_fake
def _(images, patch_weight, patch_bias, pos_embed, time_token, label_table, y):
    return patch_weight.new_empty((images.shape[0], pos_embed.shape[-2], patch_weight.shape[0]))


@torch.library.custom_op("duodiff_triton::final_layer", mutates_args=())
def final_layer(
    tokens: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    pred_weight: torch.Tensor,
    pred_bias: torch.Tensor,
    extras: int,
    channels: int,
) -> torch.Tensor:
    """LayerNorm + decoder_pred + drop extras + unpatchify: (B, E + L, D) -> (B, C, H, W) (Triton)."""
    with _on_device_of(tokens):
        return _k().final_layer(tokens, norm_weight, norm_bias, eps, pred_weight, pred_bias, extras, channels)


@final_layer.register_fake
def _(tokens, norm_weight, norm_bias, eps, pred_weight, pred_bias, extras, channels):
    b, nt, _ = tokens.shape
    grid = int(round((nt - extras) ** 0.5))
    p = int(round((pred_weight.shape[0] // channels) ** 0.5))
    return tokens.new_empty((b, channels, grid * p, grid * p))


def registered_ops() -> List[str]:
    """Qualified names of the custom ops this module registers."""
    return [f"duodiff_triton::{n}" for n in
            ("layernorm", "add_layernorm", "adaln_layernorm", "linear", "linear_gelu_tanh",
             "linear_gated_residual", "attention_qkv", "frontend", "final_layer")]
