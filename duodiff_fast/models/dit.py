"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") as the reference PyTorch path.

The constructor keywords and the module tree -- hence the state-dict key names -- are those of the
official implementation (facebookresearch/DiT), so ``DiT-XL-2-256x256.pt`` loads unchanged:

    pos_embed (fixed 2-D sin-cos, stored), x_embedder.proj.*, t_embedder.mlp.{0,2}.*,
    y_embedder.embedding_table.weight, blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
    adaLN_modulation.1}.*, final_layer.{linear, adaLN_modulation.1}.*

Tokens are the patches only. Every block is conditioned through adaLN-Zero on
c = t_embedder(t) + y_embedder(y): ``SiLU -> Linear(D, 6D)`` gives shift/scale/gate for the
attention and the MLP branch, ``x = x + gate * branch(LN(x) * (1 + scale) + shift)`` with
LayerNorms without affine (eps 1e-6) and the tanh-approximated GELU. The final layer is adaLN
(shift/scale from ``Linear(D, 2D)``), LayerNorm, ``Linear(D, p*p*out_channels)``, unpatchify.
With ``learn_sigma`` the output has 2 x in_channels: eps, then the variance interpolation value v
in [-1, 1] of the improved-DDPM diffusion (:mod:`duodiff_fast.samplers.improved_ddpm`).

Package conventions (shared with :class:`~duodiff_fast.models.uvit.UViT` so that the samplers,
methods and CLI treat both alike): ``in_chans``, ``img_size``, ``embed_dim``; ``num_classes``
counts the rows of the label table *including* the null class (official ``num_classes + 1`` when
``class_dropout_prob > 0``), ``null_class`` is the last row; ``config`` keeps the official keywords.

The forward runs through the layer program (:mod:`duodiff_fast.models.program`, the DiT backbone:
c carried per row, adaLN blocks, adaLN final layer) on the executor picked per call, so ASE's
block dropping and the other methods use the same path.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..validation import check_image_batch, check_labels, check_timesteps
from .functional import timestep_embedding, unpatchify
from .program import run_layers, run_model
from .uvit import Attention, Mlp, PatchEmbed

FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoid fed to the timestep MLP
NORM_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: (B, N, D) * (1 + (B, D)) + (B, D) -> (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of DiT (MAE's): (grid*grid, dim) float32.

    The first half of the channels encodes the column, the second the row (the official grid puts
    the width axis first), each as [sin | cos] of
    position * 10000^(-k / (dim/4)); computed in float64 and rounded once, as the official numpy code.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    pos = np.arange(grid, dtype=np.float64)
    rows, cols = np.repeat(pos, grid), np.tile(pos, grid)  # token k = (k // grid, k % grid)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(p: np.ndarray) -> np.ndarray:
        out = np.outer(p, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(cols), one_axis(rows)], axis=1)).float()


class TimestepEmbedder(nn.Module):
    """Step index -> (B, D): the 256-wide [cos | sin] sinusoid through Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor, sinusoid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if sinusoid is None:
            sinusoid = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(sinusoid.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids -> (B, D); with ``dropout_prob > 0`` the table has one more row, the null class,
    and training replaces labels by it at that rate (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Labels with a random subset (or ``force_drop_ids == 1``) replaced by the null class."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c (B, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, D) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale), LayerNorm, Linear(D, p*p*out_channels): (B, L, D), c -> (B, L, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT noise-prediction network (class-conditional, latent or pixel space).

    Args (the official constructor keywords):
        input_size: latent (or image) side H = W; divisible by ``patch_size``.
        patch_size: patch side p (2, 4 or 8 for the published sizes).
        in_channels: input channels C (4 for SD latents).
        hidden_size: token width D (divisible by num_heads and by 4).
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        class_dropout_prob: label dropout rate in training; > 0 adds the null-class row.
        num_classes: real classes (1000 for ImageNet), not counting the null class.
        learn_sigma: output 2 x C channels (eps and the variance interpolation value).

    forward(x (B, C, H, W), t (B,) step index, y (B,) long) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if depth < 0 or num_classes < 1 or not 0 <= class_dropout_prob < 1:
            raise ValueError(f"need depth >= 0, num_classes >= 1 and class_dropout_prob in [0, 1); got {depth}, "
                             f"{num_classes}, {class_dropout_prob}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.use_checkpoint = False
        # Official behaviour: labels drop to the null class inside the forward in training. The
        # package's trainer turns this off and drops them in its objective (reproducible draws).
        self.label_dropout_in_forward = True
        self.op_impl = "torch"  # "auto" / "torch" / "triton": see duodiff_fast.ops.impl

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        # A Parameter without gradient, as the official code (so it is in the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """The official initialisation: xavier-uniform Linear weights and zero biases, the sin-cos
        pos_embed, the patch conv as a Linear, N(0, 0.02) label table and timestep MLP, and zero
        adaLN modulations and output layer (adaLN-Zero: a fresh DiT outputs zeros)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(self.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------ properties
    extras = 0  # tokens besides the patches (U-ViT has label and time tokens; DiT none)

    @property
    def in_chans(self) -> int:
        return self.in_channels

    @property
    def img_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def embed_dim(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        """Rows of the label table, the null class included (the package's convention)."""
        return int(self.y_embedder.embedding_table.num_embeddings)

    @property
    def is_conditional(self) -> bool:
        return True

    @property
    def null_class(self) -> Optional[int]:
        """The label id of the unconditional branch (official ``num_classes``); None without one."""
        return self.y_embedder.num_classes if self.y_embedder.dropout_prob > 0 else None

    def layers(self) -> List[DiTBlock]:
        """The transformer blocks in execution order."""
        return list(self.blocks)

    # ---------------------------------------------------------------- checks
    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Raise a clear error for a wrong image shape, dtype, timestep shape or label."""
        check_image_batch(x, self.in_channels, self.img_size)
        check_timesteps(t, x.shape[0], -math.inf, math.inf)
        check_labels(y, x.shape[0], self.num_classes)

    # --------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              sinusoid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens + pos_embed (B, L, D) and the conditioning c = t-embedding + label embedding (B, D).

        ``sinusoid``: the (B, 256) float32 time sinusoid when the caller computed it already.
        """
        tokens = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        if t.dim() == 0 or t.shape[0] == 1:
            t = t.reshape(1).expand(x.shape[0])
        c = self.t_embedder(t, sinusoid) + self.y_embedder(y, self.training and self.label_dropout_in_forward)
        return tokens, c.to(tokens.dtype)

    def decode(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: (B, L, D), (B, D) -> (B, out_channels, H, W)."""
        return unpatchify(self.final_layer(tokens, c), self.out_channels)

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        """The first ``keep`` (default all) blocks through the layer program, eager (autograd,
        gradient checkpointing with ``use_checkpoint``): (B, L, D), (B, D) -> (B, L, D)."""
        return run_layers(self, tokens, c, keep)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.check_inputs(x, t, y)  # value checks would synchronise under capture
        return run_model(self, x, t, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance exactly as the official code: the batch is [cond rows, null rows];
        the network runs on the first half twice; ``uncond + s (cond - uncond)`` is applied to the
        first 3 output channels only (kept for exact reproduction of the published samples) and the
        other channels stay per half. (2B, C, H, W) -> (2B, out_channels, H, W)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def set_attention_upcast(self, upcast: bool) -> "DiT":
        """Compute attention in float32 (True) or in the activations' dtype (the bf16 backends)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.upcast = upcast
        return self
