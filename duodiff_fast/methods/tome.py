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

On a DiT the policy runs :func:`duodiff_fast.methods.caching_dit.dit_tome_forward` (the modulated
attention input is merged; DiT has no extra tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .caching import run_uvit

__all__ = ["MergePlan", "stride_destinations", "bipartite_plan", "merge", "unmerge", "ToMePolicy"]


class MergePlan:
    """Indices of one merge over the patch tokens (all (B, k) long, patch-token numbering).

    dst: destination tokens; unm: sources kept; src: merged sources; src_to: for each merged source,
    the position (0..n_dst-1) of its destination in ``dst``.
    """

    def __init__(self, dst: Tensor, unm: Tensor, src: Tensor, src_to: Tensor, n_tokens: int):
        self.dst, self.unm, self.src, self.src_to, self.n_tokens = dst, unm, src, src_to, n_tokens


def stride_destinations(h: int, w: int, stride: int, generator: Optional[torch.Generator] = None,
                        device=None) -> Tensor:
    """(n_dst,) patch indices of the destinations: one per whole stride x stride cell, at a random offset."""
    cy, cx = h // stride, w // stride
    if cy * cx == 0:
        raise ValueError(f"tome stride {stride} exceeds the {h}x{w} patch grid")
    off = torch.randint(stride * stride, (cy, cx), generator=generator)
    rows = torch.arange(cy).view(-1, 1) * stride + off // stride
    cols = torch.arange(cx).view(1, -1) * stride + off % stride
    return (rows * w + cols).reshape(-1).to(device)


def bipartite_plan(metric: Tensor, dst_idx: Tensor, r: int) -> MergePlan:
    """Plan merging r sources of ``metric`` (B, T, D) patch tokens into destinations ``dst_idx``."""
    B, T, _ = metric.shape
    is_dst = torch.zeros(T, dtype=torch.bool, device=metric.device)
    is_dst[dst_idx] = True
    src_idx = torch.nonzero(~is_dst).reshape(-1)
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


class ToMePolicy:
    """ToMe in every block's attention of a U-ViT (a policy of
    :class:`~duodiff_fast.methods.caching.CachingDenoiser`: same forward every step).

    Args:
        ratio: fraction of patch tokens merged, in [0, 1).
        stride: side of the destination grid cells (>= 1; 2 = one destination per 2x2 patches).
        seed: seed of the random offsets (re-drawn per forward, from a generator reset per trajectory).
    """

    name = "tome"

    def __init__(self, ratio: float = 0.5, stride: int = 2, seed: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"tome ratio must lie in [0, 1), got {ratio!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"tome stride must be an int >= 1, got {stride!r}")
        self.ratio, self.stride, self.seed = float(ratio), stride, seed
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

        def block(i, blk, h):
            a_in = blk.norm1(h)
            dst = stride_destinations(side, side, self.stride, self.generator, h.device)
            patches = a_in[:, extras:]
            plan = bipartite_plan(patches, dst, r)
            short = torch.cat([a_in[:, :extras], merge(patches, plan)], dim=1)
            a_out = blk.attn(short)
            h = h + torch.cat([a_out[:, :extras], unmerge(a_out[:, extras:], plan)], dim=1)
            return h + blk.mlp(blk.norm2(h))

        return run_uvit(model, x, timesteps, y, block)

    def details(self):
        return {"tome_ratio": self.ratio, "tome_stride": self.stride, "tome_seed": self.seed}
