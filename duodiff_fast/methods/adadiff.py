"""AdaDiff: per-sample early exit through uncertainty estimation modules, with a real shrinking batch.

On DiT (``AdaDiffUViT(dit)``) the heads have the shape of DiT's adaLN final layer (a
:class:`~duodiff_fast.models.dit.FinalLayer`, conditioned on the row's c, predicting eps and the
variance value) and the UEMs pool over all tokens (DiT has no extra tokens); the losses use the
eps channels. Everything else below holds as written for U-ViT.

AdaDiff (DuoDiff paper, appendix A) attaches to a U-ViT backbone with N = depth + 1 transformer
layers, *before* each layer i = 0 .. N-1, an output head g_i and a timestep-aware uncertainty
estimation module (UEM) u_i in [0, 1]. A sample exits at the first i with u_i <= theta and its
noise prediction is g_i(L_i); if no UEM fires, the backbone's own final layer (``decode``) is the
last exit g_N. So there are **N + 1 exit points** and N UEMs.

Exit-layer numbering (the y axis of the paper's figure 1): the *exit layer* of a sample is the
number of transformer layers it ran, a 1-based layer count: exiting at head i means layers
1 .. i ran, so the exit layer is i (0 = exit at the head on the embedded tokens, before layer 1;
N = the full network, exit through the backbone's decode). The work of a sample is proportional
to its exit layer (plus the small heads and UEMs), hence the paper's time estimate
``base time * mean exit layer / N``.

Shapes and pooling (our choices where the paper is silent):
    * activations L_i: (B, extras + L, D) tokens entering layer i (after embed for i = 0).
    * output head g_i: LayerNorm(D) -> Linear(D, p*p*C) -> drop the extra (label/time) tokens ->
      unpatchify -> 3x3 conv (Identity when the backbone has ``conv=False``): (B, C, H, W), the
      backbone's final layer. By default each head starts as a copy of the final layer.
    * UEM u_i: **mean over the patch tokens** (the extra tokens are left out) -> (B, D), then
      LayerNorm(D); concatenated with the timestep embedding, the raw sinusoidal embedding of the
      network's timestep input (B, D) -> (B, 2D); one Linear(2D, 1) and a sigmoid -> (B,).
      That is the paper's eq. 4, u = f(w^T [L, timesteps] + b) with f = sigmoid, plus a LayerNorm
      so that one weight scale fits every layer's activations. ``uem_hidden > 0`` inserts a hidden
      layer (Linear, GELU) for the MLP variant of the paper's figure 7.

Objective (eq. 6-8, :class:`AdaDiffObjective`): L = L_simple + lambda * L_u + beta * L_UAL with
    L_simple = mean (g_N - eps)^2                           (the backbone's own output)
    u_hat_i  = tanh(mean_{C,H,W} |g_i - eps|)  per sample   (pseudo-uncertainty, no gradient)
    L_u      = sum_i mean_b (u_i - u_hat_i)^2
    L_UAL    = sum_i mean_b (1 - u_i) * mean_{C,H,W} (g_i - eps)^2
Squared norms are means over pixels (the scale of L_simple), summed over heads, averaged over the
batch. The (1 - u) weight carries gradient, as written in eq. 7 (``detach_ual_weight=True`` stops it).

Inference, two implementations that agree to rounding:
    * :meth:`AdaDiffUViT.exit_simulated`: every sample through every layer and head, then pick
      (the reference; what the DuoDiff authors timed).
    * :meth:`AdaDiffUViT.exit_shrinking`: after each UEM the exiting rows run their head and are
      written to their places in the output; the remaining rows, with their pending U-ViT skip
      tensors and time logits, are compacted and go on, so layer i processes only the rows still
      active. Both run as hooks of the backbone's layer program (``duodiff_fast.models.program``),
      so they run on whichever backend the backbone asks for (``prepare_model(m, "triton")``).
    * :meth:`AdaDiffUViT.exit_bucketed`: the shrinking batch with static shapes. The active rows are
      padded up to the smallest bucket of a ladder (powers of two, then the batch), so each layer
      runs one of a few shapes; per layer the only host read is the count of rows still active
      (:func:`read_count`), which picks the next bucket; the exit head runs only on the rows that
      leave (padded to their own bucket), and not at all at a layer no row leaves. Every (layer, bucket) step has a fixed
      shape -- what per-bucket CUDA graphs need -- but it runs eagerly here (no capture yet).
      Padding rows are copies of rows that already left: attention is per sample, so they never
      touch the real rows, and their writes go to a trash row that is cut off. The padding waste
      is counted in a :class:`BucketStats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import model_dtype
from ..models.program import program_for
from ..ops.compaction import bucket_ladder, gather_rows, partition_order, scatter_rows
from ..runtime.graphs import choose_bucket
from ..models.uvit import UViT, final_layer
from .denoiser import ModelDenoiser

__all__ = [
    "OutputHead",
    "UncertaintyModule",
    "AdaDiffUViT",
    "AdaDiffOutputs",
    "AdaDiffObjective",
    "AdaDiff",
    "BucketStats",
    "check_theta",
    "set_synthetic_exit_profile",
]

EXIT_MODES = ("shrinking", "simulated", "bucketed")


def read_count(count: torch.Tensor) -> int:
    """The bucketed exit's one host read per layer: the number of rows still active (a 0-d tensor)."""
    return int(count)


@dataclass
class BucketStats:
    """Padding waste of the bucketed exit, summed over the layers run (and over calls).

    real_rows: sum over layers of the active rows a layer ran; padded_rows: sum of the padding
    rows it ran on top (bucket - active); calls: exits run. The UEMs run on the layers' buckets.
    head_rows / head_padded_rows: the same for the exit heads, which run only on the rows that
    leave, padded up to their own bucket.
    """

    real_rows: int = 0
    padded_rows: int = 0
    calls: int = 0
    head_rows: int = 0
    head_padded_rows: int = 0

    def add(self, bucket: int, real: int) -> None:
        self.real_rows += real
        self.padded_rows += bucket - real

    def add_head(self, bucket: int, real: int) -> None:
        self.head_rows += real
        self.head_padded_rows += bucket - real

    @property
    def waste(self) -> float:
        """Fraction of the rows run that were padding (0 when nothing ran)."""
        total = self.real_rows + self.padded_rows
        return self.padded_rows / total if total else 0.0

    def as_dict(self) -> Dict[str, float]:
        return {"real_rows": self.real_rows, "padded_rows": self.padded_rows, "waste": self.waste,
                "calls": self.calls, "head_rows": self.head_rows, "head_padded_rows": self.head_padded_rows}


def _refuse_capture(x: torch.Tensor, what: str) -> None:
    """Raise if a CUDA graph is being captured: the shrinking and bucketed exits read the active row
    count on the host after every UEM, so no single graph can hold them."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} cannot be captured in one CUDA graph (it reads the active row count on "
                           "the host after every layer); use mode='simulated' under capture")


def check_theta(theta) -> float:
    """Return theta as a float if it is a number in [0, 1]; raise a clear error otherwise."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta):
        raise ValueError(f"theta must be a finite number in [0, 1], got {theta!r}")
    if not 0.0 <= float(theta) <= 1.0:
        raise ValueError(f"theta must lie in [0, 1] (u is a sigmoid output), got {theta!r}")
    return float(theta)


class OutputHead(nn.Module):
    """Early-exit head, shaped like U-ViT's final layer: (B, extras + L, D) -> (B, C, H, W)."""

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int, extras: int, conv: bool):
        super().__init__()
        self.extras = extras
        self.in_chans = in_chans
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return final_layer(self, self.extras, self.in_chans, tokens)  # (B, C, H, W)


class UncertaintyModule(nn.Module):
    """Timestep-aware UEM: tokens (B, N, D) and time embedding (B, D) -> u (B,) in [0, 1].

    Mean over the patch tokens (tokens ``extras:``) -> (B, D), LayerNorm, concat with the time
    embedding -> (B, 2D), Linear(2D, 1) (or Linear(2D, hidden), GELU, Linear(hidden, 1)), sigmoid.
    Pooling before the norm keeps the module's cost at O(B N D) adds, small beside a layer.

    The single-layer form is evaluated as ``w_a . LN(pool(L)) + (w_t . temb + b)``: the time part
    (:meth:`time_logit`) depends only on t, so the shrinking batch computes it once per call for
    every UEM; both exit paths use this same split so their u agree.
    """

    def __init__(self, embed_dim: int, extras: int, hidden: int = 0):
        super().__init__()
        self.extras = extras
        self.embed_dim = embed_dim
        self.norm = nn.LayerNorm(embed_dim)
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, 1))

    @property
    def out_linear(self) -> nn.Linear:
        return self.mlp[-1]

    @property
    def is_linear(self) -> bool:
        return len(self.mlp) == 1

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): LayerNorm of the mean patch token."""
        return self.norm(tokens[:, self.extras:, :].mean(dim=1))

    def time_logit(self, temb: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,): the time part of the logit, bias included (single-layer UEMs only)."""
        lin = self.mlp[0]
        return F.linear(temb.to(lin.weight.dtype), lin.weight[:, self.embed_dim:], lin.bias).squeeze(-1)

    def act_logit(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B,): the activation part of the logit (single-layer UEMs only)."""
        lin = self.mlp[0]
        return F.linear(self.pooled(tokens), lin.weight[:, :self.embed_dim]).squeeze(-1)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.is_linear:
            return torch.sigmoid(self.act_logit(tokens) + self.time_logit(temb))  # (B,)
        feats = torch.cat([self.pooled(tokens), temb.to(tokens.dtype)], dim=-1)  # (B, 2D)
        return torch.sigmoid(self.mlp(feats).squeeze(-1))


class AdaDiffOutputs(NamedTuple):
    """Everything the training forward computes.

    final: (B, C, H, W) the backbone's own output g_N; heads: (N, B, C, H, W) the early heads
    g_0 .. g_{N-1}; u: (N, B) the UEM outputs u_0 .. u_{N-1}.
    """

    final: torch.Tensor
    heads: torch.Tensor
    u: torch.Tensor


class AdaDiffUViT(nn.Module):
    """Early-exit U-ViT wrapping ``backbone`` (its modules and parameters are used unchanged).

    Args:
        backbone: a :class:`~duodiff_fast.models.uvit.UViT`.
        uem_hidden: hidden width of the UEM MLP; 0 (default) is the paper's single FC layer.
        init_heads_from_final: start every head as a copy of the backbone's final layer.
        freeze_backbone: leave the backbone's parameters out of training (the paper's setting).

    ``forward(x, timesteps, y)`` is the training forward and returns :class:`AdaDiffOutputs`;
    inference goes through :meth:`exit_simulated` / :meth:`exit_shrinking` (or the :class:`AdaDiff`
    denoiser). Attributes ``num_layers`` (N), ``num_exits`` (N + 1).

    Load the backbone's weights before wrapping (``AdaDiffUViT(load_model(path), freeze_backbone=True)``):
    the wrapper's own state dict prefixes the backbone's keys with ``backbone.``.
    """

    def __init__(self, backbone: UViT, uem_hidden: int = 0, init_heads_from_final: bool = True,
                 freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        n = backbone.num_layers
        d = backbone.embed_dim
        self.is_dit = hasattr(backbone, "t_embedder")
        if self.is_dit:  # DiT: heads shaped like its adaLN final layer
            from ..models.dit import FinalLayer

            self.heads = nn.ModuleList(
                [FinalLayer(d, backbone.patch_size, backbone.out_channels) for _ in range(n)])
        else:
            conv = not isinstance(backbone.final_layer, nn.Identity)
            self.heads = nn.ModuleList(
                [OutputHead(d, backbone.patch_size, backbone.in_chans, backbone.extras, conv) for _ in range(n)])
        self.uems = nn.ModuleList([UncertaintyModule(d, backbone.extras, uem_hidden) for _ in range(n)])
        self._init_new_modules(init_heads_from_final)
        if freeze_backbone:
            self.freeze_backbone()

    def _init_new_modules(self, from_final: bool) -> None:
        for head in self.heads:
            if self.is_dit:
                if from_final:
                    head.load_state_dict(self.backbone.final_layer.state_dict())
                else:  # the prediction layer random, the modulation zero (a plain LayerNorm head)
                    nn.init.trunc_normal_(head.linear.weight, std=0.02)
                    nn.init.zeros_(head.linear.bias)
                    nn.init.zeros_(head.adaLN_modulation[-1].weight)
                    nn.init.zeros_(head.adaLN_modulation[-1].bias)
                continue
            if from_final:
                head.norm.load_state_dict(self.backbone.norm.state_dict())
                head.decoder_pred.load_state_dict(self.backbone.decoder_pred.state_dict())
                head.final_layer.load_state_dict(self.backbone.final_layer.state_dict())
            else:
                nn.init.trunc_normal_(head.decoder_pred.weight, std=0.02)
                nn.init.zeros_(head.decoder_pred.bias)
        for uem in self.uems:
            for m in uem.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------ properties
    def freeze_backbone(self, frozen: bool = True) -> "AdaDiffUViT":
        """Exclude (or re-include) the backbone's parameters from training."""
        self.backbone.requires_grad_(not frozen)
        return self

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def num_exits(self) -> int:
        return self.backbone.num_layers + 1

    # The backbone's interface, as the denoiser adapters and the trainer read it.
    in_chans = property(lambda self: self.backbone.in_chans)
    img_size = property(lambda self: self.backbone.img_size)
    patch_size = property(lambda self: self.backbone.patch_size)
    num_classes = property(lambda self: self.backbone.num_classes)
    embed_dim = property(lambda self: self.backbone.embed_dim)
    is_conditional = property(lambda self: self.backbone.is_conditional)
    null_class = property(lambda self: self.backbone.null_class)
    learn_sigma = property(lambda self: getattr(self.backbone, "learn_sigma", None))  # DiT only

    def set_attention_upcast(self, upcast: bool) -> "AdaDiffUViT":
        self.backbone.set_attention_upcast(upcast)
        return self

    # -------------------------------------------------------------- forward
    def _program(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor], check: bool = True):
        """The backbone's layer program for this call, and the UEMs' (B, D) time embedding."""
        if check and not torch.compiler.is_compiling():
            self.backbone.check_inputs(x, timesteps, y)
        program = program_for(self.backbone, x, owner=self)
        b = x.shape[0]
        if timesteps.dim() == 0 or timesteps.shape[0] == 1:
            timesteps = timesteps.reshape(1).expand(b)
        temb = program.ex.timestep_embedding(timesteps, self.backbone.embed_dim).to(self.backbone.pos_embed.dtype)
        return program, timesteps, temb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> AdaDiffOutputs:
        """Every layer, head and UEM on the whole batch (training, and the simulated exit)."""
        program, timesteps, temb = self._program(x, timesteps, y)
        hook = _EveryExit(self)
        final = program.run(x, timesteps, y, hook=hook, carry={"temb": temb})
        return AdaDiffOutputs(final, torch.stack(hook.heads), torch.stack(hook.us))

    @staticmethod
    def exit_layers_from_u(u: torch.Tensor, theta: float) -> torch.Tensor:
        """(N, B) uncertainties -> (B,) int64 exit layer: first i with u_i <= theta, else N."""
        n = u.shape[0]
        fire = u.float() <= theta  # (N, B)
        idx = torch.arange(n, device=u.device).unsqueeze(1).expand_as(fire)
        return torch.where(fire, idx, torch.full_like(idx, n)).min(dim=0).values

    @torch.no_grad()
    def exit_simulated(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor],
                       theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference exit: all samples through all layers, then pick each one's exit output.

        Returns eps (B, C, H, W) and exit layers (B,) int64 in [0, N].
        """
        theta = check_theta(theta)
        out = self.forward(x, timesteps, y)
        exits = self.exit_layers_from_u(out.u, theta)
        every = torch.cat([out.heads, out.final.unsqueeze(0)])  # (N + 1, B, C, H, W)
        eps = every[exits, torch.arange(x.shape[0], device=x.device)]
        return eps, exits

    @torch.no_grad()
    def exit_shrinking(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor],
                       theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shrinking-batch exit: layer i only processes the rows still active before it.

        Returns eps (B, C, H, W) and exit layers (B,) int64 in [0, N], equal (to rounding) to
        :meth:`exit_simulated`.
        """
        theta = check_theta(theta)
        _refuse_capture(x, "the shrinking batch")
        program, timesteps, temb = self._program(x, timesteps, y)
        hook = _FirstExit(self, theta)
        state = program.encode(x, timesteps, y, hook=hook, carry=hook.carry(temb))
        eps = state.out if state.done else program.decode(state, hook=hook)
        exits = state.exits
        if exits is None:  # no row left early
            exits = torch.full((x.shape[0],), self.num_layers, dtype=torch.long, device=x.device)
        return eps, exits

    @torch.no_grad()
    def exit_bucketed(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor], theta: float,
                      buckets: Optional[List[int]] = None,
                      stats: Optional[BucketStats] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shrinking batch padded to a bucket ladder: at most one host read per layer.

        Args:
            buckets: the bucket sizes (default: powers of two below B), see
                :func:`~duodiff_fast.ops.compaction.bucket_ladder`; B itself is always the top one.
            stats: a :class:`BucketStats` the padding of this call is added to.
        Returns eps (B, C, H, W) and exit layers (B,) int64 in [0, N], equal (to rounding) to
        :meth:`exit_simulated`.
        """
        theta = check_theta(theta)
        _refuse_capture(x, "the bucketed exit")
        ladder = bucket_ladder(x.shape[0], buckets)
        program, timesteps, temb = self._program(x, timesteps, y)
        hook = _BucketedExit(self, theta, ladder, stats if stats is not None else BucketStats())
        state = program.encode(x, timesteps, y, hook=hook, carry=hook.carry(temb))
        if not state.done:
            program.decode(state, hook=hook)  # the last bucket's final layer; padding lands in the trash row
        hook.stats.calls += 1
        b = x.shape[0]
        return state.out[:b], state.exits[:b]


class _EveryExit:
    """Layer-program hook: every head and UEM on every row before each layer; no row leaves."""

    def __init__(self, model: AdaDiffUViT):
        self.model = model
        self.heads: List[torch.Tensor] = []
        self.us: List[torch.Tensor] = []

    def before_layer(self, i: int, state, program) -> None:
        self.heads.append(program.backbone.final(program.ex, self.model.heads[i], state.h, state.carry))
        self.us.append(self.model.uems[i](state.h, state.carry["temb"]))
        return None


class _FirstExit:
    """Layer-program hook: before layer i, the rows whose u_i <= theta leave through head i."""

    def __init__(self, model: AdaDiffUViT, theta: float):
        self.model = model
        self.theta = theta
        self.linear = all(uem.is_linear for uem in model.uems)

    def head(self, i: int) -> nn.Module:
        return self.model.heads[i]

    def carry(self, temb: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-row tensors that follow the rows: the time part of every UEM logit (B, N), or temb (B, D)."""
        if self.linear:  # once per call, not once per layer
            return {"tlogit": torch.stack([uem.time_logit(temb) for uem in self.model.uems], dim=1)}
        return {"temb": temb}

    def before_layer(self, i: int, state, program) -> torch.Tensor:
        uem = self.model.uems[i]
        if self.linear:
            u = torch.sigmoid(uem.act_logit(state.h) + state.carry["tlogit"][:, i])
        else:
            u = uem(state.h, state.carry["temb"])
        return u.float() <= self.theta  # (K,) rows that leave


class _BucketedExit(_FirstExit):
    """Layer-program hook: :class:`_FirstExit`'s decision, with the rows kept in ladder buckets.

    State between layers: ``state.h`` holds P = bucket rows, the ``active`` real ones first;
    ``state.rows`` (P,) is each slot's batch position, B (the trash row of ``state.out`` and
    ``state.exits``, both (B + 1, ...)) for padding slots. Every step before the host read has the
    shape of the current bucket P, every step after it the shape of the next bucket.
    """

    def __init__(self, model: AdaDiffUViT, theta: float, ladder: List[int], stats: BucketStats):
        super().__init__(model, theta)
        self.ladder = ladder
        self.stats = stats
        self.batch = ladder[-1]
        self.active = self.batch

    def exit_rows(self, i: int, state, leave: torch.Tensor, program) -> bool:
        """Rows ``leave`` (P,) exit through head i; the rest move to the front of the next bucket.

        The one host read of the layer (how many rows stay) comes first: the number that leave is
        then known on the host (the active count minus it), so head i runs only when some row
        leaves, and only on the leaving rows, padded up to their own ladder bucket.
        """
        bb, b, dev = program.model, self.batch, state.h.device
        if state.out is None:  # before layer 0: the whole batch, which is the top bucket (no padding)
            state.out = state.h.new_empty((b + 1, program.backbone.out_channels, bb.img_size, bb.img_size))
            state.exits = torch.full((b + 1,), program.num_layers, dtype=torch.long, device=dev)
            state.rows = torch.arange(b, device=dev)
        real = state.rows < b
        leave = leave & real
        stay = real & ~leave
        count = stay.sum()  # (), on the device: the steps below depend on the buckets only, not on n
        n = read_count(count)  # the one host read of this layer
        n_leave = self.active - n
        if n_leave > 0:
            # The leaving rows first (stable), padded up to their bucket; padding slots write the
            # trash row B. The bucket is at most P (P is on the ladder and P >= n_leave).
            lbucket = choose_bucket(n_leave, self.ladder)
            lorder = partition_order(leave)[:lbucket]
            names = [m for m in ("c",) if m in state.carry]  # what the final layer reads besides h (DiT's c)
            h_out, *picked = gather_rows([state.h, *(state.carry[m] for m in names)], lorder, check=False)
            lrows = state.rows.index_select(0, lorder)
            target = torch.where(torch.arange(lbucket, device=dev) < n_leave, lrows, torch.full_like(lrows, b))
            head_out = program.backbone.final(program.ex, self.head(i), h_out, dict(zip(names, picked)))
            scatter_rows(state.out, target, head_out)
            state.exits.index_fill_(0, target, i)
            self.stats.add_head(lbucket, n_leave)
        if n == 0:
            state.h = state.h[:0]
            state.skips = []
            return True
        if n != self.active:  # rows left: stayers to the front (stable), padded up to n's bucket
            bucket = choose_bucket(n, self.ladder)  # the smallest bucket >= n (the ladder ends at B)
            order = partition_order(stay)[:bucket]  # in range by construction: no index check
            names = list(state.carry)
            k = len(state.skips)
            h, *rest = gather_rows([state.h, *state.skips, *(state.carry[m] for m in names)], order, check=False)
            state.h, state.skips, state.carry = h, rest[:k], dict(zip(names, rest[k:]))
            rows = state.rows.index_select(0, order)
            state.rows = torch.where(torch.arange(bucket, device=dev) < n, rows, torch.full_like(rows, b))
            self.active = n
        self.stats.add(state.h.shape[0], n)
        return False


def set_synthetic_exit_profile(model: AdaDiffUViT, schedule=None, t_switch: float = 0.6, exit_layer: int = 2,
                               theta: float = 0.07, sharpness: float = 12.0, sample_spread: float = 0.5,
                               seed: int = 0) -> AdaDiffUViT:
    """Program the UEMs (NOT training) so that exits follow a figure-1-like pattern, for benchmarks.

    Args:
        model: an :class:`AdaDiffUViT` with single-layer UEMs (modified in place and returned).
        schedule: the noise schedule the model will be sampled with; it maps t to the network's
            timestep input, which the UEMs see. None: the discrete linear DDPM schedule
            (``get_schedule("linear")``, the DuoDiff paper's CIFAR-10/CelebA setting).
        t_switch: t in (0, 1) above which samples exit early; exit_layer: the layer count they
            exit after (0 .. N-1); theta: the exit threshold the profile is written for.
        sharpness, sample_spread, seed: steepness of the switch in t, per-sample logit spread,
            seed of the random activation weights.

    With random weights the exit pattern is arbitrary; this sets every UEM's output layer so that
    u_i is high (no exit) for i != ``exit_layer``, and u at ``exit_layer`` falls below ``theta``
    for times t above about ``t_switch`` (noisy steps exit after ``exit_layer`` layers, the rest
    run the full network). The time dependence uses the lowest-frequency sine of the UEM's time
    embedding (monotone in the timestep input over [0, 1000]); random activation weights of logit
    scale ``sample_spread`` make samples near the switch differ. Only for timing: these are not
    a trained model's exits.
    """
    if schedule is None:
        from ..schedules import get_schedule

        schedule = get_schedule("linear")
    if not hasattr(schedule, "model_input"):
        raise TypeError(f"schedule must be a noise schedule (duodiff_fast.schedules), got {type(schedule).__name__}")
    if not 0.0 < float(t_switch) < 1.0:
        raise ValueError(f"t_switch must lie in (0, 1), got {t_switch}")
    if not 0 <= int(exit_layer) < model.num_layers:
        raise ValueError(f"exit_layer must lie in [0, {model.num_layers - 1}], got {exit_layer}")
    if not 0.0 < float(theta) < 1.0:
        raise ValueError(f"theta must lie in (0, 1), got {theta}")
    d = model.backbone.embed_dim
    half = d // 2
    feature = 2 * half - 1  # index of sin(timesteps * f_min) inside the time embedding
    f_min = math.exp(-math.log(10000.0) * (half - 1) / half)

    def level(t: float) -> float:
        ts = float(schedule.model_input(torch.tensor([t], dtype=torch.float64))[0])
        return math.sin(ts * f_min)

    lo, hi = level(0.0), level(1.0)
    scale = sharpness / max(hi - lo, 1e-12)
    logit_theta = math.log(theta / (1 - theta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, uem in enumerate(model.uems):
            lin = uem.out_linear
            lin.weight.zero_()
            lin.bias.fill_(6.0)  # u ~ 0.998: no exit
            if i != exit_layer:
                continue
            if isinstance(lin, nn.Linear) and len(uem.mlp) == 1:
                lin.weight[0, :d] = torch.randn(d, generator=g) * (sample_spread / math.sqrt(d))
                # logit = logit(theta) - scale * (level(t) - level(t_switch))
                lin.weight[0, d + feature] = -scale
                lin.bias.fill_(logit_theta + scale * level(t_switch))
            else:
                raise ValueError("set_synthetic_exit_profile needs single-layer UEMs (uem_hidden=0)")
    return model


class AdaDiffObjective:
    """The AdaDiff training loss L_simple + lambda L_u + beta L_UAL (DuoDiff paper eq. 5-8).

    Same protocol as :class:`~duodiff_fast.training.objective.DiffusionObjective`
    (``loss, metrics = objective(model, x0, y, generator)``); the model must return
    :class:`AdaDiffOutputs` from ``model(x_t, timesteps, y)`` (an :class:`AdaDiffUViT`, possibly
    DDP-wrapped). Metrics: loss, l_simple, l_u, l_ual.

    Args:
        num_classes, p_uncond: as :class:`~duodiff_fast.training.objective.DiffusionObjective`:
            default None, the labels as the Trainer prepared them (label dropout at
            ``TrainConfig.p_uncond``), so ``AdaDiffObjective(schedule)`` trains a class-conditional
            model as well as an unconditional one.
        target: the pseudo-uncertainty u_hat_i per sample, never differentiated:
            ``"mean_tanh"`` (default) mean_{C,H,W} tanh|g_i - eps|, the per-element F = tanh of
            eq. 5 and of the DuoDiff authors' code; ``"tanh_mean"`` tanh(mean_{C,H,W} |g_i - eps|),
            this package's earlier form (smaller where errors are spread unevenly over pixels).
        detach_ual_weight: weight L_UAL by the detached (1 - u_i) (default), so the UEMs learn
            only from L_u; False lets L_UAL's gradient reach u as eq. 7 is written, which rewards
            a UEM for reporting high uncertainty.
    """

    TARGETS = ("mean_tanh", "tanh_mean")

    def __init__(self, schedule, num_classes: Optional[int] = None, p_uncond: Optional[float] = None, lam: float = 1.0,
                 beta: float = 1.0, detach_ual_weight: bool = True, target: str = "mean_tanh"):
        from ..training.objective import DiffusionObjective

        if target not in self.TARGETS:
            raise ValueError(f"target must be one of {self.TARGETS}, got {target!r}")
        self.base = DiffusionObjective(schedule, num_classes, p_uncond)
        self.lam = float(lam)
        self.beta = float(beta)
        self.detach_ual_weight = bool(detach_ual_weight)
        self.target = target

    @staticmethod
    def losses(out: AdaDiffOutputs, noise: torch.Tensor, detach_ual_weight: bool = True,
               target: str = "mean_tanh") -> Dict[str, torch.Tensor]:
        """The three loss terms from the model outputs and the true noise (B, C, H, W).

        L_simple = mean (g_N - eps)^2; L_u = sum_i mean_b (u_i - u_hat_i)^2;
        L_UAL = sum_i mean_b (1 - u_i) mean_{C,H,W} (g_i - eps)^2 (u_hat_i: see ``target``).
        """
        if target not in AdaDiffObjective.TARGETS:
            raise ValueError(f"target must be one of {AdaDiffObjective.TARGETS}, got {target!r}")
        noise = noise.float()
        c = noise.shape[1]  # DiT's outputs carry the variance value after the eps channels
        l_simple = (out.final[:, :c].float() - noise).pow(2).mean()
        err = out.heads[:, :, :c].float() - noise.unsqueeze(0)  # (N, B, C, H, W)
        mse = err.pow(2).flatten(2).mean(-1)  # (N, B)
        u = out.u.float()  # (N, B)
        with torch.no_grad():
            if target == "mean_tanh":
                u_hat = torch.tanh(err.abs()).flatten(2).mean(-1)  # (N, B)
            else:
                u_hat = torch.tanh(err.abs().flatten(2).mean(-1))
        l_u = (u - u_hat).pow(2).mean(dim=1).sum()
        weight = (1 - u).detach() if detach_ual_weight else (1 - u)
        l_ual = (weight * mse).mean(dim=1).sum()
        return {"l_simple": l_simple, "l_u": l_u, "l_ual": l_ual}

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: Optional[torch.Tensor],
                 generator: Optional[torch.Generator] = None):
        base = self.base
        t, noise, x_t = base.sample(x0, generator)
        y = base.training_labels(y, generator)
        out = model(x_t, base.network_timesteps(t, x0.device), y)
        terms = self.losses(out, noise, self.detach_ual_weight, self.target)
        loss = terms["l_simple"] + self.lam * terms["l_u"] + self.beta * terms["l_ual"]
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics


class AdaDiff(ModelDenoiser):
    """Early-exit denoiser ``eps = AdaDiff(model, schedule, theta)(x, t, y)``.

    Args:
        model: an :class:`AdaDiffUViT` (any backend form of it, e.g. from ``prepare_model``).
        schedule: the noise schedule it was trained with.
        theta: exit threshold in [0, 1]; a sample exits at the first layer whose u <= theta.
        mode: "shrinking" (compacted batch, the fast path), "bucketed" (compacted batch padded to
            a bucket ladder: one host read per layer, static shapes) or "simulated" (reference).
        buckets: the bucket ladder of the bucketed mode (default: powers of two below the batch).
        recorder: an object with ``record(t (B,), exit_layers (B,))`` called on every evaluation
            (e.g. :class:`duodiff_fast.analysis.ExitRecorder`). Under classifier-free guidance the
            cond and uncond rows are both recorded (they exit independently).

    Works with every solver; rows may sit at different t. ``last_exits`` holds the (B,) exit
    layers of the latest call; ``bucket_stats`` (bucketed mode; else None) the :class:`BucketStats`
    padding waste summed over every call. Under the CUDA-graph runtime (``runtime.graphs.GraphDenoiser``)
    the simulated mode has fixed shapes and can be captured; the shrinking and bucketed modes
    refuse capture as a whole (the runtime then warns once and calls them directly). The bucketed
    mode's (layer, bucket) steps have static shapes, ready for per-bucket graphs; capturing them is
    not implemented yet.
    """

    def __init__(self, model: AdaDiffUViT, schedule, theta: float, mode: str = "shrinking", recorder=None,
                 buckets: Optional[List[int]] = None):
        super().__init__(model, schedule)
        self.theta = check_theta(theta)
        if mode not in EXIT_MODES:
            raise ValueError(f"mode must be one of {EXIT_MODES}, got {mode!r}")
        self.mode = mode
        self.buckets = None if buckets is None else list(buckets)
        if self.buckets is not None:
            bucket_ladder(1, self.buckets)  # a clear error now, not at the first call
        self.bucket_stats: Optional[BucketStats] = BucketStats() if mode == "bucketed" else None
        self.recorder = recorder
        self.last_exits: Optional[torch.Tensor] = None

    def output(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output at times t (the solvers call the denoiser itself: its first C channels)."""
        self.check(x, t, y)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        timesteps = self.schedule.model_input(t).to(device=x.device, dtype=torch.float32)
        xm = x.to(model_dtype(self.model))
        if self.mode == "bucketed":
            eps, exits = self.model.exit_bucketed(xm, timesteps, y, self.theta, self.buckets, self.bucket_stats)
        else:
            run = self.model.exit_shrinking if self.mode == "shrinking" else self.model.exit_simulated
            eps, exits = run(xm, timesteps, y, self.theta)
        self.last_exits = exits
        if self.recorder is not None:
            self.recorder.record(t, exits)
        return eps.to(x.dtype)
