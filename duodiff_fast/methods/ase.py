"""ASE (Adaptive Score Estimation, Moon et al. 2023): time-dependent dropping of U-ViT decoder blocks
and of DiT blocks.

A *dropping schedule* maps continuous time t in [0, 1] (t = 0 data, t = 1 pure noise) to the number
k(t) of out- (decoder) blocks that run in full. On U-ViT, as the paper prescribes:

* in-blocks and the mid-block always run (they feed the long skip connections);
* out-blocks ``0 .. k-1`` (the ones nearest the mid-block, in execution order) run in full;
* every later out-block is *dropped*: it still applies its ``skip_linear`` (so the long skip from
  its in-block is kept), but its attention and MLP branches are skipped.

This is the early-exit reading of the paper: the network exits after k full decoder blocks, and the
remaining decoder blocks reduce to their skip merges before the final layer.

The paper's U-ViT schedules (its Table 2, U-ViT-S/4 with 6 out-blocks, CelebA 64) give the number of
kept out-blocks on five equal fifths of the time axis. Column order in :data:`PAPER_SCHEDULES` is
t in [0, 0.2) (near the data, hardest: most blocks), [0.2, 0.4), [0.4, 0.6), [0.6, 0.8),
[0.8, 1.0] (near the noise, easiest: fewest blocks). A t that sits exactly on a boundary belongs to
the noisier (right-hand) fifth. The paper's measured accelerations (EM sampler, 1000 steps) are in
:data:`PAPER_SPEEDUP_PCT`.

Work saved is real: within one solver step every row shares the timestep, so the dropped blocks'
attention and MLP are not computed for the whole batch. Rows at different timesteps (possible with a
custom solver, and always the case in training) are grouped per block: block j transforms only the
rows whose k(t) exceeds j.

On DiT (the paper's main system, DiT-XL/2 with 28 blocks) k(t) counts all blocks: blocks
``0 .. k-1`` run and the later ones are skipped whole (DiT has no long skips), i.e. blocks are
dropped from the final one backward. The DiT schedules of the paper's Table 2 are in
:data:`PAPER_DIT_SCHEDULES` (D1, D3, D4 on fifths; D6 on [0, 0.2) then tenths); other depths get
them rescaled from 28 blocks.

API: :class:`DroppingSchedule`, :func:`get_dropping_schedule`, :func:`ase_forward` (the truncated
forward), :class:`ASEUViT` (a U-ViT whose forward takes per-row kept counts, for training),
:class:`ASEDenoiser` (the solver-facing denoiser). Fine-tuning for a schedule (``ASEObjective``,
``ase_finetune_config``, ``finetune_ase``) lives in :mod:`duodiff_fast.methods.ase_training`, so that
sampling with ASE does not import the training package.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..backends import model_dtype
from ..models.program import program_for
from ..models.dit import DiT
from ..models.uvit import UViT
from ..samplers.constants import host_time
from .denoiser import ModelDenoiser

# Kept out-blocks per fifth of [0, 1]; first entry t in [0, 0.2) (data side), last [0.8, 1] (noise).
PAPER_SCHEDULES: Dict[str, Tuple[int, ...]] = {
    "D1": (6, 5, 4, 3, 2),
    "D2": (6, 5, 3, 2, 1),
    "D3": (6, 4, 3, 2, 1),
    "D4": (5, 4, 2, 2, 1),
    "D5": (5, 4, 2, 1, 1),
    "D6": (5, 3, 2, 1, 1),
}
# Kept DiT blocks (of DiT-XL/2's 28), the paper's Table 2: (kept per interval, interior boundaries).
# D2 and D5 are defined for U-ViT only.
PAPER_DIT_BLOCKS = 28
_FIFTHS = (0.2, 0.4, 0.6, 0.8)
PAPER_DIT_SCHEDULES: Dict[str, Tuple[Tuple[int, ...], Tuple[float, ...]]] = {
    "D1": ((28, 26, 24, 22, 20), _FIFTHS),
    "D3": ((28, 25, 22, 19, 16), _FIFTHS),
    "D4": ((28, 24, 20, 16, 12), _FIFTHS),
    "D6": ((28, 24, 22, 20, 18, 12, 10, 8, 6), (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
}
PAPER_DIT_SPEEDUP_PCT: Dict[str, float] = {"D1": 16.63, "D3": 23.43, "D4": 30.46, "D6": 38.32}
# The paper's measured sampling acceleration (Table 2 / Table 4, U-ViT on CelebA 64, EM-1000), percent.
PAPER_SPEEDUP_PCT: Dict[str, float] = {
    "D1": 16.26, "D2": 22.27, "D3": 24.77, "D4": 28.03, "D5": 30.71, "D6": 32.09,
}
PAPER_OUT_BLOCKS = 6  # U-ViT-S/4 (depth 12): the model the paper's U-ViT schedules were written for

KeepSpec = Union[int, torch.Tensor]


class DroppingSchedule:
    """Number of kept out-blocks as a step function of continuous time t in [0, 1].

    Args:
        kept: kept out-blocks per interval, first entry nearest the data (t = 0); ints >= 0.
        boundaries: interior interval edges, strictly increasing inside (0, 1), one fewer than
            ``kept``; default: equal intervals (``len(kept)`` of them). Interval i is
            [b_{i-1}, b_i) (the last one closed at 1): a t on an edge goes to the noisier side.
        name: label for tables and errors.

    Example: ``DroppingSchedule([6, 5, 4, 3, 2])`` is D1-U-ViT.
    """

    def __init__(self, kept: Sequence[int], boundaries: Optional[Sequence[float]] = None,
                 name: Optional[str] = None):
        kept = list(kept)
        if not kept:
            raise ValueError("a dropping schedule needs at least one interval (kept is empty)")
        for k in kept:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"kept block counts must be ints >= 0, got {kept!r}")
        if boundaries is None:
            boundaries = [i / len(kept) for i in range(1, len(kept))]
        boundaries = [float(b) for b in boundaries]
        if len(boundaries) != len(kept) - 1:
            raise ValueError(f"{len(kept)} intervals need {len(kept) - 1} interior boundaries, got {len(boundaries)}")
        for a, b in zip([0.0] + boundaries, boundaries + [1.0]):
            if not a < b:
                raise ValueError(
                    f"boundaries must be strictly increasing inside (0, 1), got {boundaries!r}")
        self.kept = tuple(kept)
        self.boundaries = tuple(boundaries)
        self.name = name or "custom"

    def __repr__(self) -> str:
        return f"DroppingSchedule(name={self.name!r}, kept={self.kept}, boundaries={self.boundaries})"

    @property
    def max_kept(self) -> int:
        return max(self.kept)

    def validate(self, num_out_blocks: int, what: str = "out-blocks") -> None:
        """Raise ValueError when the schedule asks for more droppable blocks (U-ViT out-blocks, DiT
        blocks: ``what``) than the model has."""
        if self.max_kept > num_out_blocks:
            raise ValueError(
                f"dropping schedule {self.name} keeps up to {self.max_kept} {what} but the model has "
                f"only {num_out_blocks}; use a deeper model or a schedule "
                f"with at most {num_out_blocks} kept blocks (see DroppingSchedule.rescaled)")

    def interval(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) long index of the interval holding each t (t clamped to [0, 1])."""
        t = torch.as_tensor(t).detach().reshape(-1)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        # Edges in t's own dtype, so a float32 t equal to float32(edge) counts as on the edge.
        edges = torch.tensor(self.boundaries, dtype=t.dtype, device=t.device)
        return torch.searchsorted(edges, t.clamp(0.0, 1.0).contiguous(), right=True)

    def kept_blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) long: kept out-blocks at continuous times t (B,)."""
        idx = self.interval(t)
        table = torch.tensor(self.kept, dtype=torch.long, device=idx.device)
        return table[idx]

    def mean_kept(self) -> float:
        """Kept out-blocks averaged over t uniform in [0, 1]."""
        edges = (0.0,) + self.boundaries + (1.0,)
        return sum(k * (b - a) for k, a, b in zip(self.kept, edges[:-1], edges[1:]))

    def rescaled(self, num_out_blocks: int, reference: int = PAPER_OUT_BLOCKS) -> "DroppingSchedule":
        """The same schedule for a model with ``num_out_blocks`` out-blocks: counts scaled by
        num_out_blocks / reference and rounded half up, at least 1 wherever the original keeps any."""
        if num_out_blocks <= 0:
            raise ValueError(f"num_out_blocks must be positive, got {num_out_blocks}")
        kept = []
        for k in self.kept:
            v = int(k * num_out_blocks / reference + 0.5)
            kept.append(min(num_out_blocks, max(1 if k > 0 else 0, v)))
        return DroppingSchedule(kept, self.boundaries, name=f"{self.name}@{num_out_blocks}")


def get_dropping_schedule(spec, arch: str = "uvit") -> DroppingSchedule:
    """A schedule from a paper name ("D1".."D6", also "D3-U-ViT"; for ``arch="dit"`` the DiT table:
    "D1", "D3", "D4", "D6", also "D3-DiT"), a list of kept counts per equal interval, or a
    :class:`DroppingSchedule` (returned as is)."""
    if isinstance(spec, DroppingSchedule):
        return spec
    if isinstance(spec, str) and (arch == "dit" or spec.upper().endswith("-DIT")):
        key = spec.upper().replace("-DIT", "").replace("_DIT", "")
        if key not in PAPER_DIT_SCHEDULES:
            raise ValueError(f"unknown DiT dropping schedule {spec!r}; the paper defines {sorted(PAPER_DIT_SCHEDULES)} "
                             "for DiT (D2 and D5 only for U-ViT)")
        kept, edges = PAPER_DIT_SCHEDULES[key]
        return DroppingSchedule(kept, edges, name=f"{key}-DiT")
    if isinstance(spec, str):
        key = spec.upper().replace("-U-VIT", "").replace("_U_VIT", "")
        if key not in PAPER_SCHEDULES:
            raise ValueError(f"unknown dropping schedule {spec!r}; named ones: {sorted(PAPER_SCHEDULES)}")
        return DroppingSchedule(PAPER_SCHEDULES[key], name=key)
    if isinstance(spec, (list, tuple)):
        return DroppingSchedule(spec)
    raise TypeError(f"a dropping schedule is a name, a list of kept counts or a DroppingSchedule, got {spec!r}")


# --------------------------------------------------------------------------- truncated forward
def run_blocks_dropped(model: UViT, tokens: torch.Tensor, keep: KeepSpec) -> torch.Tensor:
    """U-ViT layers with out-blocks ``>= keep`` reduced to their skip merge; (B, N, D) -> (B, N, D).

    Args:
        model: a UViT (or a FusedUViT: then on its backend).
        tokens: (B, N, D) output of ``model.embed``.
        keep: kept out-blocks: an int for the whole batch, or a (B,) long tensor per row.
    """
    return program_for(model, tokens).run_layers(tokens, keep)


def dropping_for(model: nn.Module, spec) -> DroppingSchedule:
    """The dropping schedule ``spec`` for ``model``: a paper name resolves in the table of the model's
    architecture (U-ViT's D1..D6 for 6 out-blocks, DiT's D1/D3/D4/D6 for 28 blocks) and is rescaled
    to the model's depth when it differs; lists and schedules are taken as they are."""
    n = droppable_blocks(model)
    if not isinstance(spec, str):
        return get_dropping_schedule(spec)
    if hasattr(model, "t_embedder"):
        dropping, reference = get_dropping_schedule(spec, arch="dit"), PAPER_DIT_BLOCKS
    else:
        dropping, reference = get_dropping_schedule(spec), PAPER_OUT_BLOCKS
    return dropping if n == reference else dropping.rescaled(n, reference=reference)


def droppable_blocks(model: nn.Module) -> int:
    """Blocks ASE may drop: a U-ViT's out-blocks, a DiT's blocks."""
    if hasattr(model, "out_blocks"):
        return len(model.out_blocks)
    if hasattr(model, "blocks") and hasattr(model, "t_embedder"):
        return len(model.blocks)
    raise TypeError(f"ASE needs a U-ViT or a DiT; got {type(model).__name__}")


def _check_keep(model: UViT, keep: KeepSpec, batch: int) -> None:
    n_out = droppable_blocks(model)
    if isinstance(keep, torch.Tensor) and keep.dim() > 0:
        if keep.shape != (batch,):
            raise ValueError(f"keep must be an int or a ({batch},) tensor, got shape {tuple(keep.shape)}")
        lo, hi = int(keep.min()), int(keep.max())
    else:
        lo = hi = int(keep)
    if lo < 0 or hi > n_out:
        raise ValueError(f"kept blocks must lie in [0, {n_out}] for this model, got values in [{lo}, {hi}]")


def ase_forward(model: UViT, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor],
                keep: KeepSpec, check: bool = True) -> torch.Tensor:
    """The truncated U-ViT forward: (B, C, H, W) -> eps (B, C, H, W).

    Args:
        model: the U-ViT. x: images. timesteps: (B,) the network's timestep input. y: labels or None.
        keep: kept out-blocks of a U-ViT, kept blocks of a DiT (int for the batch or (B,) long);
            all of them (``droppable_blocks(model)``) is the
            plain forward (bit-identical).
        check: validate inputs and ``keep`` (off inside the sampling loop: the denoiser checked).
    """
    if check:
        model.check_inputs(x, timesteps, y)
        _check_keep(model, keep, x.shape[0])
    return program_for(model, x).run(x, timesteps, y, keep=keep)


class ASEUViT(UViT):
    """A U-ViT whose forward also takes the kept out-blocks (same modules and state-dict keys).

    ``forward(x, timesteps, y=None, keep=None)``: ``keep`` None runs every block (the plain U-ViT);
    otherwise an int or a (B,) long tensor, as in :func:`ase_forward`. Training goes through this
    forward so that DistributedDataParallel sees it.
    """

    @classmethod
    def from_uvit(cls, model: UViT) -> "ASEUViT":
        """A copy of ``model`` (config and weights) as an ASEUViT."""
        new = cls(**model.config)
        new.load_state_dict(model.state_dict())
        return new.to(next(model.parameters()).device)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None,
                keep: Optional[KeepSpec] = None) -> torch.Tensor:
        if keep is None:
            return super().forward(x, timesteps, y)
        return ase_forward(self, x, timesteps, y, keep, check=not torch.compiler.is_compiling())


class ASEDiT(DiT):
    """A DiT whose forward also takes the kept blocks (same modules and state-dict keys), for
    fine-tuning: ``forward(x, t, y, keep=None)``, ``keep`` as in :func:`ase_forward`."""

    @classmethod
    def from_dit(cls, model: DiT) -> "ASEDiT":
        """A copy of ``model`` (config and weights) as an ASEDiT."""
        new = cls(**model.config)
        new.load_state_dict(model.state_dict())
        return new.to(next(model.parameters()).device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                keep: Optional[KeepSpec] = None) -> torch.Tensor:
        if keep is None:
            return super().forward(x, t, y)
        return ase_forward(self, x, t, y, keep, check=not torch.compiler.is_compiling())


# ---------------------------------------------------------------------------------- denoiser
def paper_or_given(dropping, num_out_blocks: int) -> "DroppingSchedule":
    """``get_dropping_schedule(dropping)``; a paper name (D1..D6, written for U-ViT-S/4's 6
    out-blocks) is rescaled to ``num_out_blocks`` when the model has another count (what the
    command line does, in ``sample --method ase`` and ``train --method ase``)."""
    named = isinstance(dropping, str)
    out = get_dropping_schedule(dropping)
    if named and num_out_blocks != PAPER_OUT_BLOCKS:
        out = out.rescaled(num_out_blocks)
    return out


class ASEDenoiser(ModelDenoiser):
    """Block-dropping denoiser for every solver: eps = denoiser(x, t, y), t continuous in (0, 1].

    Args:
        model: a UViT (plain or :class:`ASEUViT`), ideally fine-tuned for ``dropping``.
        schedule: the noise schedule the model was trained with.
        dropping: a :class:`DroppingSchedule`, a paper name ("D1".."D6") or a list of kept counts.

    ``calls`` counts, per out-block, how many rows had attention+MLP computed (measured work).
    """

    def __init__(self, model: UViT, schedule, dropping):
        super().__init__(model, schedule)
        n = droppable_blocks(model)
        is_dit = not hasattr(model, "out_blocks")
        self.dropping = get_dropping_schedule(dropping, arch="dit" if is_dit else "uvit")
        self.dropping.validate(n, "blocks" if is_dit else "out-blocks")

    def kept_blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) long: kept out-blocks at times t."""
        return self.dropping.kept_blocks(t)

    def host_route(self, t: torch.Tensor) -> Optional[int]:
        """Kept out-blocks when the step's time is known on the host (sampling runtime), else None:
        then no device value is read, so a CUDA graph can capture the call."""
        host = host_time(t)
        if host is None:
            return None
        return int(self.kept_blocks(torch.tensor([host], dtype=torch.float64).to(t.dtype))[0])

    def output(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output at times t (eps; with DiT's learned variance 2C channels)."""
        self.check(x, t, y)
        keep_spec: Optional[KeepSpec] = self.host_route(t)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if keep_spec is None:
            keep = self.kept_blocks(t).to(x.device)
            lo, hi = torch.stack(torch.aminmax(keep)).tolist()  # per-row times: one device read
            keep_spec = lo if lo == hi else keep  # one shared timestep: an int, no row split
        timesteps = self.schedule.model_input(t).to(device=x.device, dtype=torch.float32)
        dtype = model_dtype(self.model)
        return ase_forward(self.model, x.to(dtype), timesteps, y, keep_spec, check=False).to(x.dtype)


__all__ = [
    "PAPER_SCHEDULES", "PAPER_SPEEDUP_PCT", "DroppingSchedule", "get_dropping_schedule",
    "run_blocks_dropped", "droppable_blocks", "dropping_for", "ase_forward", "ASEUViT", "ASEDiT",
    "PAPER_DIT_SCHEDULES", "PAPER_DIT_SPEEDUP_PCT", "ASEDenoiser",
]
