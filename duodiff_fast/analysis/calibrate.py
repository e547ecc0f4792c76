"""Pick AdaDiff's exit threshold theta for a target speedup or mean exit layer, per model.

A threshold does not transfer between models: the uncertainty modules' outputs depend on how well
each head of *this* model predicts the noise and on how the UEMs were trained, so the paper's
theta = 0.05 exits early on the authors' CIFAR-10 model and may never exit on another (or always).
:func:`calibrate_theta` therefore measures: it samples a few fixed batches (the same seeds for every
candidate) with the shrinking-batch AdaDiff and bisects theta on [0, 1] until the realised mean exit
layer, or the FLOP-based speedup it gives, meets the target. Both are monotone in theta for a
fixed trajectory (a larger theta lets every UEM fire earlier); the sampled trajectory itself
depends on theta, so the search keeps the best candidate it saw rather than assuming exactness.

Speedups are counted in FLOPs per sample (:func:`exit_costs`): a sample that exits at layer e
paid for the patch embedding, layers 1..e, the e + 1 uncertainty modules before them (N at the
full network) and one output head; the base model pays for the embedding, all N layers and its
final layer. Matmul FLOPs only (2 per multiply-add); LayerNorm, softmax and elementwise work is
left out, as it is small next to them.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["exit_costs", "flop_speedup", "calibrate_theta", "format_exit_table"]


def exit_costs(model) -> Dict[str, object]:
    """Matmul FLOPs per sample of an :class:`~duodiff_fast.methods.AdaDiffUViT`'s parts.

    Returns {"embed", "layers" (N per-layer values), "uem", "head", "final", "base", "by_exit"
    (N + 1 values: the cost of a sample exiting at layer e = 0 .. N)}.
    """
    bb = model.backbone
    cfg = bb.config
    D = int(bb.embed_dim)
    p, C = int(bb.patch_size), int(bb.in_chans)
    L = int(bb.num_patches)
    T = L + int(bb.extras)
    r = float(cfg.get("mlp_ratio", 4))
    hw = int(bb.img_size) ** 2

    def block(skip: bool) -> float:
        qkv, proj = 2 * T * D * 3 * D, 2 * T * D * D
        attn = 2 * 2 * T * T * D  # scores and the weighted sum
        mlp = 2 * 2 * T * D * r * D
        return qkv + proj + attn + mlp + (2 * T * 2 * D * D if skip else 0)

    n_in = len(bb.in_blocks)
    n_out = len(bb.out_blocks)
    layers = [block(False)] * n_in + [block(False)] + [block(bool(cfg.get("skip", True)))] * n_out
    embed = 2 * L * p * p * C * D
    conv = 2 * hw * C * C * 9 if cfg.get("conv", True) else 0
    head = 2 * L * D * p * p * C + conv  # LayerNorm + Linear to patch pixels + 3x3 conv: the final layer's shape
    # each UEM: the Linear layers of its MLP on the pooled (B, 2D) input (pooling and norm left out)
    uem = sum(2 * m.in_features * m.out_features for m in model.uems[0].mlp if isinstance(m, torch.nn.Linear))
    N = len(layers)
    prefix = [0.0]
    for c in layers:
        prefix.append(prefix[-1] + c)
    by_exit = [embed + prefix[e] + min(e + 1, N) * uem + head for e in range(N + 1)]
    base = embed + prefix[N] + head
    return {"embed": embed, "layers": layers, "uem": uem, "head": head, "final": head, "base": base,
            "by_exit": by_exit}


def flop_speedup(exits: torch.Tensor, costs: Dict[str, object]) -> float:
    """Base FLOPs over the mean FLOPs of samples exiting at ``exits`` (any shape of layer counts)."""
    by_exit = torch.tensor(costs["by_exit"], dtype=torch.float64)
    spent = by_exit[exits.reshape(-1).long()].mean()
    return float(costs["base"] / spent)


def _measure(model, schedule, theta: float, shape, solver: str, num_steps, ys, seeds, device, cfg_scale: float):
    from ..methods.adadiff import AdaDiff
    from ..samplers import ClassifierFreeGuidance, sample
    from .exit_trends import ExitRecorder

    rec = ExitRecorder(model.num_layers)
    den = AdaDiff(model, schedule, theta, mode="shrinking", recorder=rec)
    if cfg_scale > 0:
        den = ClassifierFreeGuidance(den, cfg_scale, model.null_class)
    with torch.inference_mode():
        for y, s in zip(ys, seeds):
            sample(den, schedule, shape, solver=solver, num_steps=num_steps, y=y, seeds=s, device=device,
                   progress=False)
    return rec


def calibrate_theta(
    model,
    schedule,
    shape: Sequence[int],
    *,
    target_speedup: Optional[float] = None,
    target_exit_layer: Optional[float] = None,
    num_batches: int = 2,
    labels: Optional[List[Optional[torch.Tensor]]] = None,
    solver: str = "ddim",
    num_steps: Optional[int] = 20,
    base_seed: int = 0,
    iterations: int = 12,
    tolerance: float = 0.01,
    device=None,
    cfg_scale: float = 0.0,
) -> Dict[str, object]:
    """Bisect theta in [0, 1] for a target FLOP speedup or a target mean exit layer.

    Args:
        model: an :class:`~duodiff_fast.methods.AdaDiffUViT` in eval mode.
        schedule: its noise schedule; shape: (B, C, H, W) of one batch.
        target_speedup: wanted base FLOPs / AdaDiff FLOPs per sample (>= 1), or
        target_exit_layer: wanted mean exit layer in [0, N] (exactly one of the two).
        num_batches: batches sampled per candidate (sample seeds fixed across candidates).
        labels: per batch (B,) class ids (conditional models) or None.
        iterations: bisection steps at most; stops early within ``tolerance`` (relative for the
            speedup, in layers for the exit layer).
    Returns:
        {"theta", "mean_exit_layer", "speedup", "target", "achieved", "history" (every candidate),
        "rows" (exit_stats of the chosen theta), "costs"}.
    """
    from .exit_trends import exit_stats

    if (target_speedup is None) == (target_exit_layer is None):
        raise ValueError("give exactly one of target_speedup and target_exit_layer")
    N = model.num_layers
    if target_speedup is not None and not (math.isfinite(target_speedup) and target_speedup >= 1.0):
        raise ValueError(f"target_speedup must be a number >= 1, got {target_speedup}")
    if target_exit_layer is not None and not 0.0 <= target_exit_layer <= N:
        raise ValueError(f"target_exit_layer must lie in [0, {N}] (the model has N = {N} layers), got {target_exit_layer}")
    if num_batches < 1 or iterations < 1:
        raise ValueError("num_batches and iterations must be >= 1")
    costs = exit_costs(model)
    B = int(shape[0])
    seeds = [[(base_seed * 1_000_003 + b * B + i) for i in range(B)] for b in range(num_batches)]
    ys = labels if labels is not None else [None] * num_batches
    if len(ys) != num_batches:
        raise ValueError(f"labels must hold one entry per batch ({num_batches}), got {len(ys)}")

    def evaluate(theta: float) -> dict:
        rec = _measure(model, schedule, theta, shape, solver, num_steps, ys, seeds, device, cfg_scale)
        _, exits = rec.tensors()
        return {"theta": theta, "mean_exit_layer": float(exits.double().mean()),
                "speedup": flop_speedup(exits, costs), "recorder": rec}

    # f(theta) increases with theta: the speedup, or minus the mean exit layer.
    if target_speedup is not None:
        f, goal, close = (lambda e: e["speedup"]), float(target_speedup), (lambda v: abs(v / target_speedup - 1) <= tolerance)
    else:
        f, goal, close = (lambda e: -e["mean_exit_layer"]), -float(target_exit_layer), \
            (lambda v: abs(-v - target_exit_layer) <= tolerance)
    history = []
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        e = evaluate(mid)
        history.append(e)
        v = f(e)
        if best is None or abs(v - goal) < abs(f(best) - goal):
            best = e
        if close(v):
            break
        if v < goal:
            lo = mid
        else:
            hi = mid
    rows = exit_stats(best["recorder"], schedule, N)
    return {
        "theta": best["theta"], "mean_exit_layer": best["mean_exit_layer"], "speedup": best["speedup"],
        "target": {"speedup": target_speedup} if target_speedup is not None else {"exit_layer": target_exit_layer},
        "achieved": bool(close(f(best))), "num_layers": N,
        "history": [{k: v for k, v in h.items() if k != "recorder"} for h in history],
        "rows": rows, "costs": {k: v for k, v in costs.items() if k != "layers"},
    }


def format_exit_table(rows: Sequence[dict], num_layers: int, max_rows: int = 25) -> str:
    """The exit-trend table of :func:`~duodiff_fast.analysis.exit_trends.exit_stats` rows, as text:
    step position, t, mean (std) exit layer, min..max, samples; at most ``max_rows`` evenly picked rows."""
    if not rows:
        return "(no exits recorded)"
    pick = rows if len(rows) <= max_rows else [rows[round(i * (len(rows) - 1) / (max_rows - 1))] for i in range(max_rows)]
    lines = [f"{'position':>9} {'t':>7} {'mean exit':>10} {'std':>6} {'min..max':>9} {'count':>6}   (N = {num_layers})"]
    for r in pick:
        lines.append(f"{r['position']:9.1f} {r['t']:7.4f} {r['mean_exit']:10.2f} {r['std_exit']:6.2f} "
                     f"{str(r['min_exit']) + '..' + str(r['max_exit']):>9} {r['count']:6d}")
    return "\n".join(lines)
