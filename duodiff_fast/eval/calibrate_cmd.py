"""``duodiff-fast calibrate``: find AdaDiff's theta for a target speedup or mean exit layer.

    duodiff-fast calibrate --config tiny-cond --adadiff-checkpoint runs/ada/adadiff.pt \\
        --target-speedup 1.3 --batches 2 --batch-size 8 --out calibration.json

Samples ``--batches`` fixed batches per candidate theta (the same seeds every time), bisects theta
(:func:`duodiff_fast.analysis.calibrate.calibrate_theta`), prints the exit-trend table of the
chosen theta and every candidate tried, and writes a JSON with all of it. Pass the theta it finds to
``sample --method adadiff --theta`` with the same solver and steps.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

__all__ = ["add_calibrate_parser", "cmd_calibrate"]


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="pick AdaDiff's exit threshold theta for a target speedup or mean exit layer",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model config of the backbone (see `duodiff-fast configs`)")
    p.add_argument("--adadiff-checkpoint", required=True,
                   help="AdaDiff weights (e.g. train --method adadiff's adadiff.pt, or a trainer checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="the backbone's weights, when the AdaDiff file holds heads and UEMs only")
    p.add_argument("--use-ema", action="store_true", help="read the EMA weights of trainer checkpoints")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-speedup", type=float, default=None,
                        help="wanted FLOP speedup over the base model per sample (>= 1)")
    target.add_argument("--target-exit-layer", type=float, default=None,
                        help="wanted mean exit layer in [0, N] (N = depth + 1 layers)")
    p.add_argument("--batches", type=int, default=2, help="batches sampled per candidate theta (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--solver", default="ddim", choices=("ddpm", "ddim", "dpm_solver"), help="solver (default ddim)")
    p.add_argument("--steps", type=int, default=20, help="solver steps (default 20; use what you will sample with)")
    p.add_argument("--iterations", type=int, default=12, help="bisection steps at most (default 12)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="stop within this relative speedup error, or this many layers (default 0.01)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default 0)")
    p.add_argument("--class-labels", default=None,
                   help="class ids for conditional models: comma-separated, cycled, or 'random' (default)")
    p.add_argument("--schedule", default=None, help="noise schedule (default: the config's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration batches (default 0)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", default="calibration.json", help="JSON output (default ./calibration.json)")


def cmd_calibrate(args) -> int:
    from ..analysis.calibrate import calibrate_theta, format_exit_table
    from ..io_utils import atomic_write_json
    from ..methods.factory import MethodWeights, _adadiff_model
    from ..models import get_spec, resolve_time_input
    from .sample_cmd import device_for, sample_labels

    for name in ("batches", "batch_size", "steps", "iterations"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    spec = get_spec(args.config)
    time_input = resolve_time_input(spec.time_input, [args.checkpoint, args.adadiff_checkpoint])
    schedule = spec.make_schedule(args.schedule, time_input)
    device = device_for(args.device, 0)
    checkpoints = {}
    weights = MethodWeights(full=args.checkpoint, adadiff=args.adadiff_checkpoint, use_ema=args.use_ema)
    model = _adadiff_model(args.config, weights, checkpoints).to(device).eval()
    num_classes = int(model.num_classes) if getattr(model.backbone, "is_conditional", False) else 0
    B = args.batch_size
    labels = []
    for b in range(args.batches):
        lab = sample_labels(np.arange(b * B, (b + 1) * B), args.seed, args.class_labels, num_classes)
        labels.append(None if lab is None else torch.from_numpy(lab).to(device))
    bb = model.backbone
    shape = (B, int(bb.in_chans), int(bb.img_size), int(bb.img_size))
    result = calibrate_theta(
        model, schedule, shape, target_speedup=args.target_speedup, target_exit_layer=args.target_exit_layer,
        num_batches=args.batches, labels=labels, solver=args.solver, num_steps=args.steps, base_seed=args.seed,
        iterations=args.iterations, tolerance=args.tolerance, device=device, cfg_scale=args.cfg_scale)
    N = result["num_layers"]
    print(f"exit trend at theta = {result['theta']:.6g} ({args.solver}, {args.steps} steps, "
          f"{args.batches} x {B} samples):")
    print(format_exit_table(result["rows"], N))
    print(f"\n{'theta':>10} {'mean exit':>10} {'speedup':>8}")
    for h in result["history"]:
        print(f"{h['theta']:10.6f} {h['mean_exit_layer']:10.3f} {h['speedup']:8.3f}")
    goal = (f"speedup {args.target_speedup}" if args.target_speedup is not None
            else f"mean exit layer {args.target_exit_layer}")
    verdict = "reached" if result["achieved"] else "NOT reached within the tolerance (closest candidate shown)"
    print(f"\ntheta = {result['theta']:.6g}: mean exit layer {result['mean_exit_layer']:.3f} of {N}, "
          f"FLOP speedup {result['speedup']:.3f}; target {goal} {verdict}")
    atomic_write_json(args.out, {
        **result, "config": args.config, "checkpoints": checkpoints, "solver": args.solver, "steps": args.steps,
        "batches": args.batches, "batch_size": B, "seed": args.seed, "cfg_scale": args.cfg_scale,
        "schedule": args.schedule or spec.schedule, "time_input": time_input,
    })
    print(f"wrote {args.out}")
    return 0
