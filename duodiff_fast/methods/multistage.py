"""Multistage U-ViT (after "Improving Efficiency of Diffusion Models via Multi-Stage Framework and
Tailored Multi-Decoder Architectures"): one shared encoder, one decoder per stage of the time axis.

On U-ViT the shared part is the token front end (patch/time/label embeddings, ``pos_embed``), the
in-blocks and the mid-block; each stage owns its out-blocks (with their long-skip ``skip_linear``),
final LayerNorm, ``decoder_pred`` and final conv. A stage may be wider or narrower than the shared
width D: with stage width W != D a ``proj_in`` Linear(D, W) maps the mid-block output into the
stage, and each out-block's ``skip_linear`` is Linear(W + D, W), merging the D-wide encoder skip
directly. With W == D a stage's decoder is exactly a U-ViT decoder (``from_uvit`` copies one in).

Stages split continuous time t in [0, 1] (t = 0 data, t = 1 noise) at boundaries
0 < t_1 < ... < t_{n-1} < 1: stage i serves [t_i, t_{i+1}) (the last closed at 1), so stage 0 is
nearest the data. CIFAR-10 default (the paper's optimal-denoiser clustering): t_1 = 0.442,
t_2 = 0.631, three stages. The paper gives the data-side stage the widest decoder (192/128/16
channels over a 128-channel encoder for its U-Nets).

API: :class:`MultistageUViT`, :class:`MultistageDenoiser` (routes each solver step to its stage),
:class:`MultistageObjective` (each batch from one stage), :func:`save_multistage`,
:func:`load_multistage`.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..backends import model_dtype
from ..models.program import RowState, program_for
from ..models.uvit import Block, UViT, init_linear_and_norm
from ..ops.compaction import split_rows, take_rows
from ..samplers.constants import host_time
from ..training.objective import DiffusionObjective
from .denoiser import ModelDenoiser

CIFAR10_BOUNDARIES = (0.442, 0.631)

StageSpec = Union[int, torch.Tensor]


def check_boundaries(boundaries: Sequence[float]) -> tuple:
    """Validate interior stage boundaries: floats strictly increasing inside (0, 1)."""
    try:
        b = tuple(float(v) for v in boundaries)
    except TypeError:
        raise TypeError(f"boundaries must be a sequence of floats, got {boundaries!r}") from None
    for v in b:
        if not math.isfinite(v) or not 0.0 < v < 1.0:
            raise ValueError(f"stage boundaries must lie strictly inside (0, 1), got {list(b)}")
    for a, c in zip(b, b[1:]):
        if not a < c:
            raise ValueError(f"stage boundaries must be strictly increasing, got {list(b)}")
    return b


def stage_of(t: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """(B,) long stage index of continuous times t (B,); a t on a boundary goes to the later stage."""
    t = torch.as_tensor(t).detach().reshape(-1)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    # Edges in t's own dtype, so a float32 t equal to float32(edge) counts as on the edge.
    edges = torch.tensor(tuple(boundaries), dtype=t.dtype, device=t.device)
    return torch.searchsorted(edges, t.contiguous(), right=True)


def _stage_heads(width: int, shared_width: int, shared_heads: int) -> int:
    head_dim = shared_width // shared_heads
    if width % head_dim == 0:
        return width // head_dim
    return max(h for h in range(1, shared_heads + 1) if width % h == 0)


class StageDecoder(nn.Module):
    """One stage's decoder: [proj_in], out-blocks, norm, decoder_pred, final_layer.

    Args:
        width: stage token width W. shared_width: encoder width D. num_blocks: out-blocks (= the
        encoder's in-blocks). num_heads: attention heads (W divisible by it). patch_size, in_chans,
        conv, mlp_ratio, qkv_bias, qk_scale, skip: as in UViT.
    """

    def __init__(self, width: int, shared_width: int, num_blocks: int, num_heads: int, patch_size: int,
                 in_chans: int, mlp_ratio: float, qkv_bias: bool, qk_scale, conv: bool, skip: bool):
        super().__init__()
        self.width = width
        self.proj_in = nn.Linear(shared_width, width) if width != shared_width else nn.Identity()
        blocks = []
        for _ in range(num_blocks):
            blk = Block(width, num_heads, mlp_ratio, qkv_bias, qk_scale, skip=skip)
            if skip and width != shared_width:
                blk.skip_linear = nn.Linear(width + shared_width, width)  # cat[x (W), skip (D)] -> W
            blocks.append(blk)
        self.out_blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()


class MultistageUViT(nn.Module):
    """U-ViT with a shared encoder (embeddings, in-blocks, mid-block) and one decoder per stage.

    Args:
        boundaries: interior stage boundaries on t in [0, 1] (n - 1 values for n stages).
        stage_widths: token width per stage (default: the shared ``embed_dim`` for every stage).
        stage_num_heads: attention heads per stage (default: the shared head width where it divides
            the stage width, else the largest divisor of the width not above ``num_heads``).
        **uvit_kwargs: the UViT constructor keywords of the shared encoder (``depth`` counts in- plus
            out-blocks as in UViT; each stage gets ``depth // 2`` out-blocks).

    ``forward(x (B,C,H,W), timesteps (B,), y=None, stage=...) -> eps``: ``stage`` is an int for the
    whole batch or a (B,) long tensor; rows of different stages are split and written back.
    The state dict holds the whole model (``shared.*`` and ``stages.{i}.*``).
    """

    def __init__(self, boundaries: Sequence[float] = CIFAR10_BOUNDARIES,
                 stage_widths: Optional[Sequence[int]] = None,
                 stage_num_heads: Optional[Sequence[int]] = None, **uvit_kwargs: Any):
        super().__init__()
        self.boundaries = check_boundaries(boundaries)
        n = len(self.boundaries) + 1
        shared = UViT(**uvit_kwargs)
        d = shared.embed_dim
        heads = shared.config["num_heads"]
        widths = list(stage_widths) if stage_widths is not None else [d] * n
        if len(widths) != n:
            raise ValueError(f"{n} stages (from {n - 1} boundaries) need {n} stage widths, got {len(widths)}: "
                             "every stage needs its own decoder")
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
                raise ValueError(f"stage widths must be positive ints, got {widths}")
        if stage_num_heads is None:
            stage_num_heads = [_stage_heads(w, d, heads) for w in widths]
        stage_num_heads = list(stage_num_heads)
        if len(stage_num_heads) != n:
            raise ValueError(f"{n} stages need {n} head counts, got {len(stage_num_heads)}")
        for w, h in zip(widths, stage_num_heads):
            if h <= 0 or w % h:
                raise ValueError(f"stage width {w} must be divisible by its head count {h}")
        # The shared part: the U-ViT front end, in-blocks and mid-block; its decoder goes away.
        num_out = len(shared.out_blocks)
        del shared.out_blocks, shared.norm, shared.decoder_pred, shared.final_layer
        self.shared = shared
        cfg = shared.config
        self.stages = nn.ModuleList([
            StageDecoder(w, d, num_out, h, shared.patch_size, shared.in_chans, cfg["mlp_ratio"],
                         cfg["qkv_bias"], cfg["qk_scale"], cfg["conv"], cfg["skip"])
            for w, h in zip(widths, stage_num_heads)
        ])
        for stage in self.stages:
            init_linear_and_norm(stage)
        self.config = dict(cfg, boundaries=list(self.boundaries), stage_widths=widths,
                           stage_num_heads=stage_num_heads)

    @classmethod
    def from_uvit(cls, model: UViT, boundaries: Sequence[float] = CIFAR10_BOUNDARIES) -> "MultistageUViT":
        """Initialise every stage (full width) from a trained U-ViT: shared part and decoders copied."""
        kwargs = {k: v for k, v in model.config.items()}
        ms = cls(boundaries, **kwargs)
        src = model.state_dict()
        shared_keys = set(ms.shared.state_dict())
        ms.shared.load_state_dict({k: v for k, v in src.items() if k in shared_keys})
        for stage in ms.stages:
            stage.load_state_dict({k: v for k, v in src.items() if k.split(".")[0] in
                                   ("out_blocks", "norm", "decoder_pred", "final_layer")})
        return ms.to(next(model.parameters()).device)

    # ------------------------------------------------------------------------------ properties
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    in_chans = property(lambda self: self.shared.in_chans)
    img_size = property(lambda self: self.shared.img_size)
    patch_size = property(lambda self: self.shared.patch_size)
    num_classes = property(lambda self: self.shared.num_classes)
    embed_dim = property(lambda self: self.shared.embed_dim)
    is_conditional = property(lambda self: self.shared.is_conditional)
    null_class = property(lambda self: self.shared.null_class)

    def stage_of(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) long stage index of continuous times t."""
        return stage_of(t, self.boundaries)

    def set_attention_upcast(self, upcast: bool) -> "MultistageUViT":
        from ..models.uvit import Attention

        for m in self.modules():
            if isinstance(m, Attention):
                m.upcast = upcast
        return self

    # --------------------------------------------------------------------------------- forward
    def _program(self, x: torch.Tensor):
        return program_for(self.shared, x, owner=self)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor], program=None):
        """Shared part: (B, C, H, W) -> (mid-block tokens (B, N, D), skips [in-block outputs])."""
        state = (program or self._program(x)).encode(x, timesteps, y)
        return state.h, state.skips

    def decode_stage(self, i: int, h: torch.Tensor, skips: List[torch.Tensor], program=None) -> torch.Tensor:
        """Stage i's decoder: (B, N, D) + skips -> eps (B, C, H, W)."""
        state = RowState(h)
        state.skips = list(skips)
        return (program or self._program(h)).decode(state, decoder=self.stages[i])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None,
                stage: Optional[StageSpec] = None) -> torch.Tensor:
        if stage is None:
            raise ValueError("a multistage model needs stage= (an int, or a (B,) tensor of stage indices); "
                             "MultistageDenoiser and MultistageObjective pass it from t")
        if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.shared.check_inputs(x, timesteps, y)
        program = self._program(x)
        if isinstance(stage, torch.Tensor) and stage.dim() > 0:
            if stage.shape != (x.shape[0],):
                raise ValueError(f"stage must be an int or a ({x.shape[0]},) tensor, got {tuple(stage.shape)}")
            lo, hi = int(stage.min()), int(stage.max())
            if lo < 0 or hi >= self.num_stages:
                raise ValueError(f"stage indices must lie in [0, {self.num_stages - 1}], got [{lo}, {hi}]")
            if lo != hi:
                h, skips = self.encode(x, timesteps, y, program)

                def run(i, rows):  # the shared encoder ran once; each stage decodes its rows
                    sub = [take_rows(t, rows) for t in (h, *skips)]
                    return self.decode_stage(i, sub[0], sub[1:], program)

                return split_rows(stage, range(lo, hi + 1), run)
            stage = lo
        stage = int(stage)
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must lie in [0, {self.num_stages - 1}], got {stage}")
        h, skips = self.encode(x, timesteps, y, program)
        return self.decode_stage(stage, h, skips, program)


# -------------------------------------------------------------------------------- save / load
def save_multistage(model: MultistageUViT, path: str) -> None:
    """Atomically write {"config": ..., "state_dict": ...} (the whole model)."""
    from ..io_utils import atomic_torch_save

    atomic_torch_save({"format": "duodiff-fast-multistage-1", "config": model.config,
                       "state_dict": model.state_dict()}, path)


def load_multistage(path: str, map_location="cpu") -> MultistageUViT:
    """Rebuild a model written by :func:`save_multistage` (``torch.load(weights_only=True)``)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path!r} is not a multistage checkpoint (save_multistage writes one)")
    cfg = dict(blob["config"])
    model = MultistageUViT(cfg.pop("boundaries"), cfg.pop("stage_widths"), cfg.pop("stage_num_heads"), **cfg)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path!r} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# ---------------------------------------------------------------------------------- denoiser
class MultistageDenoiser(ModelDenoiser):
    """Routes each evaluation to its stage's decoder: eps = denoiser(x, t, y), t in (0, 1].

    Works with every solver: within a step all rows share t, so one decoder runs for the batch;
    mixed-t batches are split per stage. ``routing(ts)`` lists the stage of each solver time.
    """

    def __init__(self, model: MultistageUViT, schedule):
        if not isinstance(model, MultistageUViT):
            raise TypeError(f"MultistageDenoiser needs a MultistageUViT, got {type(model).__name__}")
        super().__init__(model, schedule)

    def host_route(self, t: torch.Tensor) -> Optional[int]:
        """The stage when the step's time is known on the host (sampling runtime), else None."""
        host = host_time(t)
        if host is None:
            return None
        return int(self.model.stage_of(torch.tensor([host], dtype=torch.float64).to(t.dtype))[0])

    def routing(self, ts: Sequence[float]) -> list:
        return self.model.stage_of(torch.as_tensor(list(ts), dtype=torch.float64)).tolist()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check(x, t, y)
        stage = self.host_route(t)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if stage is None:
            stage = self.model.stage_of(t).to(x.device)
        timesteps = self.schedule.model_input(t).to(device=x.device, dtype=torch.float32)
        dtype = model_dtype(self.model)
        return self.model(x.to(dtype), timesteps, y, stage=stage).to(x.dtype)


# --------------------------------------------------------------------------------- training
class MultistageObjective(DiffusionObjective):
    """L_simple with each batch drawn from one stage.

    Per batch: a stage i uniformly from the n stages, then t uniformly inside [t_i, t_{i+1})
    (discrete schedules: uniformly over the grid times in it; continuous: U[max(t_i, t_min), t_{i+1})),
    so the update touches the shared part and stage i's decoder only. ``metrics["stage"]`` records i.

    The stage is a function of (seed, step) only (:meth:`stage_for_step`), not of the per-rank
    generator: under DistributedDataParallel every rank trains the same stage in a step, so one
    optimizer update is one stage's, and an exact resume replays the same stage sequence. The
    Trainer announces each step through :meth:`on_step`; without it the objective counts its own
    calls from 0. t, noise and label drops still come from the per-rank generator. Under DDP set
    ``find_unused_parameters=True`` (the other decoders get no grad).
    """

    # Keeps the stage stream apart from other (seed, step) streams (data order, ...).
    STAGE_STREAM = 0x57A6E

    def __init__(self, schedule, boundaries: Sequence[float], num_classes: Optional[int] = None,
                 p_uncond: Optional[float] = None,
                 seed: int = 0):
        super().__init__(schedule, num_classes, p_uncond)
        self.boundaries = check_boundaries(boundaries)
        edges = (0.0,) + self.boundaries + (1.0,)
        self.intervals = list(zip(edges[:-1], edges[1:]))
        self.seed = int(seed)
        self.step = 0
        grid = self._grid()
        if grid is not None:
            for i, (a, b) in enumerate(self.intervals):
                if not self._grid_mask(grid, i).any():
                    raise ValueError(f"stage {i} [{a}, {b}) holds no time of the {grid.numel()}-step schedule")

    def on_step(self, step: int, seed: Optional[int] = None) -> None:
        """The next batch belongs to global optimizer step ``step`` of a run seeded with ``seed``."""
        self.step = int(step)
        if seed is not None:
            self.seed = int(seed)

    def stage_for_step(self, step: int) -> int:
        """The stage trained at ``step``: uniform over the stages, the same on every rank."""
        from ..training.data import _mix_seed

        g = torch.Generator().manual_seed(_mix_seed(self.seed, int(step), self.STAGE_STREAM))
        return int(torch.randint(0, len(self.intervals), (1,), generator=g))

    def _grid(self) -> Optional[torch.Tensor]:
        n = getattr(self.schedule, "num_timesteps", None)
        return None if n is None else self.schedule.discrete_grid(int(n))

    def _grid_mask(self, grid: torch.Tensor, i: int) -> torch.Tensor:
        a, b = self.intervals[i]
        last = i == len(self.intervals) - 1
        return (grid >= a) & ((grid <= b) if last else (grid < b))

    def sample_stage_t(self, batch: int, device, generator, stage: Optional[int] = None) -> tuple:
        """(stage i, t (batch,) float32 inside stage i); ``stage`` defaults to the current step's."""
        gdev = generator.device if generator is not None else device
        i = self.stage_for_step(self.step) if stage is None else int(stage)
        if not 0 <= i < len(self.intervals):
            raise ValueError(f"stage must lie in [0, {len(self.intervals) - 1}], got {i}")
        grid = self._grid()
        if grid is not None:
            pts = grid[self._grid_mask(grid, i)]
            j = torch.randint(0, pts.numel(), (batch,), generator=generator, device=gdev).cpu()
            t = pts[j]
        else:
            a, b = self.intervals[i]
            a = max(a, float(getattr(self.schedule, "t_min", 0.0)))
            u = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64).cpu()
            t = a + (b - a) * u
        return i, t.to(device=device, dtype=torch.float32)

    def __call__(self, model, x0, y, generator=None):
        stage, t = self.sample_stage_t(x0.shape[0], x0.device, generator)
        self.step += 1
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = self.schedule.add_noise(x0.float(), noise, t).to(torch.float32)
        y = self.training_labels(y, generator)
        eps = model(x_t, self.network_timesteps(t, x0.device), y, stage=stage)
        loss = (eps.float() - noise).pow(2).mean()
        return loss, {"loss": loss.detach(), "stage": torch.tensor(float(stage))}


__all__ = [
    "CIFAR10_BOUNDARIES", "check_boundaries", "stage_of", "StageDecoder", "MultistageUViT",
    "MultistageDenoiser", "MultistageObjective", "save_multistage", "load_multistage",
]
