"""U-ViT (Bao et al., "All are Worth Words") as the reference PyTorch path.

The constructor keywords, the module tree and therefore the state-dict key names are those of the
official implementation, so published checkpoints load unchanged:

    pos_embed, patch_embed.proj.*, time_embed.{0,2}.* (mlp_time_embed only), label_emb.weight
    (class-conditional only), in_blocks.{i}.*, mid_block.*, out_blocks.{i}.* (with skip_linear),
    norm.*, decoder_pred.*, final_layer.* (conv only)

Token order inside the network: [label token (conditional only), time token, patch tokens].
``depth`` counts in-blocks + out-blocks: depth d gives d//2 in-blocks, one mid-block and d//2
out-blocks (d + 1 transformer layers; DuoDiff's "three-layer" shallow backbone is depth 2).

The forward runs through the layer program (:mod:`duodiff_fast.models.program`) on the executor
picked per call (:mod:`duodiff_fast.models.executor`); the acceleration methods (early exit, block
dropping, multistage decoders) plug into that same program and use the same modules and
parameters. ``op_impl`` ("torch" by default; ``backends.prepare_model(m, "triton")`` sets "triton")
is the op implementation this model's calls ask :mod:`duodiff_fast.ops.impl` for; it is not part of
the state dict (``kernel_backend`` is its former name, kept as an alias).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_image_batch, check_labels, check_timesteps
from .functional import final_layer, init_linear_and_norm, patchify, timestep_embedding, unpatchify  # noqa: F401
from .program import run_model, run_layers


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d with kernel = stride = patch_size."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, D, h, w) -> (B, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, the timm Mlp (module names fc1, fc2). U-ViT uses the exact (erf) GELU,
    DiT the tanh approximation (``approximate="tanh"``)."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    ``upcast`` (default True) computes the attention itself in float32 whatever the input dtype,
    as the official U-ViT does; the "eager-bf16" backend switches it off so attention runs in the
    activations' dtype.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: Optional[float] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.upcast = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3*C) -> (3, B, H, N, Dh): the feature axis of qkv is ordered (K, H, Dh).
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.upcast:
            qkv = qkv.float()
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, c).to(x.dtype)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first merge the long skip: skip_linear(cat[x, skip])."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        skip: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def merge_skip(self, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        """Apply the long skip connection (out-blocks only); (B, N, D) x2 -> (B, N, D)."""
        if self.skip_linear is None:
            return x
        return self.skip_linear(torch.cat([x, skip], dim=-1))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Attention and MLP residual branches; (B, N, D) -> (B, N, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.transform(self.merge_skip(x, skip))


class UViT(nn.Module):
    """U-ViT noise-prediction network.

    Args (the official constructor keywords):
        img_size: input height = width (pixels, or latent size for latent models).
        patch_size: patch side p; img_size must be divisible by it.
        in_chans: input and output channels C.
        embed_dim: token width D.
        depth: in-blocks + out-blocks (even); there is also one mid-block.
        num_heads: attention heads (D must be divisible by it).
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the qkv projection.
        qk_scale: attention scale override (default head_dim ** -0.5).
        mlp_time_embed: pass the sinusoidal time embedding through Linear-SiLU-Linear.
        num_classes: label embeddings including the null class; <= 0 for unconditional models.
        conv: apply a 3x3 conv after unpatchify.
        skip: long skip connections from in-blocks to out-blocks.
        use_checkpoint: gradient checkpointing of blocks during training (saves memory).

    forward(x (B, C, H, W), timesteps (B,), y (B,) long or None) -> eps (B, C, H, W).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        norm_layer: type = nn.LayerNorm,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        use_checkpoint: bool = False,
        conv: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        if norm_layer is not nn.LayerNorm:
            raise ValueError("only norm_layer=nn.LayerNorm is supported (the official U-ViT choice)")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        if depth < 0 or depth % 2:
            raise ValueError(f"depth counts in- plus out-blocks and must be even and >= 0, got {depth}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.op_impl = "torch"  # "auto" / "torch" / "triton": see duodiff_fast.ops.impl
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            qk_scale=qk_scale, mlp_time_embed=mlp_time_embed, num_classes=num_classes,
            conv=conv, skip=skip,
        )

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.num_patches = (img_size // patch_size) ** 2
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.num_patches, embed_dim))

        def block(use_skip: bool = False) -> Block:
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, skip=use_skip)

        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Initialise as the official code does: trunc-normal(0.02) Linear weights and pos_embed,
        zero biases, unit LayerNorms (convs and embeddings keep PyTorch's defaults)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_linear_and_norm(self)

    # ------------------------------------------------------------ properties
    @property
    def kernel_backend(self) -> str:
        """Former name of :attr:`op_impl`."""
        return self.op_impl

    @kernel_backend.setter
    def kernel_backend(self, name: str) -> None:
        self.op_impl = name

    @property
    def depth(self) -> int:
        return 2 * len(self.in_blocks)

    @property
    def num_layers(self) -> int:
        """Transformer layers: in-blocks + mid-block + out-blocks (depth + 1)."""
        return self.depth + 1

    @property
    def is_conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_class(self) -> Optional[int]:
        """The label id used for the unconditional branch of classifier-free guidance."""
        return self.num_classes - 1 if self.is_conditional else None

    def layers(self) -> List[Block]:
        """All transformer layers in execution order (in-blocks, mid-block, out-blocks)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    # ---------------------------------------------------------------- checks
    def check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Raise a clear error for a wrong image shape, dtype, timestep shape or label."""
        check_image_batch(x, self.in_chans, self.img_size)
        check_timesteps(timesteps, x.shape[0], -math.inf, math.inf)
        check_labels(y, x.shape[0], self.num_classes)

    # --------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None,
              sinusoid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token front end: (B, C, H, W) -> (B, extras + L, D) with position embedding added.

        ``sinusoid``: the (B, D) float32 time embedding when the caller computed it already.
        """
        tokens = self.patch_embed(x)  # (B, L, D)
        b = tokens.shape[0]
        if timesteps.dim() == 0 or timesteps.shape[0] == 1:
            timesteps = timesteps.reshape(1).expand(b)
        if sinusoid is None:
            sinusoid = timestep_embedding(timesteps, self.embed_dim)
        # The sinusoid is computed in float32; the time MLP (if any) runs in the tokens' dtype.
        time_token = self.time_embed(sinusoid.to(tokens.dtype)).unsqueeze(1)
        front = [time_token.to(tokens.dtype)]
        if y is not None:
            front.insert(0, self.label_emb(y).unsqueeze(1).to(tokens.dtype))
        tokens = torch.cat([*front, tokens], dim=1)  # (B, extras + L, D)
        return tokens + self.pos_embed

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """All transformer layers with the long skips (eager); (B, N, D) -> (B, N, D)."""
        return run_layers(self, tokens)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final layer: LayerNorm, patch prediction, drop extra tokens, unpatchify, conv.

        (B, extras + L, D) -> (B, C, H, W).
        """
        return final_layer(self, self.extras, self.in_chans, tokens)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.check_inputs(x, timesteps, y)  # value checks would synchronise under capture
        return run_model(self, x, timesteps, y)

    def set_attention_upcast(self, upcast: bool) -> "UViT":
        """Compute attention in float32 (True, official behaviour) or in the activations' dtype."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.upcast = upcast
        return self
