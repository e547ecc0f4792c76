"""Block executors: how one U-ViT or DiT piece runs on one backend, and the one place that picks it.

The layer program (:mod:`duodiff_fast.models.program`) asks :func:`executor_for` once per model
call and then runs every piece through the executor it got:

    embed(model, x, timesteps, y)      (B, C, H, W) -> tokens (B, E + L, D)
    block(blk, x, skip=None)           one transformer layer (skip merge for out-blocks)
    merge_skip(blk, x, skip)           skip_linear(cat[x, skip]) only (ASE's dropped out-blocks)
    transform(blk, x)                  attention + MLP residual branches only
    final(head, extras, channels, x)   LayerNorm, patch prediction, drop extras, unpatchify, conv;
                                       ``head`` is anything with norm / decoder_pred / final_layer
                                       (the U-ViT, an AdaDiff exit head, a multistage decoder)
    timestep_embedding(timesteps, D)   the (B, D) float32 sinusoid
  DiT (adaLN-conditioned):
    dit_embed(model, x, timesteps, y)  (B, C, H, W) -> patch tokens (B, L, D) and c (B, D)
    adaln_block(blk, x, c)             one DiT block: adaLN-Zero attention and MLP branches
    adaln_final(head, x, c, channels)  adaLN LayerNorm, patch prediction, unpatchify -> (B, C_out, H, W)

:class:`TorchExecutor` runs the modules themselves (autograd, gradient checkpointing, the golden
path), with the native time-embedding kernel where :mod:`duodiff_fast.ops.availability` says it runs
on the tensors' device. :class:`TritonExecutor` runs the fused custom ops of
:mod:`duodiff_fast.ops.triton_ops` (inference only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import embedding as ops_embedding
from ..ops import impl
from ..ops import triton_ops
from ..ops.dit_block import dit_block, dit_final_tokens
from .functional import final_layer, unpatchify

__all__ = ["TorchExecutor", "TritonExecutor", "executor_for", "needs_grad"]


def _sinusoid(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, D) float32 time embedding (the op and its implementation choice live in ops/)."""
    return ops_embedding.timestep_embedding(timesteps, dim)


def _batch_timesteps(timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    if timesteps.dim() == 0 or timesteps.shape[0] == 1:
        return timesteps.reshape(1).expand(batch)
    return timesteps


class TorchExecutor:
    """Eager PyTorch: the modules' own forwards (the reference and the autograd path).

    Args:
        checkpoint: run blocks under gradient checkpointing (training with ``use_checkpoint``).
    """

    name = "torch"

    def __init__(self, checkpoint: bool = False):
        self.checkpoint = checkpoint

    def timestep_embedding(self, timesteps: torch.Tensor, dim: int) -> torch.Tensor:
        return _sinusoid(timesteps, dim)

    def embed(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        timesteps = _batch_timesteps(timesteps, x.shape[0])
        return model.embed(x, timesteps, y, sinusoid=self.timestep_embedding(timesteps, model.embed_dim))

    def _run(self, fn, *args):
        if self.checkpoint:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def block(self, blk: nn.Module, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._run(blk, x, skip)

    def merge_skip(self, blk: nn.Module, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        return blk.merge_skip(x, skip)

    def transform(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._run(blk.transform, x)

    def final(self, head: nn.Module, extras: int, channels: int, tokens: torch.Tensor) -> torch.Tensor:
        return final_layer(head, extras, channels, tokens)

    # ------------------------------------------------------------------------------------ DiT
    def dit_embed(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                  y: Optional[torch.Tensor]):
        """``model.embed``: patch tokens + pos_embed (B, L, D) and c (B, D)."""
        timesteps = _batch_timesteps(timesteps, x.shape[0])
        sinusoid = self.timestep_embedding(timesteps, model.t_embedder.frequency_embedding_size)
        return model.embed(x, timesteps, y, sinusoid=sinusoid)

    def adaln_block(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One DiT block conditioned on c: (B, L, D), (B, D) -> (B, L, D)."""
        return self._run(blk, x, c)

    def adaln_final(self, head: nn.Module, tokens: torch.Tensor, c: torch.Tensor, channels: int) -> torch.Tensor:
        """DiT's final layer (``head``: anything with its norm_final / linear / adaLN_modulation) and
        unpatchify: (B, L, D), (B, D) -> (B, channels, H, W)."""
        return unpatchify(head(tokens, c), channels)


def _linear_cublas(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


class TritonExecutor(TorchExecutor):
    """The fused Triton custom ops (no autograd). Matmuls: ``ops.impl.matmul_impl()`` ("triton"
    fused epilogues, or "cublas" bare matmuls with the residual folded into the LayerNorm kernel)."""

    name = "triton"

    def __init__(self):
        super().__init__(checkpoint=False)
        self.matmul = impl.matmul_impl()

    def embed(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """``model.embed`` in one kernel: (B, C, H, W) -> (B, E + L, D)."""
        x = x.to(model.pos_embed.dtype)
        timesteps = _batch_timesteps(timesteps, x.shape[0])
        emb = self.timestep_embedding(timesteps, model.embed_dim)     # (B, D) float32
        if not isinstance(model.time_embed, nn.Identity):
            emb = model.time_embed(emb.to(model.pos_embed.dtype))
        label = model.label_emb.weight if (y is not None and model.is_conditional) else None
        return triton_ops.frontend(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed,
                                 emb.float(), label, y if label is not None else None)

    def block(self, blk: nn.Module, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.transform(blk, self.merge_skip(blk, x, skip))

    def merge_skip(self, blk: nn.Module, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        """skip_linear(cat[x, skip]) without the concatenation; (B, N, W) + (B, N, D) -> (B, N, W)."""
        if blk.skip_linear is None:
            return x
        lin = blk.skip_linear
        if self.matmul == "cublas":
            d = x.shape[-1]
            # cat[x, skip] @ W^T = x @ W[:, :W]^T + skip @ W[:, W:]^T: two matmuls, no concatenation.
            out = F.linear(x, lin.weight[:, :d], lin.bias).flatten(0, -2)
            return torch.addmm(out, skip.flatten(0, -2), lin.weight[:, d:].t()).view(*x.shape[:-1], -1)
        return triton_ops.linear(x, lin.weight, lin.bias, None, skip, False)

    def transform(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Attention and MLP residual branches through the fused ops; (B, N, D) -> (B, N, D)."""
        attn = blk.attn
        h = triton_ops.layernorm(x, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        if self.matmul == "cublas":
            a = triton_ops.attention_qkv(_linear_cublas(h, attn.qkv), attn.num_heads, float(attn.scale))
            h, x = triton_ops.add_layernorm(_linear_cublas(a, attn.proj), x, blk.norm2.weight, blk.norm2.bias,
                                          blk.norm2.eps)
            return x + _linear_cublas(_linear_cublas(h, blk.mlp.fc1, gelu=True), blk.mlp.fc2)
        qkv = triton_ops.linear(h, attn.qkv.weight, attn.qkv.bias, None, None, False)       # (B, N, 3D)
        a = triton_ops.attention_qkv(qkv, attn.num_heads, float(attn.scale))               # (B, N, D)
        x = triton_ops.linear(a, attn.proj.weight, attn.proj.bias, x, None, False)          # x + proj(a)
        h = triton_ops.layernorm(x, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        h = triton_ops.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias, None, None, True)    # gelu(fc1(h))
        return triton_ops.linear(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias, x, None, False)   # x + fc2(h)

    def final(self, head: nn.Module, extras: int, channels: int, tokens: torch.Tensor) -> torch.Tensor:
        """One final-layer kernel (+ cuDNN 3x3 conv): (B, E + L, D) -> (B, C, H, W)."""
        img = triton_ops.final_layer(tokens, head.norm.weight, head.norm.bias, head.norm.eps,
                                   head.decoder_pred.weight, head.decoder_pred.bias, extras, channels)
        return head.final_layer(img)

    # ------------------------------------------------------------------------------------ DiT
    def dit_embed(self, model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                  y: Optional[torch.Tensor]):
        """The module's own embedding (patch conv, t- and label MLPs: B rows of the condition, not
        worth a kernel) on x in the model's dtype: (B, L, D) tokens and c (B, D)."""
        return super().dit_embed(model, x.to(model.pos_embed.dtype), timesteps, y)

    def adaln_block(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One DiT block in seven fused launches (:func:`duodiff_fast.ops.dit_block.dit_block`); the
        (B, 6D) modulation comes from the block's own B-row MLP. (B, L, D), (B, D) -> (B, L, D)."""
        attn, mlp = blk.attn, blk.mlp
        mod = blk.adaLN_modulation(c)  # (B, 6D), official chunk order
        return dit_block(x, mod, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                         mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, attn.num_heads,
                         eps=blk.norm1.eps, matmul=self.matmul)

    def adaln_final(self, head: nn.Module, tokens: torch.Tensor, c: torch.Tensor, channels: int) -> torch.Tensor:
        """DiT's final layer (or an AdaDiff exit head of its shape) on the fused adaLN LayerNorm and
        linear, then unpatchify: (B, L, D), (B, D) -> (B, channels, H, W)."""
        mod = head.adaLN_modulation(c)  # (B, 2D): shift, scale
        out = dit_final_tokens(tokens, mod, head.linear.weight, head.linear.bias, head.norm_final.eps,
                               matmul=self.matmul)
        return unpatchify(out, channels)


def needs_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """True when a call of ``module`` on ``x`` records gradients (then only "torch" can run it)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


def executor_for(requested: str, device: torch.device, grad: bool = False, checkpoint: bool = False):
    """The executor that runs one model call, as :func:`duodiff_fast.ops.impl.layer_impl` decides.

    Args:
        requested: the model's op implementation ("auto", "torch", "triton"); a
            :func:`duodiff_fast.ops.impl.use_impl` block overrides it.
        device: the device of the call's tensors (native and Triton availability are per device).
        grad: the call records gradients (always eager).
        checkpoint: gradient checkpointing of blocks (eager only).
    Raises:
        BackendUnavailable: "triton" was asked for by name and cannot run on ``device``.
    """
    if impl.layer_impl(requested, device, grad) == "triton":
        return TritonExecutor()
    return TorchExecutor(checkpoint=checkpoint)
