"""Training-free caching and token merging on DiT: FORA-style block caching, Learning-to-Cache routers
and ToMe, as the DiT forms of the U-ViT policies of :mod:`duodiff_fast.methods.caching` and
:mod:`duodiff_fast.methods.tome` (which dispatch here when the model is a DiT).

DiT runs its own modules block by block (:func:`run_dit`: embed -> (tokens, c) -> every block with its
adaLN modulation of c -> final layer). A DiT block is

    x = x + gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))
    x = x + gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp))

**What the caches hold.** FORA and Learning-to-Cache reuse each block's *branch outputs*
``attn(...)`` and ``mlp(...)`` -- the attention and MLP layer outputs, before the adaLN gate -- and a
reused branch is added with the *current* step's gate ``gate(c_k)``. This is what the published
Learning-to-Cache DiT code does (its blocks return ``(att_out, mlp_out)`` before the gate and a reused
branch is multiplied by the gate of the step that reuses it) and what "caching the attention and MLP
outputs" (FORA) means on a DiT block; the gate and the shift/scale come from c, which every step
computes anyway (one (B, D) x (D, 6D) product per block), so the reused step costs no token-sized
matmul. Caching the gated term instead would freeze the step-k0 time conditioning inside it.

**Learning-to-Cache router files for DiT.** The published DiT routers (DDIM-20 / DDIM-50) are read
with :func:`~duodiff_fast.methods.caching.load_router` and scheduled as the published code does
(:class:`DiTRouterPolicy`: full steps alternate with cache steps, routers indexed by timestep); the
factory picks it for ``l2c`` on a DiT. :class:`~duodiff_fast.methods.caching.RouterPolicy` (one router
per step, U-ViT's layout) also runs on DiT.

DeepCache's skip caching needs U-ViT's long skips; DiT has none, so it is refused on DiT.

**ToMe on DiT.** Per block the modulated, normalised tokens (the attention input) are merged by the
stride-grid bipartite matching of :mod:`duodiff_fast.methods.tome` (DiT has no extra tokens: every
token is a patch), attention runs on the shorter sequence, the output is unmerged to every token, then
gated and added; the MLP runs on all tokens.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .caching import RouterPolicy  # caching imports this module only inside functions (no cycle)

__all__ = ["is_dit", "run_dit", "dit_branch_cache_forward", "dit_tome_forward", "DiTRouterPolicy"]

# block_fn(i, block, tokens (B, L, D), modulation: six (B, D) tensors) -> tokens (B, L, D)
DiTBlockFn = Callable[[int, torch.nn.Module, Tensor, Tuple[Tensor, ...]], Tensor]


def is_dit(model) -> bool:
    """True for a DiT backbone (blocks conditioned through adaLN on c, no long skips)."""
    from ..models.dit import DiT

    return isinstance(model, DiT)


def plain_dit_block(i: int, blk, h: Tensor, mod: Tuple[Tensor, ...]) -> Tensor:
    """Block i of a DiT with its modulation ``mod`` (the official block's arithmetic)."""
    from ..models.dit import modulate

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    h = h + gate_msa.unsqueeze(1) * blk.attn(modulate(blk.norm1(h), shift_msa, scale_msa))
    return h + gate_mlp.unsqueeze(1) * blk.mlp(modulate(blk.norm2(h), shift_mlp, scale_mlp))


def run_dit(model, x: Tensor, timesteps: Tensor, y: Optional[Tensor], block_fn: DiTBlockFn = plain_dit_block) -> Tensor:
    """The DiT forward written out block by block with ``block_fn`` for each block.

    x (B, C, H, W), timesteps (B,) network input, y (B,) labels -> (B, out_channels, H, W).
    """
    h, c = model.embed(x, timesteps, y)
    for i, blk in enumerate(model.layers()):
        h = block_fn(i, blk, h, blk.modulation(c))
    return model.decode(h, c)


def dit_branch_cache_forward(policy, model, x: Tensor, timesteps: Tensor, y: Optional[Tensor], step: int) -> Tensor:
    """FORA / Learning-to-Cache on a DiT: per block compute or reuse the attention and MLP branch
    outputs (before the gate) as ``policy.plan(step, i)`` says, keeping the latest in
    ``policy.attn`` / ``policy.mlp``; every branch is added with this step's gate."""
    from ..models.dit import modulate

    def block(i, blk, h, mod):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        do_attn, do_mlp = policy.plan(step, i)
        # the same cache protocol as U-ViT's (caching._BranchCache): a branch is reused only when
        # this trajectory wrote it (``fresh``); ``_keep`` writes in place into static buffers
        if do_attn or ("attn", i) not in policy.fresh:
            policy._keep(policy.attn, i, blk.attn(modulate(blk.norm1(h), shift_msa, scale_msa)))
            policy.fresh.add(("attn", i))
        h = h + gate_msa.unsqueeze(1) * policy.attn[i]
        if do_mlp or ("mlp", i) not in policy.fresh:
            policy._keep(policy.mlp, i, blk.mlp(modulate(blk.norm2(h), shift_mlp, scale_mlp)))
            policy.fresh.add(("mlp", i))
        return h + gate_mlp.unsqueeze(1) * policy.mlp[i]

    return run_dit(model, x, timesteps, y, block)


def dit_tome_forward(policy, model, x: Tensor, timesteps: Tensor, y: Optional[Tensor]) -> Tensor:
    """ToMe in every DiT block's attention: merge the modulated attention input, attend over the
    shorter sequence, unmerge, gate and add; ``policy`` gives ratio, stride and the generator."""
    from ..models.dit import modulate
    from .tome import bipartite_plan, merge, stride_destinations, unmerge

    side = model.img_size // model.patch_size
    r = int(policy.ratio * side * side)

    from .tome import tome_layers

    merging = set(tome_layers(model.num_layers, getattr(policy, "max_level", None), getattr(policy, "schedule", None),
                              arch="dit"))

    def block(i, blk, h, mod):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        if i not in merging:
            return plain_dit_block(i, blk, h, mod)
        a_in = modulate(blk.norm1(h), shift_msa, scale_msa)
        dst = stride_destinations(side, side, policy.stride, policy.generator)
        plan = bipartite_plan(a_in, dst, r)
        h = h + gate_msa.unsqueeze(1) * unmerge(blk.attn(merge(a_in, plan)), plan)
        return h + gate_mlp.unsqueeze(1) * blk.mlp(modulate(blk.norm2(h), shift_mlp, scale_mlp))

    return run_dit(model, x, timesteps, y, block)



class DiTRouterPolicy(RouterPolicy):
    """Learning-to-Cache as the published DiT code schedules its routers (its DDIM-20/50 files).

    With S routers for S sampling steps, the cache is refreshed on every even step k (every branch
    computed) and the odd steps are cache steps, which read the router of the *timestep index*
    S - 1 - k (the routers are numbered by the respaced timestep, ascending, while sampling runs from the
    noisiest step down): branch j of that router is recomputed when sigmoid(logit) > threshold, else the
    step k - 1 output is reused (with this step's gate). The published code only ever reads even routers.
    """

    name = "l2c"

    def plan(self, step, layer):
        if step >= self.num_steps:
            raise ValueError(f"the router has {self.num_steps} steps; this run asked for step {step}: run "
                             "with the step count the router was trained for")
        if step % 2 == 0:
            return True, True
        row = self.recompute[self.num_steps - 1 - step]
        return bool(row[2 * layer]), bool(row[2 * layer + 1])

    def details(self):
        per_step = [1.0 if k % 2 == 0 else self.recompute[self.num_steps - 1 - k].double().mean().item()
                    for k in range(1, self.num_steps)]
        return {"router": self.source, "router_steps": self.num_steps, "router_threshold": self.threshold,
                "router_layout": "dit (full steps 0, 2, ...; cache step k reads router S-1-k)",
                "router_recomputed_fraction": sum(per_step) / len(per_step) if per_step else 1.0}
