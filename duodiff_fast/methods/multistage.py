"""Multistage U-ViT (after "Improving Efficiency of Diffusion Models via Multi-Stage Framework and
Tailored Multi-Decoder Architectures"): one shared encoder, one decoder per stage of the time axis.

On U-ViT the shared part is the token front end (patch/time/label embeddings, ``pos_embed``), the
in-blocks and the mid-block; each stage owns its out-blocks (with their long-skip ``skip_linear``),
final LayerNorm and ``decoder_pred``. A stage may be wider or narrower than the shared width D.
Two layouts place the width change:

``layout="authors"`` (default)
    The multistage authors' released ``UViT_multimodel``: a stage of width W maps the width inside
    its first out-block, whose ``skip_linear`` is Linear(2 D, W) on cat[mid-block output, skip];
    later out-blocks have Linear(W + D, W). Every stage keeps the shared ``num_heads`` heads
    (head width W / num_heads), and one 3x3 final conv is shared by all stages (their
    ``[conv] * stage_num``: ``stages.{i}.final_layer`` are one module). Their checkpoints load with
    :func:`from_authors_state_dict` (keys ``de_modules.{s}.{j}.*``, ``norm.{s}``,
    ``decoder_pred.{s}``, ``final_layer.{s}``).
``layout="projected"``
    This package's earlier variant: a ``proj_in`` Linear(D, W) maps the mid-block output into the
    stage first, every out-block's ``skip_linear`` is Linear(W + D, W), the head count follows the
    shared head width where it divides W, and each stage has its own final conv. Files saved before
    layouts existed are of this layout and load as such.

With W == D (both layouts) a stage's decoder is exactly a U-ViT decoder (``from_uvit`` copies one in).

Stages split continuous time t in [0, 1] (t = 0 data, t = 1 noise) at boundaries
0 < t_1 < ... < t_{n-1} < 1: stage i serves (t_i, t_{i+1}] (the first also holds t = 0), the
authors' rule (they route a batch by row 0's t x 1000 in (lo, hi]); stage 0 is nearest the data.
CIFAR-10 default (the authors' ``cifar10_UViT_mul`` config, from the optimal-denoiser clustering):
t_1 = 0.4420, t_2 = 0.6308, three stages, decoders 768/512/128 wide over a 512-wide encoder.

API: :class:`MultistageUViT`, :class:`MultistageDenoiser` (routes each solver step to its stage),
:func:`save_multistage`, :func:`load_multistage`. Training (``MultistageObjective``, each batch from
one stage) lives in :mod:`duodiff_fast.methods.multistage_training`, so that sampling never imports
the training package.
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
from .denoiser import ModelDenoiser

CIFAR10_BOUNDARIES = (0.442, 0.6308)
LAYOUTS = ("authors", "projected")

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
    """(B,) long stage index of continuous times t (B,); stage i holds (t_i, t_{i+1}], so a t on a
    boundary goes to the earlier stage, as in the authors' code."""
    t = torch.as_tensor(t).detach().reshape(-1)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    # Edges in t's own dtype, so a float32 t equal to float32(edge) counts as on the edge.
    edges = torch.tensor(tuple(boundaries), dtype=t.dtype, device=t.device)
    return torch.searchsorted(edges, t.contiguous(), right=False)


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
        conv, mlp_ratio, qkv_bias, qk_scale, skip: as in UViT. layout: "authors" (the first
        out-block maps 2 D -> W) or "projected" (``proj_in`` D -> W first); see the module docstring.
    """

    def __init__(self, width: int, shared_width: int, num_blocks: int, num_heads: int, patch_size: int,
                 in_chans: int, mlp_ratio: float, qkv_bias: bool, qk_scale, conv: bool, skip: bool,
                 layout: str = "authors"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        if layout == "authors" and width != shared_width and not skip:
            raise ValueError("the authors' layout changes the width in the first out-block's skip_linear: "
                             "it needs skip=True when a stage width differs from embed_dim")
        self.width = width
        projected = layout == "projected" and width != shared_width
        self.proj_in = nn.Linear(shared_width, width) if projected else nn.Identity()
        blocks = []
        for j in range(num_blocks):
            blk = Block(width, num_heads, mlp_ratio, qkv_bias, qk_scale, skip=skip)
            if skip and width != shared_width:
                # cat[x, skip (D)] -> W; x is the D-wide mid-block output in the authors' first block.
                x_width = shared_width if (layout == "authors" and j == 0) else width
                blk.skip_linear = nn.Linear(x_width + shared_width, width)
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
        stage_num_heads: attention heads per stage (default: ``num_heads`` in every stage for the
            authors' layout; for "projected" the shared head width where it divides the stage
            width, else the largest divisor of the width not above ``num_heads``).
        layout: "authors" (default) or "projected", see the module docstring.
        **uvit_kwargs: the UViT constructor keywords of the shared encoder (``depth`` counts in- plus
            out-blocks as in UViT; each stage gets ``depth // 2`` out-blocks).

    ``forward(x (B,C,H,W), timesteps (B,), y=None, stage=...) -> eps``: ``stage`` is an int for the
    whole batch or a (B,) long tensor; rows of different stages are split and written back.
    The state dict holds the whole model (``shared.*`` and ``stages.{i}.*``).
    """

    def __init__(self, boundaries: Sequence[float] = CIFAR10_BOUNDARIES,
                 stage_widths: Optional[Sequence[int]] = None,
                 stage_num_heads: Optional[Sequence[int]] = None, layout: str = "authors",
                 **uvit_kwargs: Any):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.layout = layout
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
            stage_num_heads = ([heads] * n if layout == "authors" else [_stage_heads(w, d, heads) for w in widths])
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
                         cfg["qkv_bias"], cfg["qk_scale"], cfg["conv"], cfg["skip"], layout)
            for w, h in zip(widths, stage_num_heads)
        ])
        for stage in self.stages:
            init_linear_and_norm(stage)
        if layout == "authors":
            for stage in self.stages[1:]:  # one final conv for every stage, as their [conv] * stage_num
                stage.final_layer = self.stages[0].final_layer
        self.config = dict(cfg, boundaries=list(self.boundaries), stage_widths=widths,
                           stage_num_heads=stage_num_heads, layout=layout)

    @classmethod
    def from_uvit(cls, model: UViT, boundaries: Sequence[float] = CIFAR10_BOUNDARIES,
                  layout: str = "authors") -> "MultistageUViT":
        """Initialise every stage (full width) from a trained U-ViT: shared part and decoders copied."""
        kwargs = {k: v for k, v in model.config.items()}
        ms = cls(boundaries, layout=layout, **kwargs)
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
            lo, hi = torch.stack(torch.aminmax(stage)).tolist()  # per-row stages: one device read
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
    # Files written before layouts existed hold the "projected" layout.
    model = MultistageUViT(cfg.pop("boundaries"), cfg.pop("stage_widths"), cfg.pop("stage_num_heads"),
                           layout=cfg.pop("layout", "projected"), **cfg)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path!r} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# ------------------------------------------------------------------------- the authors' files
_SHARED_ROOTS = ("pos_embed", "patch_embed", "time_embed", "label_emb", "in_blocks", "mid_block")
_AUTHORS_STAGE_ROOTS = {"de_modules": "out_blocks", "norm": "norm", "decoder_pred": "decoder_pred",
                        "final_layer": "final_layer"}


def boundaries_from_intervals(stage_interval) -> tuple:
    """Interior boundaries of the authors' ``stage_interval`` (per stage one (lo, hi] interval on t,
    contiguous from 0 to 1), e.g. [[[0, 0.442]], [[0.442, 0.6308]], [[0.6308, 1]]] -> (0.442, 0.6308)."""
    spans = []
    for s, intervals in enumerate(stage_interval):
        if len(intervals) != 1:
            raise ValueError(f"stage {s} has {len(intervals)} intervals; this package routes one interval per stage")
        spans.append((float(intervals[0][0]), float(intervals[0][1])))
    if not spans or spans[0][0] != 0.0 or spans[-1][1] != 1.0:
        raise ValueError(f"stage intervals must run from 0 to 1, got {spans}")
    for (a, b), (c, d) in zip(spans, spans[1:]):
        if b != c:
            raise ValueError(f"stage intervals must be contiguous, got {spans}")
    return check_boundaries([b for _, b in spans[:-1]])


def from_authors_state_dict(sd) -> dict:
    """The authors' ``UViT_multimodel`` keys -> this package's (``shared.*``, ``stages.{s}.*``).

    ``de_modules.{s}.{j}.*`` -> ``stages.{s}.out_blocks.{j}.*``; ``norm.{s}``, ``decoder_pred.{s}``,
    ``final_layer.{s}`` -> ``stages.{s}.{norm, decoder_pred, final_layer}``; the encoder keys go
    under ``shared.``. Their three ``final_layer`` entries are one shared conv: they must be equal."""
    out = {}
    for key, val in sd.items():
        root, _, rest = key.partition(".")
        if root in _SHARED_ROOTS:
            out["shared." + key] = val
        elif root in _AUTHORS_STAGE_ROOTS:
            stage, _, tail = rest.partition(".")
            if not stage.isdigit() or not tail:
                raise ValueError(f"unexpected key {key!r} in an authors' multistage U-ViT state dict")
            out[f"stages.{stage}.{_AUTHORS_STAGE_ROOTS[root]}.{tail}"] = val
        else:
            raise ValueError(f"unexpected key {key!r} in an authors' multistage U-ViT state dict")
    finals = {}
    for key, val in out.items():
        if ".final_layer." in key:
            finals.setdefault(key.split(".final_layer.")[1], []).append((key, val))
    for name, entries in finals.items():
        if any(not torch.equal(entries[0][1], v) for _, v in entries[1:]):
            raise ValueError(f"final_layer.*.{name} differ between stages; the authors' layout shares one conv")
    return out


def to_authors_state_dict(model: "MultistageUViT") -> dict:
    """This package's authors-layout model as the authors' key names (the inverse of
    :func:`from_authors_state_dict`)."""
    if model.layout != "authors":
        raise ValueError(f"only the 'authors' layout has the authors' key names, this model is {model.layout!r}")
    inverse = {v: k for k, v in _AUTHORS_STAGE_ROOTS.items()}
    out = {}
    for key, val in model.state_dict().items():
        if key.startswith("shared."):
            out[key[len("shared."):]] = val
        else:
            _, stage, root, tail = key.split(".", 3)
            out[f"{inverse[root]}.{stage}.{tail}"] = val
    return out


def authors_multistage(config: dict, stage_interval, state_dict=None) -> "MultistageUViT":
    """A :class:`MultistageUViT` (authors' layout) from the authors' model config.

    ``config``: their ``config.model`` entries -- image_size, patch_size, in_chans, embed_dim, depth,
    num_heads, mlp_ratio, de_nfs, and optionally num_classes (-1), qkv_bias (False), mlp_time_embed
    (False), conv (True), qk_scale (None). ``stage_interval``: their per-stage (lo, hi] on t.
    ``state_dict``: their weights (loaded strictly) or None. The network is fed t x 1000."""
    c = dict(config)
    try:
        kwargs = dict(img_size=int(c.pop("image_size")), patch_size=int(c.pop("patch_size")),
                      in_chans=int(c.pop("in_chans")), embed_dim=int(c.pop("embed_dim")), depth=int(c.pop("depth")),
                      num_heads=int(c.pop("num_heads")), mlp_ratio=float(c.pop("mlp_ratio")))
        widths = [int(w) for w in c.pop("de_nfs")]
    except KeyError as e:
        raise ValueError(f"the authors' config lacks {e.args[0]!r}") from None
    for key, default in (("num_classes", -1), ("qkv_bias", False), ("mlp_time_embed", False), ("conv", True),
                         ("qk_scale", None)):
        kwargs[key] = c.pop(key, default)
    c.pop("stage_num", None)
    if c:
        raise ValueError(f"unsupported entries in the authors' config: {sorted(c)}")
    model = MultistageUViT(boundaries_from_intervals(stage_interval), stage_widths=widths, layout="authors", **kwargs)
    if state_dict is not None:
        model.load_state_dict(from_authors_state_dict(state_dict), strict=True)
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

    def output(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output at times t (the solvers call the denoiser itself: its first C channels)."""
        self.check(x, t, y)
        stage = self.host_route(t)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if stage is None:
            stage = self.model.stage_of(t).to(x.device)
        timesteps = self.schedule.model_input(t).to(device=x.device, dtype=torch.float32)
        dtype = model_dtype(self.model)
        return self.model(x.to(dtype), timesteps, y, stage=stage).to(x.dtype)


__all__ = [
    "CIFAR10_BOUNDARIES", "check_boundaries", "stage_of", "StageDecoder", "MultistageUViT",
    "MultistageDenoiser", "save_multistage", "load_multistage", "LAYOUTS",
    "boundaries_from_intervals", "from_authors_state_dict", "to_authors_state_dict", "authors_multistage",
]
