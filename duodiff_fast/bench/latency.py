"""Per-sample sampling latency: base U-ViT and DuoDiff, for each solver and backend.

The main job of the project. For every (config, solver, backend, t_s) it times the whole sampling
loop for one batch, repeated, and reports the per-sample time (batch time / batch size): median
and spread. Random weights are used; latency does not depend on their values.

Defaults: on a CUDA device the DuoDiff paper's four configs at batch 128 (the paper's batching),
DDPM with the full 1000 steps. On a CPU the small "tiny" config at batch 2 with DDPM respaced to
200 steps (t_s still counts on the 1000-step axis), so the whole job stays under two minutes; pass
``--ddpm-steps 1000`` for the full chain.

    python benchmarks/latency.py                         # defaults for the machine
    python benchmarks/latency.py --configs cifar10-s2 --solvers ddim --backends reference
    duodiff-fast bench ...                               # the same, from an installed package

Prints a table and writes JSON (device, versions, settings, every timing) to benchmarks/results/.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch

from ..backends import BACKENDS, prepare_model
from ..io_utils import atomic_write_json
from ..methods import DuoDiff, ModelDenoiser
from ..models import PAPER_CONFIGS, create_model, get_spec, shallow_name
from ..samplers import sample
from ..schedules import get_schedule
from .common import environment, results_path, summarize, time_call

# Per-sample seconds the DuoDiff paper reports (its Table 2, A100, batch 128), for side-by-side
# reading only: they are not measured here. Keys: (config, solver, t_s).
PAPER_SECONDS: Dict[tuple, float] = {
    ("cifar10-s2", "ddpm", 0): 1.88, ("cifar10-s2", "ddpm", 300): 1.45,
    ("cifar10-s2", "ddpm", 400): 1.30, ("cifar10-s2", "ddpm", 500): 1.16,
    ("celeba64-s4", "ddpm", 0): 1.88, ("celeba64-s4", "ddpm", 300): 1.45,
    ("celeba64-s4", "ddpm", 400): 1.30, ("celeba64-s4", "ddpm", 500): 1.16,
    ("imagenet64-m4", "ddpm", 0): 5.12, ("imagenet64-m4", "ddpm", 300): 3.86,
    ("imagenet64-m4", "ddpm", 400): 3.45, ("imagenet64-m4", "ddpm", 500): 3.02,
    ("imagenet256-l2", "ddpm", 0): 10.94, ("imagenet256-l2", "ddpm", 300): 8.14,
    ("imagenet256-l2", "ddpm", 400): 7.21, ("imagenet256-l2", "ddpm", 500): 6.27,
    ("imagenet256-l2", "ddim", 0): 0.55, ("imagenet256-l2", "ddim", 300): 0.41,
}

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None,
                   help="comma-separated model configs (default: the DuoDiff paper's four on CUDA, 'tiny' on CPU)")
    p.add_argument("--solvers", default="ddpm,ddim", help="comma-separated solvers among ddpm, ddim")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated backends among {', '.join(BACKENDS)}")
    p.add_argument("--t-s", default="0,300,400,500",
                   help="DuoDiff switch points on the 1000-step axis; 0 is the base model")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128 on CUDA, 2 on CPU)")
    p.add_argument("--ddpm-steps", type=int, default=None,
                   help="DDPM steps (default 1000 on CUDA, 200 on CPU)")
    p.add_argument("--ddim-steps", type=int, default=DEFAULT_STEPS["ddim"], help="DDIM steps (default 50)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row before timing (default 1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the torch.compile backend (default: PyTorch's default)")
    p.add_argument("--results-dir", default="benchmarks/results",
                   help="folder for the JSON result (default benchmarks/results)")
    p.add_argument("--out", default=None,
                   help="JSON output path (default <results-dir>/latency_<device>_<configs>.json)")
    return p.parse_args(argv)


def _split(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run_config(name: str, args, device: torch.device) -> List[dict]:
    """Time every (solver, backend, t_s) row for one config; returns the result rows."""
    spec = get_spec(name)
    schedule = get_schedule(spec.schedule)
    torch.manual_seed(0)
    full_ref = create_model(name).to(device)
    shallow_ref = create_model(shallow_name(name)).to(device)
    shape = (args.batch_size, full_ref.in_chans, full_ref.img_size, full_ref.img_size)
    y = None
    if full_ref.is_conditional:
        y = torch.arange(args.batch_size, device=device) % (full_ref.num_classes - 1)
    rows = []
    for backend in _split(args.backends):
        full = prepare_model(full_ref, backend, compile_mode=args.compile_mode)
        shallow = prepare_model(shallow_ref, backend, compile_mode=args.compile_mode)
        for solver in _split(args.solvers):
            steps = args.ddpm_steps if solver == "ddpm" else args.ddim_steps
            for t_s in [int(v) for v in _split(args.t_s)]:
                denoiser = ModelDenoiser(full, schedule) if t_s == 0 else DuoDiff(shallow, full, schedule, t_s)

                def run():
                    with torch.inference_mode():
                        return sample(denoiser, schedule, shape, solver=solver, num_steps=steps, y=y,
                                      base_seed=0, device=device, progress=False)

                times = time_call(run, device, args.repeats, args.warmup)
                stats = summarize([t / args.batch_size for t in times])
                row = dict(config=name, solver=solver, steps=steps, backend=backend, t_s=t_s,
                           method="base" if t_s == 0 else f"DuoDiff t_s={t_s}",
                           batch_size=args.batch_size, per_sample=stats,
                           batch_seconds=summarize(times),
                           paper_per_sample_s=PAPER_SECONDS.get((name, solver, t_s)))
                rows.append(row)
                print(f"  {name:16s} {solver:5s} {backend:14s} t_s={t_s:<4d} "
                      f"{stats['median_s'] * 1e3:10.3f} ms/sample  (spread {stats['spread_pct']:.1f}%)",
                      flush=True)
    return rows


def print_table(rows: List[dict]) -> None:
    """Per-sample latency and speedup over the base model of the same config/solver/backend."""
    base = {(r["config"], r["solver"], r["backend"]): r["per_sample"]["median_s"] for r in rows if r["t_s"] == 0}
    print()
    print(f"{'config':16s} {'solver':9s} {'backend':14s} {'method':18s} {'ms/sample':>10s} {'spread':>7s} "
          f"{'speedup':>8s} {'paper s/sample':>15s}")
    for r in rows:
        med = r["per_sample"]["median_s"]
        b = base.get((r["config"], r["solver"], r["backend"]))
        speed = f"{b / med:7.2f}x" if b else "      -"
        paper = f"{r['paper_per_sample_s']:.2f}" if r["paper_per_sample_s"] else "-"
        print(f"{r['config']:16s} {r['solver'] + '-' + str(r['steps']):9s} {r['backend']:14s} {r['method']:18s} "
              f"{med * 1e3:10.3f} {r['per_sample']['spread_pct']:6.1f}% {speed:>8s} {paper:>15s}")


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark with command-line arguments ``argv``; returns the result dict."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    configs = _split(args.configs) if args.configs else (list(PAPER_CONFIGS) if on_gpu else ["tiny"])
    args.batch_size = args.batch_size or (128 if on_gpu else 2)
    args.ddpm_steps = args.ddpm_steps or (DEFAULT_STEPS["ddpm"] if on_gpu else 200)
    args.repeats = args.repeats or (5 if on_gpu else 3)
    for b in _split(args.backends):
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose among {', '.join(BACKENDS)}")
    for s in _split(args.solvers):
        if s not in DEFAULT_STEPS:
            raise SystemExit(f"unknown solver {s!r}; latency.py times {', '.join(DEFAULT_STEPS)}")
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  batch {args.batch_size}  repeats {args.repeats}")
    rows = []
    for name in configs:
        rows.extend(run_config(name, args, device))
    print_table(rows)
    result = dict(benchmark="latency", environment=env,
                  settings={k: v for k, v in vars(args).items() if k != "out"}, rows=rows)
    out = args.out or results_path(args.results_dir, "latency", device, "-".join(configs))
    atomic_write_json(out, result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
