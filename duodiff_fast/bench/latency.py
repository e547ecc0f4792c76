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
import copy
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
    p.add_argument("--backends", default=None,
                   help=f"comma-separated backends among {', '.join(BACKENDS)} (default: all; 'triton' "
                        "only on a CUDA device where it can run)")
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
    p.add_argument("--adadiff-thetas", default="0.05,0.07,0.09",
                   help="AdaDiff exit thresholds to time (shrinking batch, simulated, paper estimate); "
                        "'' for none")
    p.add_argument("--adadiff-backends", default=None,
                   help="backends for the AdaDiff rows (default: reference on CPU, reference,eager-bf16 on "
                        "CUDA; torch.compile is not used: the shrinking batch changes shapes every layer)")
    p.add_argument("--adadiff-solvers", default=None,
                   help="solvers of the AdaDiff rows (default: every --solvers entry on CUDA, ddim on CPU "
                        "to keep the CPU run short)")
    p.add_argument("--graph-solvers", default="ddim,dpm_solver",
                   help="solvers of the CUDA-graph-captured sampler rows (DDIM-<ddim-steps>, DPM-Solver-"
                        "<graph-dpm-steps>); '' for none. CUDA only")
    p.add_argument("--graph-dpm-steps", type=int, default=20, help="DPM-Solver NFE of the graph rows (default 20)")
    p.add_argument("--graph-batches", default=None,
                   help="batch sizes of the graph rows (default '1,<batch-size>')")
    p.add_argument("--graph-t-s", default="0,300", help="base (0) and DuoDiff switch points of the graph rows")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (also DUODIFF_NVTX=1) for nsys")
    p.add_argument("--methods", default="ase,multistage",
                   help="extra method rows: 'ase' (D1..D6 block dropping) and/or 'multistage'; '' for none")
    p.add_argument("--ase-schedules", default="D1,D2,D3,D4,D5,D6",
                   help="ASE dropping schedules to time (the paper's Table 2 names)")
    p.add_argument("--method-backends", default=None,
                   help="backends of the ASE/multistage rows (default: reference on CPU, reference,eager-bf16 on "
                        "CUDA; torch.compile is not used: these forwards bypass the compiled forward)")
    p.add_argument("--method-solvers", default=None,
                   help="solvers of the ASE/multistage rows (default: every --solvers entry on CUDA, ddim on CPU)")
    p.add_argument("--method-repeats", type=int, default=None,
                   help="timed runs per ASE/multistage row (default: --repeats on CUDA, 2 on CPU, to keep the "
                        "CPU job under two minutes)")
    p.add_argument("--multistage-boundaries", default="0.442,0.631",
                   help="multistage stage boundaries on t in [0, 1] (default: the paper's CIFAR-10 ones)")
    p.add_argument("--multistage-widths", default="1.5,1,0.125",
                   help="stage decoder widths as fractions of the shared width, data side first (default "
                        "1.5,1,0.125: the paper's 192/128/16 decoders over a 128 encoder)")
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
    if args.nvtx:
        from ..profiling import annotate_module

        annotate_module(full_ref, name), annotate_module(shallow_ref, shallow_name(name))
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
            rows.extend(adadiff_rows(name, args, device, schedule, full_ref, backend, solver, steps, shape, y,
                                     rows))
    rows.extend(graph_rows(name, args, device, schedule, full_ref, shallow_ref))
    rows.extend(method_rows(name, args, device, schedule, full_ref, shape, y, rows))
    return rows


def _kernel_seconds(fn) -> Optional[float]:
    """Sum of the device time of the CUDA kernels one call of ``fn`` runs (torch.profiler), or None."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
        return total_us * 1e-6 if total_us > 0 else None
    except Exception as exc:  # noqa: BLE001 - a profiler problem must not stop the benchmark
        print(f"  (kernel time not measured: {type(exc).__name__}: {exc})")
        return None


def graph_rows(name, args, device, schedule, full_ref, shallow_ref) -> List[dict]:
    """CUDA-graph-captured sampler vs the same loop uncaptured (Philox noise, fused updates), at batch 1
    and a large batch, base and DuoDiff; with the captured loop's summed kernel time (launch gaps)."""
    from ..runtime.graphs import GraphSampler

    solvers = _split(args.graph_solvers or "")
    if not solvers:
        return []
    if device.type != "cuda":
        print("  captured-sampler rows skipped: CUDA graphs need a CUDA device (on a CPU the runtime is the "
              "plain loop)", flush=True)
        return []
    batches = [int(b) for b in _split(args.graph_batches or f"1,{args.batch_size}")]
    backend = _split(args.backends)[0]
    full = prepare_model(full_ref, backend, compile_mode=args.compile_mode)
    shallow = prepare_model(shallow_ref, backend, compile_mode=args.compile_mode)
    sample_shape = (full_ref.in_chans, full_ref.img_size, full_ref.img_size)
    out = []
    for solver in solvers:
        steps = args.graph_dpm_steps if solver == "dpm_solver" else args.ddim_steps
        for t_s in [int(v) for v in _split(args.graph_t_s)]:
            den = ModelDenoiser(full, schedule) if t_s == 0 else DuoDiff(shallow, full, schedule, t_s)
            for b in batches:
                y = (torch.arange(b, device=device) % (full_ref.num_classes - 1)) if full_ref.is_conditional else None
                gs = GraphSampler(den, schedule, sample_shape, solver=solver, num_steps=steps, device=device)
                seeds = list(range(b))
                timed = {}
                for mode, fn in (("eager", lambda: gs.plain(seeds, y)), ("graph", lambda: gs(seeds, y))):
                    with torch.inference_mode():
                        times = time_call(fn, device, args.repeats, max(args.warmup, 1))
                    timed[mode] = times
                kernels = _kernel_seconds(lambda: gs(seeds, y)) if gs.graphs else None
                g_med, e_med = summarize(timed["graph"])["median_s"], summarize(timed["eager"])["median_s"]
                for mode in ("eager", "graph"):
                    stats = summarize([t / b for t in timed[mode]])
                    out.append(dict(config=name, solver=solver, steps=steps, backend=backend, t_s=None,
                                    duodiff_t_s=t_s, method=f"{'base' if t_s == 0 else f'DuoDiff {t_s}'} {mode}",
                                    runtime="cuda-graph" if mode == "graph" else "eager-philox-fused",
                                    captured=bool(gs.graphs) if mode == "graph" else False,
                                    capture_error=next(iter(gs.failed.values()), None) if mode == "graph" else None,
                                    batch_size=b, per_sample=stats, batch_seconds=summarize(timed[mode]),
                                    kernel_seconds=kernels if mode == "graph" else None,
                                    graph_over_kernels=(g_med / kernels) if (mode == "graph" and kernels) else None,
                                    graph_speedup=(e_med / g_med) if mode == "graph" else None,
                                    paper_per_sample_s=None))
                print(f"  {name:16s} {solver}-{steps} {backend:12s} t_s={t_s:<4d} B={b:<4d} eager {e_med * 1e3:9.3f} ms"
                      f"  graph {g_med * 1e3:9.3f} ms  ({e_med / g_med:.2f}x)"
                      + (f"  kernels {kernels * 1e3:.3f} ms (graph/kernels {g_med / kernels:.2f})" if kernels else "")
                      + ("" if gs.graphs else f"  [not captured: {next(iter(gs.failed.values()), '?')}]"),
                      flush=True)
    return out


# AdaDiff per-sample seconds of the DuoDiff paper's Table 2 (DDPM; * = its linear estimate from the
# mean exit layer). Keys: (config, theta). CelebA used thetas 0.06/0.07/0.08.
PAPER_ADADIFF_SECONDS: Dict[tuple, float] = {
    ("cifar10-s2", 0.05): 1.93, ("cifar10-s2", 0.07): 1.63, ("cifar10-s2", 0.09): 1.32,
    ("celeba64-s4", 0.06): 1.96, ("celeba64-s4", 0.07): 1.92, ("celeba64-s4", 0.08): 1.36,
    ("imagenet64-m4", 0.05): 5.25, ("imagenet64-m4", 0.07): 3.90, ("imagenet64-m4", 0.09): 3.24,
    ("imagenet256-l2", 0.05): 8.66, ("imagenet256-l2", 0.07): 7.67, ("imagenet256-l2", 0.09): 7.13,
}

ADADIFF_PROFILE = dict(t_switch=0.6, exit_layer=2, theta=0.07)
ADADIFF_NOTE = ("random backbone weights; UEM weights PROGRAMMED by set_synthetic_exit_profile"
                "(t_switch=0.6, exit_layer=2, theta=0.07) so that exits follow a figure-1-like time pattern "
                "(not a trained model's exits); mean_exit_layer is measured in the run")


def adadiff_rows(name, args, device, schedule, full_ref, backend, solver, steps, shape, y, rows) -> List[dict]:
    """AdaDiff rows for one (config, backend, solver): per theta, the measured shrinking batch, the
    measured simulated exit, and the paper's estimate (base time * mean exit layer / N)."""
    from ..analysis import ExitRecorder
    from ..methods import AdaDiff, AdaDiffUViT
    from ..methods.adadiff import set_synthetic_exit_profile

    thetas = [float(v) for v in _split(args.adadiff_thetas or "")]
    wanted = args.adadiff_backends or ("reference,eager-bf16" if device.type == "cuda" else "reference")
    base = next((r for r in rows if r["config"] == name and r["backend"] == backend and r["solver"] == solver
                 and r["t_s"] == 0), None)
    solvers = args.adadiff_solvers or (args.solvers if device.type == "cuda" else "ddim")
    if not thetas or backend not in _split(wanted) or solver not in _split(solvers) or base is None:
        return []
    profile = dict(ADADIFF_PROFILE, exit_layer=min(ADADIFF_PROFILE["exit_layer"], full_ref.num_layers - 1))
    ada = set_synthetic_exit_profile(AdaDiffUViT(copy.deepcopy(full_ref)), schedule, **profile).to(device)
    model = prepare_model(ada, backend, compile_mode=args.compile_mode)
    base_s = base["per_sample"]["median_s"]
    out = []
    for theta in thetas:
        recorder = ExitRecorder(model.num_layers)
        measured = {}
        for mode in ("shrinking", "simulated"):
            denoiser = AdaDiff(model, schedule, theta, mode=mode, recorder=recorder if mode == "shrinking" else None)

            def run():
                with torch.inference_mode():
                    return sample(denoiser, schedule, shape, solver=solver, num_steps=steps, y=y,
                                  base_seed=0, device=device, progress=False)

            run()  # warm-up; for the shrinking batch it also records the exit layers (untimed)
            denoiser.recorder = None
            times = time_call(run, device, args.repeats, max(args.warmup - 1, 0))
            measured[mode] = (summarize([t / args.batch_size for t in times]), summarize(times))
        mean_exit = recorder.mean_exit()
        n = model.num_layers
        estimate = base_s * mean_exit / n
        shrink_s = measured["shrinking"][0]["median_s"]
        allowed, realised = n / mean_exit, base_s / shrink_s
        common = dict(config=name, solver=solver, steps=steps, backend=backend, t_s=None, theta=theta,
                      batch_size=args.batch_size, mean_exit_layer=mean_exit, num_layers=n,
                      allowed_speedup=allowed, realised_speedup=realised,
                      speedup_efficiency=realised / allowed,
                      saving_efficiency=((1 - shrink_s / base_s) / (1 - mean_exit / n)) if mean_exit < n else None,
                      uem_profile=ADADIFF_NOTE,
                      paper_per_sample_s=PAPER_ADADIFF_SECONDS.get((name, theta)) if solver == "ddpm" else None)
        for mode, label in (("shrinking", "shrink"), ("simulated", "sim")):
            out.append(dict(common, method=f"AdaDiff {theta:g} {label}", exit_mode=mode,
                            per_sample=measured[mode][0], batch_seconds=measured[mode][1]))
        est = dict(median_s=estimate, min_s=estimate, max_s=estimate, stdev_s=0.0, spread_pct=0.0, repeats=0)
        out.append(dict(common, method=f"AdaDiff {theta:g} est", exit_mode="paper-estimate", per_sample=est,
                        batch_seconds=None))
        print(f"  {name:16s} {solver:5s} {backend:14s} AdaDiff theta={theta:g} mean exit {mean_exit:.2f}/{n}: "
              f"shrink {shrink_s * 1e3:.3f}  sim {measured['simulated'][0]['median_s'] * 1e3:.3f}  "
              f"est {estimate * 1e3:.3f} ms/sample; realised {realised:.2f}x of allowed {allowed:.2f}x "
              f"({100 * realised / allowed:.0f}%)", flush=True)
    return out


# ---------------------------------------------------------------- ASE and multistage rows
def _method_plan(args, device) -> tuple:
    """(methods, backends, solvers) of the ASE/multistage rows for this run."""
    methods = _split(args.methods or "")
    for m in methods:
        if m not in ("ase", "multistage"):
            raise SystemExit(f"unknown --methods entry {m!r}; choose among ase, multistage")
    backends = _split(args.method_backends or ("reference,eager-bf16" if device.type == "cuda" else "reference"))
    solvers = _split(args.method_solvers or (args.solvers if device.type == "cuda" else "ddim"))
    return methods, [b for b in backends if b != "torch.compile"], solvers


def _time_sampling(denoiser, schedule, shape, solver, steps, y, device, args, record_t=None):
    """Per-sample and batch statistics of whole sampling loops; ``record_t`` collects the solver times
    of the (untimed) warm-up run."""
    def run(den):
        with torch.inference_mode():
            return sample(den, schedule, shape, solver=solver, num_steps=steps, y=y, base_seed=0,
                          device=device, progress=False)

    if record_t is not None:
        def spy(x, t, yy=None):
            record_t.append(float(t.reshape(-1)[0]))
            return denoiser(x, t, yy)

        spy.check = denoiser.check
        run(spy)  # warm-up that also records the evaluation times
    repeats = args.method_repeats or (args.repeats if device.type == "cuda" else min(args.repeats, 2))
    times = time_call(lambda: run(denoiser), device, repeats, max(args.warmup - (record_t is not None), 0))
    return summarize([t / args.batch_size for t in times]), summarize(times)


def _time_interleaved(denoisers, schedule, shape, solver, steps, y, device, args):
    """Time several denoisers' sampling loops round-robin (one run of each per round), so that load
    changes on a shared machine hit all of them alike. Returns, per denoiser, (per-sample stats,
    batch stats, solver times of its untimed warm-up run)."""
    import time as _time

    from .common import synchronize

    def run(den):
        with torch.inference_mode():
            return sample(den, schedule, shape, solver=solver, num_steps=steps, y=y, base_seed=0,
                          device=device, progress=False)

    seen = []
    for den in denoisers:  # warm-up, recording the evaluation times
        ts: List[float] = []

        def spy(x, t, yy=None, den=den, ts=ts):
            ts.append(float(t.reshape(-1)[0]))
            return den(x, t, yy)

        spy.check = den.check
        run(spy)
        seen.append(ts)
    repeats = args.method_repeats or (args.repeats if device.type == "cuda" else min(args.repeats, 2))
    times: List[List[float]] = [[] for _ in denoisers]
    for _ in range(repeats):
        for i, den in enumerate(denoisers):
            synchronize(device)
            t0 = _time.perf_counter()
            run(den)
            synchronize(device)
            times[i].append(_time.perf_counter() - t0)
    return [(summarize([t / args.batch_size for t in ts]), summarize(ts), rec) for ts, rec in zip(times, seen)]


def ase_rows(name, args, device, schedule, full_ref, shape, y, backends, solvers) -> List[dict]:
    """ASE D1..D6 rows with their own base row, timed round-robin with it. The paper's schedules are
    written for 6 out-blocks: a shallower config is timed as its depth-12 twin (same width), a
    deeper one with the schedule rescaled to its out-block count."""
    from ..methods.ase import PAPER_OUT_BLOCKS, PAPER_SPEEDUP_PCT, ASEDenoiser, get_dropping_schedule

    n_out = len(full_ref.out_blocks)
    label = name
    model_ref = full_ref
    if n_out < PAPER_OUT_BLOCKS:
        torch.manual_seed(0)
        model_ref = create_model(name, depth=2 * PAPER_OUT_BLOCKS).to(device)
        label, n_out = f"{name}-d{2 * PAPER_OUT_BLOCKS}", PAPER_OUT_BLOCKS
    names = _split(args.ase_schedules or "")
    droppings = [get_dropping_schedule(n) for n in names]
    if n_out != PAPER_OUT_BLOCKS:
        droppings = [d.rescaled(n_out) for d in droppings]
    out = []
    for backend in backends:
        model = prepare_model(model_ref, backend, compile_mode=args.compile_mode)
        dens = [ModelDenoiser(model, schedule)] + [ASEDenoiser(model, schedule, d) for d in droppings]
        for solver in solvers:
            steps = args.ddpm_steps if solver == "ddpm" else args.ddim_steps
            timed = _time_interleaved(dens, schedule, shape, solver, steps, y, device, args)
            base_ps, base_b, _ = timed[0]
            out.append(dict(config=label, solver=solver, steps=steps, backend=backend, t_s=0, method="base",
                            batch_size=args.batch_size, per_sample=base_ps, batch_seconds=base_b,
                            paper_per_sample_s=None))
            base_s = base_ps["median_s"]
            for sched_name, dropping, (ps, bs, ts) in zip(names, droppings, timed[1:]):
                kept = dropping.kept_blocks(torch.tensor(ts, dtype=torch.float64)).double()
                ideal = 100.0 * float((n_out - kept).mean()) / model.num_layers  # dropped share of layers
                measured = 100.0 * (1.0 - ps["median_s"] / base_s)
                key = sched_name.upper().replace("-U-VIT", "")
                out.append(dict(config=label, solver=solver, steps=steps, backend=backend, t_s=None,
                                method=f"ASE {dropping.name}", ase_schedule=list(dropping.kept),
                                batch_size=args.batch_size, per_sample=ps, batch_seconds=bs,
                                mean_kept_out_blocks=float(kept.mean()), num_out_blocks=n_out,
                                measured_speedup_pct=measured, ideal_block_saving_pct=ideal,
                                paper_speedup_pct=PAPER_SPEEDUP_PCT.get(key),
                                paper_speedup_note="ASE Table 2: U-ViT-S/4 CelebA64, EM-1000 (time saved, %)",
                                paper_per_sample_s=None))
                print(f"  {label:16s} {solver:5s} {backend:14s} ASE {dropping.name:8s} {ps['median_s'] * 1e3:10.3f} "
                      f"ms/sample  saved {measured:5.1f}% (block-count bound {ideal:4.1f}%, paper "
                      f"{PAPER_SPEEDUP_PCT.get(key, float('nan')):.2f}%)", flush=True)
    return out


def multistage_rows(name, args, device, schedule, full_ref, shape, y, backends, solvers, rows) -> List[dict]:
    """A multistage row per (backend, solver): shared encoder of the config, stage decoders of the
    --multistage-widths fractions; its cost is the step-weighted mean of its stages' costs, measured
    as a whole loop and also estimated from one timed evaluation per stage."""
    from ..methods.multistage import MultistageDenoiser, MultistageUViT

    bounds = [float(v) for v in _split(args.multistage_boundaries)]
    d = full_ref.embed_dim
    widths = [max(1, int(round(float(f) * d))) for f in _split(args.multistage_widths)]
    torch.manual_seed(0)
    ms_ref = MultistageUViT(bounds, stage_widths=widths, **get_spec(name).kwargs).to(device)
    out = []
    for backend in backends:
        model = prepare_model(ms_ref, backend, compile_mode=args.compile_mode)
        den = MultistageDenoiser(model, schedule)
        for solver in solvers:
            steps = args.ddpm_steps if solver == "ddpm" else args.ddim_steps
            ts: List[float] = []
            ps, bs = _time_sampling(den, schedule, shape, solver, steps, y, device, args, record_t=ts)
            stages = den.routing(ts)
            counts = [stages.count(i) for i in range(model.num_stages)]
            per_stage = []
            x = torch.randn(shape, device=device)
            for i in range(model.num_stages):
                edges = [0.0] + bounds + [1.0]
                t_mid = torch.full((shape[0],), 0.5 * (edges[i] + edges[i + 1]), dtype=torch.float64,
                                   device=device)
                with torch.inference_mode():
                    per_stage.append(summarize(time_call(lambda: den(x, t_mid, y), device, 3, 1))["median_s"])
            estimate = sum(c * s for c, s in zip(counts, per_stage)) / args.batch_size
            base = next((r for r in rows if r["config"] == name and r["backend"] == backend
                         and r["solver"] == solver and r["t_s"] == 0), None)
            out.append(dict(config=name, solver=solver, steps=steps, backend=backend, t_s=None,
                            method="multistage", boundaries=bounds, stage_widths=widths,
                            stage_steps=counts, stage_eval_s=per_stage,
                            weighted_estimate_per_sample_s=estimate, batch_size=args.batch_size,
                            per_sample=ps, batch_seconds=bs, paper_per_sample_s=None,
                            measured_speedup_pct=(100.0 * (1.0 - ps["median_s"] / base["per_sample"]["median_s"])
                                                  if base else None)))
            print(f"  {name:16s} {solver:5s} {backend:14s} multistage {widths} steps/stage {counts}: "
                  f"{ps['median_s'] * 1e3:10.3f} ms/sample (stage-weighted estimate {estimate * 1e3:.3f})",
                  flush=True)
    return out


def method_rows(name, args, device, schedule, full_ref, shape, y, rows) -> List[dict]:
    """The ASE and multistage rows of one config (see --methods)."""
    methods, backends, solvers = _method_plan(args, device)
    out = []
    if "ase" in methods:
        out.extend(ase_rows(name, args, device, schedule, full_ref, shape, y, backends, solvers))
    if "multistage" in methods:
        out.extend(multistage_rows(name, args, device, schedule, full_ref, shape, y, backends, solvers, rows))
    return out


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
    if args.backends is None:
        from ..dispatch import triton_unavailable_reason

        # The Triton backend is timed only on a GPU: on the CPU it can only run in Triton's
        # (test-only, very slow) interpreter.
        why_not = "not timed on the CPU" if not on_gpu else triton_unavailable_reason(device)
        if why_not:
            print(f"backend triton skipped: {why_not}")
        args.backends = ",".join(b for b in BACKENDS if b != "triton" or not why_not)
    elif "triton" in _split(args.backends):
        from ..dispatch import triton_unavailable_reason

        why_not = triton_unavailable_reason(device)
        if why_not:
            raise SystemExit(f"backend triton cannot run: {why_not}")
    for b in _split(args.backends):
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose among {', '.join(BACKENDS)}")
    for s in _split(args.solvers):
        if s not in DEFAULT_STEPS:
            raise SystemExit(f"unknown solver {s!r}; latency.py times {', '.join(DEFAULT_STEPS)}")
    if args.nvtx:
        from .. import profiling

        profiling.enable(True)
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
