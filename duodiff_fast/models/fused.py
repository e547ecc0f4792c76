"""The fused inference path of the U-ViT: the same modules and parameters, run through Triton.

:func:`fused_forward` computes ``UViT.forward`` with the custom ops of
:mod:`duodiff_fast.dispatch` (one front-end kernel, per block: LayerNorm, qkv matmul, attention,
proj + residual, LayerNorm, fc1 + GELU, fc2 + residual, and for out-blocks the two-input
skip_linear; one final-layer kernel, then cuDNN's 3x3 conv when the model has one).

:class:`FusedUViT` wraps a :class:`~duodiff_fast.models.uvit.UViT` (it owns no parameters of its
own) and picks the path per call through :func:`duodiff_fast.dispatch.resolve_backend`: calls that
need gradients, and backend "torch", run the wrapped module unchanged. Everything else the methods
read (``in_chans``, ``img_size``, ``num_classes``, ``patch_size``, ``is_conditional``,
``null_class``, ``embed``/``run_blocks``/``decode``, ``parameters()``) is the wrapped model's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch
from .uvit import Block, UViT, timestep_embedding


def _time_token(model: UViT, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, D) time token in float32 (B rows: computed by PyTorch, not worth a kernel)."""
    if timesteps.dim() == 0 or timesteps.shape[0] == 1:
        timesteps = timesteps.reshape(1).expand(batch)
    emb = timestep_embedding(timesteps, model.embed_dim)
    if not isinstance(model.time_embed, nn.Identity):
        dtype = model.pos_embed.dtype
        emb = model.time_embed(emb.to(dtype))
    return emb.float()


def fused_embed(model: UViT, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    """``model.embed`` in one kernel: (B, C, H, W) -> (B, E + L, D)."""
    time_token = _time_token(model, timesteps, x.shape[0])
    label = model.label_emb.weight if (y is not None and model.is_conditional) else None
    return dispatch.frontend(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                             model.pos_embed, time_token, label, y if label is not None else None)


def _linear_cublas(x, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


def fused_block(blk: Block, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``blk(x, skip)`` through the fused ops; (B, N, D) -> (B, N, D)."""
    attn = blk.attn
    if dispatch.matmul_impl() == "cublas":
        return _block_cublas(blk, x, skip)
    if blk.skip_linear is not None:
        # skip_linear(cat[x, skip]) without the concatenation.
        x = dispatch.linear(x, blk.skip_linear.weight, blk.skip_linear.bias, None, skip, False)
    h = dispatch.layernorm(x, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = dispatch.linear(h, attn.qkv.weight, attn.qkv.bias, None, None, False)       # (B, N, 3D)
    a = dispatch.attention_qkv(qkv, attn.num_heads, float(attn.scale))               # (B, N, D)
    x = dispatch.linear(a, attn.proj.weight, attn.proj.bias, x, None, False)          # x + proj(a)
    h = dispatch.layernorm(x, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    h = dispatch.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias, None, None, True)    # gelu(fc1(h))
    return dispatch.linear(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias, x, None, False)   # x + fc2(h)


def _block_cublas(blk: Block, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
    """The same block with cuBLAS matmuls; the residual add before norm2 is fused into LayerNorm."""
    attn = blk.attn
    if blk.skip_linear is not None:
        d = x.shape[-1]
        w = blk.skip_linear.weight
        # cat[x, skip] @ W^T = x @ W[:, :D]^T + skip @ W[:, D:]^T: two matmuls, no concatenation.
        x = torch.addmm(F.linear(x, w[:, :d], blk.skip_linear.bias).flatten(0, -2),
                        skip.flatten(0, -2), w[:, d:].t()).view_as(x)
    h = dispatch.layernorm(x, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    a = dispatch.attention_qkv(_linear_cublas(h, attn.qkv), attn.num_heads, float(attn.scale))
    h, x = dispatch.add_layernorm(_linear_cublas(a, attn.proj), x, blk.norm2.weight, blk.norm2.bias,
                                  blk.norm2.eps)
    return x + _linear_cublas(_linear_cublas(h, blk.mlp.fc1, gelu=True), blk.mlp.fc2)


def fused_decode(model: UViT, tokens: torch.Tensor) -> torch.Tensor:
    """``model.decode`` with one final-layer kernel (+ cuDNN 3x3 conv): (B, E+L, D) -> (B, C, H, W)."""
    img = dispatch.final_layer(tokens, model.norm.weight, model.norm.bias, model.norm.eps,
                               model.decoder_pred.weight, model.decoder_pred.bias, model.extras,
                               model.in_chans)
    return model.final_layer(img)


def fused_forward(model: UViT, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``model(x, timesteps, y)`` through the Triton kernels (inference only, no autograd)."""
    x = fused_embed(model, x, timesteps, y)                  # (B, E + L, D)
    skips = []
    for blk in model.in_blocks:
        x = fused_block(blk, x)
        skips.append(x)
    x = fused_block(model.mid_block, x)
    for blk in model.out_blocks:
        x = fused_block(blk, x, skips.pop())
    return fused_decode(model, x)                            # (B, C, H, W)


class FusedUViT(nn.Module):
    """A U-ViT that runs its inference forward on the backend chosen by :mod:`duodiff_fast.dispatch`.

    Args:
        model: the UViT (its modules and parameters are used as they are, not copied).
        backend: "auto" (Triton where it runs, else the reference with one warning), "triton"
            (an error where it cannot run) or "torch".
    """

    def __init__(self, model: UViT, backend: str = "auto"):
        super().__init__()
        if not isinstance(model, UViT):
            raise TypeError(f"FusedUViT wraps a UViT, got {type(model).__name__}")
        self.uvit = model
        self.backend = dispatch.check_backend_choice(backend)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Read _modules from __dict__: during copy/unpickling it may not exist yet.
            inner = self.__dict__.get("_modules", {}).get("uvit")
            if inner is None:
                raise
            return getattr(inner, name)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.uvit.parameters())

    def active_backend(self, x: torch.Tensor) -> str:
        """The backend ("torch" or "triton") a call with input ``x`` runs on now."""
        return dispatch.resolve_backend(self.backend, x.device, self._needs_grad(x))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.active_backend(x) == "torch":
            return self.uvit(x, timesteps, y)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing:  # value checks would sync the device
            self.uvit.check_inputs(x, timesteps, y)
        dtype = self.uvit.pos_embed.dtype
        return fused_forward(self.uvit, x.to(dtype), timesteps, y)

    def set_attention_upcast(self, upcast: bool) -> "FusedUViT":
        """Applies to the reference path only (the Triton attention always accumulates in float32)."""
        self.uvit.set_attention_upcast(upcast)
        return self
