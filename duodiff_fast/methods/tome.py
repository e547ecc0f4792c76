"""Token merging (ToMe, Bolya & Hoffman 2023) for U-ViT's self-attention, as the ASE paper's baseline.

Per block: the normalised tokens are merged by bipartite soft matching before attention, attention
runs on the shorter sequence, and its output is unmerged (every merged token takes its destination's
output) before the residual add; the MLP runs on all tokens. The extra tokens (label, time) are never
merged.

Matching (ToMe for Stable Diffusion's stride grid): the h x w patch grid is cut into stride x stride
cells; in each whole cell one destination token is picked at a random offset, every other patch token
is a source. Each source is paired with its most cosine-similar destination; the r = floor(ratio *
patches) sources with the highest similarity are merged (averaged with their destination and the
destination's other merged sources); the rest stay.

Which blocks merge (:func:`tome_layers`): all by default; ``max_level`` keeps ToMe for Stable
Diffusion's "max downsample" idea on U-ViT, whose long skips pair in-block i with the out-block
mirrored to it: the level of layer i (0 <= i <= 2 n, n in-blocks) is ``min(i, 2 n - i) + 1`` (the
outermost pair is level 1, the mid-block level n + 1) and only layers with level <= max_level merge.
``schedule`` is the ASE paper's application (appendix B.3): "F<k>" merges in the first k layers,
"R<k>" in the last k, "B<k>" in k / 2 at each end (k even). Layers that do not merge draw no
destinations from the generator.

On a DiT the policy runs :func:`duodiff_fast.methods.caching_dit.dit_tome_forward` (the modulated
attention input is merged; DiT has no extra tokens).
"""
from __future__ import annotations

import re
from typing import List, Optional

import torch
from torch import Tensor

from .caching import run_uvit

__all__ = ["MergePlan", "stride_destinations", "bipartite_plan", "merge", "unmerge", "tome_layers", "ToMePolicy"]


class MergePlan:
    """Indices of one merge over the patch tokens (all (B, k) long, patch-token numbering).

    dst: destination tokens; unm: sources kept; src: merged sources; src_to: for each merged source,
    the position (0..n_dst-1) of its destination in ``dst``.
    """

    def __init__(self, dst: Tensor, unm: Tensor, src: Tensor, src_to: Tensor, n_tokens: int):
        self.dst, self.unm, self.src, self.src_to, self.n_tokens = dst, unm, src, src_to, n_tokens


def stride_destinations(h: int, w: int, stride: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(n_dst,) int64 host patch indices of the destinations: one per whole stride x stride cell, at a
    random offset (drawn from the CPU ``generator``)."""
    cy, cx = h // stride, w // stride
    if cy * cx == 0:
        raise ValueError(f"tome stride {stride} exceeds the {h}x{w} patch grid")
    off = torch.randint(stride * stride, (cy, cx), generator=generator)
    rows = torch.arange(cy).view(-1, 1) * stride + off // stride
    cols = torch.arange(cx).view(1, -1) * stride + off % stride
    return (rows * w + cols).reshape(-1)


def bipartite_plan(metric: Tensor, dst_idx: Tensor, r: int) -> MergePlan:
    """Plan merging r sources of ``metric`` (B, T, D) patch tokens into destinations ``dst_idx``.

    ``dst_idx`` (n_dst,) int64 patch indices on the host (as :func:`stride_destinations` draws them):
    the sources, their complement, are found there too, so planning never reads the device (a
    ``nonzero`` on a GPU tensor would wait for the whole queue once per merging layer).
    """
    if dst_idx.device.type != "cpu":
        raise ValueError(f"ToMe destinations must be host indices, got a tensor on {dst_idx.device}")
    B, T, _ = metric.shape
    is_dst = torch.zeros(T, dtype=torch.bool)
    is_dst[dst_idx] = True
    # non_blocking: a blocking host-to-device copy waits for the stream; from pageable memory CUDA
    # stages the bytes before the call returns, so the host tensors may go right after.
    src_idx = torch.nonzero(~is_dst).reshape(-1).to(metric.device, non_blocking=True)
    dst_idx = dst_idx.to(metric.device, non_blocking=True)
    r = max(0, min(int(r), src_idx.numel()))
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, src_idx] @ m[:, dst_idx].transpose(1, 2)  # (B, n_src, n_dst)
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src_all = src_idx.unsqueeze(0).expand(B, -1)
    merged, kept = order[:, :r], order[:, r:]
    return MergePlan(dst_idx.unsqueeze(0).expand(B, -1), torch.gather(src_all, 1, kept),
                     torch.gather(src_all, 1, merged), torch.gather(best_dst, 1, merged), T)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge(x: Tensor, plan: MergePlan) -> Tensor:
    """(B, T, D) patch tokens -> (B, n_unm + n_dst, D): kept sources, then destinations averaged with
    the sources merged into them."""
    dst = _take(x, plan.dst)
    if plan.src.shape[1]:
        src = _take(x, plan.src)
        index = plan.src_to.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        dst = dst.scatter_reduce(1, index, src, reduce="mean", include_self=True)
    return torch.cat([_take(x, plan.unm), dst], dim=1)


def unmerge(y: Tensor, plan: MergePlan) -> Tensor:
    """(B, n_unm + n_dst, D) -> (B, T, D): each token gets its own output, a merged source its destination's."""
    B, _, D = y.shape
    n_unm = plan.unm.shape[1]
    y_unm, y_dst = y[:, :n_unm], y[:, n_unm:]
    out = y.new_empty(B, plan.n_tokens, D)
    out.scatter_(1, plan.unm.unsqueeze(-1).expand(-1, -1, D), y_unm)
    out.scatter_(1, plan.dst.unsqueeze(-1).expand(-1, -1, D), y_dst)
    if plan.src.shape[1]:
        out.scatter_(1, plan.src.unsqueeze(-1).expand(-1, -1, D), _take(y_dst, plan.src_to))
    return out


def _check_selection(max_level: Optional[int], schedule: Optional[str]):
    """Checks the layer options; -> (kind, k) of a schedule, or None."""
    if max_level is not None and schedule is not None:
        raise ValueError("tome: give max_level or schedule, not both")
    if max_level is not None and (isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1):
        raise ValueError(f"tome max_level must be an int >= 1, got {max_level!r}")
    if schedule is None:
        return None
    m = re.fullmatch(r"([FRB])(\d+)", str(schedule))
    if m is None or int(m.group(2)) < 1:
        raise ValueError(f"tome schedule must be F<k>, R<k> or B<k> with k >= 1 (the ASE paper's), got {schedule!r}")
    kind, k = m.group(1), int(m.group(2))
    if kind == "B" and k % 2:
        raise ValueError(f"tome schedule {schedule}: B<k> applies k / 2 blocks at each end, k must be even")
    return kind, k


def tome_layers(num_layers: int, max_level: Optional[int] = None, schedule: Optional[str] = None,
                arch: str = "uvit") -> List[int]:
    """Indices of the layers that merge: a U-ViT's in-blocks, mid-block and out-blocks
    (``num_layers`` = 2 n + 1), or a DiT's blocks (``arch="dit"``).

    max_level: merge only in layers whose level ``min(i, num_layers - 1 - i) + 1`` is <= max_level
        (U-ViT only: the levels pair the long skips, which a DiT does not have).
    schedule: "F<k>" (first k layers), "R<k>" (last k), "B<k>" (k / 2 at each end, k even).
    At most one of the two; neither: every layer.
    """
    if arch == "dit":
        if max_level is not None:
            raise ValueError("tome max_level pairs a U-ViT's long-skip levels; a DiT has none: choose its "
                             "blocks with a schedule (F<k>, R<k>, B<k>)")
        if num_layers < 1:
            raise ValueError(f"a DiT has at least one block, got {num_layers}")
    elif num_layers < 1 or num_layers % 2 == 0:
        raise ValueError(f"a U-ViT has 2 n + 1 layers, got {num_layers}")
    parsed = _check_selection(max_level, schedule)
    if max_level is not None:
        return [i for i in range(num_layers) if min(i, num_layers - 1 - i) + 1 <= max_level]
    if parsed is None:
        return list(range(num_layers))
    kind, k = parsed
    if k > num_layers:
        raise ValueError(f"tome schedule {schedule}: k exceeds the model's {num_layers} layers")
    if kind == "F":
        return list(range(k))
    if kind == "R":
        return list(range(num_layers - k, num_layers))
    return sorted(set(range(k // 2)) | set(range(num_layers - k // 2, num_layers)))


class ToMePolicy:
    """ToMe in every block's attention of a U-ViT (a policy of
    :class:`~duodiff_fast.methods.caching.CachingDenoiser`: same forward every step).

    Args:
        ratio: fraction of patch tokens merged, in [0, 1).
        stride: side of the destination grid cells (>= 1; 2 = one destination per 2x2 patches).
        seed: seed of the random offsets (re-drawn per forward, from a generator reset per trajectory).
        max_level, schedule: which layers merge (:func:`tome_layers`; default all).
    """

    name = "tome"

    def __init__(self, ratio: float = 0.5, stride: int = 2, seed: int = 0, max_level: Optional[int] = None,
                 schedule: Optional[str] = None):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"tome ratio must lie in [0, 1), got {ratio!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"tome stride must be an int >= 1, got {stride!r}")
        self.ratio, self.stride, self.seed = float(ratio), stride, seed
        _check_selection(max_level, schedule)  # before any model is seen
        self.max_level, self.schedule = max_level, schedule
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, model, x, timesteps, y, step):
        from .caching_dit import dit_tome_forward, is_dit

        if is_dit(model):
            return dit_tome_forward(self, model, x, timesteps, y)
        side = model.img_size // model.patch_size
        extras = model.extras
        n_patches = side * side
        r = int(self.ratio * n_patches)
        merging = set(tome_layers(model.num_layers, self.max_level, self.schedule))

        def block(i, blk, h):
            if i not in merging:
                return blk.transform(h)
            a_in = blk.norm1(h)
            dst = stride_destinations(side, side, self.stride, self.generator)
            patches = a_in[:, extras:]
            plan = bipartite_plan(patches, dst, r)
            short = torch.cat([a_in[:, :extras], merge(patches, plan)], dim=1)
            a_out = blk.attn(short)
            h = h + torch.cat([a_out[:, :extras], unmerge(a_out[:, extras:], plan)], dim=1)
            return h + blk.mlp(blk.norm2(h))

        return run_uvit(model, x, timesteps, y, block)

    def details(self):
        out = {"tome_ratio": self.ratio, "tome_stride": self.stride, "tome_seed": self.seed}
        if self.max_level is not None:
            out["tome_max_level"] = self.max_level
        if self.schedule is not None:
            out["tome_schedule"] = self.schedule
        return out
