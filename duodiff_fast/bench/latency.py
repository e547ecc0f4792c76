"""Per-sample sampling latency: base U-ViT, DuoDiff, AdaDiff, ASE and multistage, per solver and backend.

The main job of the project. The rows compared with one another -- the base model and every method
for one (config, solver, backend) -- are timed **interleaved** (one whole sampling loop of each per
round, the order rotating), after **warm-up** runs that are timed and reported apart (first-call
compilation, autotuning, allocator growth). Each row reports the median and interquartile range
(IQR) of its per-sample time (batch time / batch size) and keeps every repeat in the JSON. A
speedup is the median of the per-round ratios base_i / row_i with a 95% bootstrap interval over
the rounds; a drift of the whole machine moves both times of a round and cancels in the ratio. A
compared row whose paired ratios spread (IQR) more than ``--unstable-iqr`` % of their median, and a
base row whose own time IQR does, is marked **unstable**: its speedup is kept in the JSON but
printed as "unstable", not as a figure. A row that fails says so, with the error, in
the table and the JSON (status "failed"), and the command exits 1 after writing the JSON.

Defaults by machine (an option given on the command line always wins):

* CPU: the built-in ``tiny`` config, batch 2, one thread, DDPM respaced to 50 steps and DDIM-20,
  backend ``reference``, DuoDiff t_s 0/300/400/500, AdaDiff theta 0.07, ASE D1..D6 and a multistage
  model on DDIM; 11 rounds; the clock is the process's CPU time (``--clock``; wall seconds are kept
  too), so that other processes on a shared machine do not inflate the figures. About a minute;
  a check that the rows run and how they compare, not a performance result.
* CUDA: the DuoDiff paper's four configs at batch 128, DDPM-1000 and DDIM-50, every backend that can
  run (``triton`` included), plus CUDA-graph-captured sampler rows. This takes hours.
* ``--preset dit-cpu`` / ``--preset dit-xl2``: the DiT rows (a tiny DiT on a CPU; DiT-XL/2 at 256,
  batch 32, DDPM-250 and DDIM-50 on a GPU, backends reference, eager-bf16, triton and auto, the
  methods on eager-bf16 and triton): base, DuoDiff's 3-block twin, AdaDiff and ASE D1/D3/D4/D6-DiT;
  on a GPU also the captured sampler (DDIM-50 over DiT's respaced steps) against its plain loop.
* ``--preset gpu-suite``: the narrowed GPU plan of ``benchmarks/gpu_suite.sh`` (cifar10-s2, batch 64,
  DDIM-50, every backend, AdaDiff/ASE/multistage on eager-bf16, captured-sampler rows of DDIM-50 and
  DPM-Solver++ (20 NFE, cheaper than DDIM's rows), a 200 s budget).

``--methods deepcache,fora,l2c`` on CUDA with graph rows asked for (``--graph-solvers``) also times
each of them three ways (group ``caching_graph``): the plain loop, the plain loop replaying one
graph per step pattern (``runtime.cache_graphs``), and the whole loop captured (``GraphSampler``).

``--budget SECONDS``: groups not started within the budget are recorded as skipped (with the reason).

    python benchmarks/latency.py                         # defaults for the machine
    python benchmarks/latency.py --configs cifar10-s2 --solvers ddim --backends reference,eager-bf16
    duodiff-fast bench ...                               # the same, from an installed package

Prints a table and writes JSON (device, versions, settings, every timing) to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import copy
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..backends import BACKEND_CHOICES, BACKENDS, prepare_model
from ..io_utils import atomic_write_json
from ..methods import DuoDiff, ModelDenoiser
from ..models import PAPER_CONFIGS, create_model, get_spec, shallow_spec
from ..samplers import sample
from ..schedules import get_schedule
from .common import environment, results_path
from .stats import DEFAULT_UNSTABLE_IQR_PCT, speedup, summarize
from .timing import error_text, time_interleaved

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

SOLVERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++")
# Solvers of the captured-sampler rows (fixed-step loops GraphSampler captures whole).
GRAPH_SOLVERS = ("ddim", "dpm_solver", "dpm_solver++")
CACHING_ROWS = ("deepcache", "fora", "tome", "l2c")  # training-free rows (duodiff_fast.methods.caching, tome)
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


# ------------------------------------------------------------------------------------ settings
# Defaults per device type; a preset overrides them; an option given on the command line wins.
DEFAULTS: Dict[str, dict] = {
    "cpu": dict(configs="tiny", batch_size=2, solvers="ddpm,ddim", ddpm_steps=50, ddim_steps=20, dpm_steps=20,
                backends="reference", t_s="0,300,400,500", repeats=11, warmup=1, threads=1,
                adadiff_thetas="0.07", adadiff_backends="reference", adadiff_solvers="ddim",
                methods="ase,multistage", method_backends="reference", method_solvers="ddim",
                ase_schedules="D1,D2,D3,D4,D5,D6", graph_solvers="", graph_batches=None, graph_t_s="0,300",
                graph_dpm_steps=20, budget=0.0),
    "cuda": dict(configs=",".join(PAPER_CONFIGS), batch_size=128, solvers="ddpm,ddim", ddpm_steps=1000,
                 ddim_steps=50, dpm_steps=20, backends=None, t_s="0,300,400,500", repeats=5, warmup=1, threads=None,
                 adadiff_thetas="0.05,0.07,0.09", adadiff_backends="reference,auto", adadiff_solvers=None,
                 methods="ase,multistage", method_backends="reference,auto", method_solvers=None,
                 ase_schedules="D1,D2,D3,D4,D5,D6", graph_solvers="ddim,dpm_solver,dpm_solver++", graph_batches=None,
                 graph_t_s="0,300", graph_dpm_steps=20, budget=0.0),
}
PRESETS: Dict[str, dict] = {
    # DiT rows (the ASE paper's main system): a tiny DiT on a CPU, DiT-XL/2 at 256 on a GPU; base,
    # DuoDiff (3-block twin), AdaDiff and ASE D1/D3/D4/D6-DiT (DiT has no multistage model here); the
    # CPU preset also times FORA and ToMe on DiT (l2c joins with --methods ...,l2c --l2c-router FILE).
    "dit-cpu": dict(configs="dit-tiny", batch_size=2, solvers="ddpm,ddim", ddpm_steps=50, ddim_steps=20,
                    backends="reference", t_s="0,300,500", adadiff_thetas="0.07", adadiff_backends="reference",
                    adadiff_solvers="ddim", methods="ase,fora,tome", method_backends="reference", method_solvers="ddim",
                    ase_schedules="D1,D3,D4,D6", graph_solvers=""),
    "dit-xl2": dict(configs="dit-xl2-256", batch_size=32, solvers="ddpm,ddim", ddpm_steps=250, ddim_steps=50,
                    backends="reference,eager-bf16,triton,auto", t_s="0,300,500", repeats=3, adadiff_thetas="0.07",
                    adadiff_backends="eager-bf16,triton", adadiff_solvers="ddim", methods="ase",
                    method_backends="eager-bf16,triton", method_solvers="ddpm,ddim", ase_schedules="D1,D3,D4,D6",
                    graph_solvers="ddim", graph_batches="1,32", graph_t_s="0,300"),
    # benchmarks/gpu_suite.sh: a few minutes on an H100 (the whole suite must end in < 9 minutes)
    "gpu-suite": dict(configs="cifar10-s2", batch_size=64, solvers="ddim", ddim_steps=50, backends=None,
                      t_s="0,300,500", repeats=5, warmup=1, adadiff_thetas="0.07", adadiff_backends="auto",
                      adadiff_solvers="ddim", methods="ase,multistage", method_backends="auto",
                      method_solvers="ddim", ase_schedules="D1,D2,D3,D4,D5,D6", graph_solvers="ddim,dpm_solver++",
                      graph_batches="1,64", graph_t_s="0,300", budget=200.0),
}


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    from .edm_latency import EDM_PRESETS

    a("--preset", default=None, choices=sorted(PRESETS) + sorted(EDM_PRESETS),
      help="a named plan (gpu-suite: the GPU suite's narrowed plan; dit-cpu, dit-xl2: the DiT rows; edm-cpu, "
      "edm-cifar10: EDM's U-Net vs the multistage U-Net under Heun, see duodiff_fast.bench.edm_latency)")
    a("--heun-steps", type=int, default=None, help="EDM presets: Heun steps N (NFE 2N - 1; default 6 on edm-cpu, "
      "18 on edm-cifar10: NFE 35)")
    a("--configs", default=None, help="comma-separated model configs: registered names, JSON model config paths or "
      "checkpoint/run folders (default: --checkpoint when it is such a folder, else 'tiny' on CPU, the paper's "
      "four on CUDA)")
    a("--solvers", default=None, help=f"comma-separated solvers among {', '.join(SOLVERS)} (default ddpm,ddim)")
    a("--backends", default=None, help=f"comma-separated backends among {', '.join(BACKEND_CHOICES)}; auto is the "
      "backend `duodiff-fast sample` picks by default (self-checked, recorded as backend_choice) (default: reference "
      "on CPU; on CUDA every backend that can run there, triton included: the comparison)")
    a("--t-s", default=None, help="DuoDiff switch points on the 1000-step axis; 0 is the base model (default 0,300,400,500)")
    a("--batch-size", type=int, default=None, help="batch size (default 2 on CPU, 128 on CUDA)")
    a("--ddpm-steps", type=int, default=None, help="DDPM steps (default 50 on CPU, 1000 on CUDA)")
    a("--ddim-steps", type=int, default=None, help="DDIM steps (default 20 on CPU, 50 on CUDA)")
    a("--dpm-steps", type=int, default=None, help="DPM-Solver and DPM-Solver++ NFE (default 20; their default "
      "splits: DPM-Solver-fast, DPM-Solver++ 2M)")
    a("--repeats", type=int, default=None, help="timed rounds per group (default 11 on CPU, 5 on CUDA)")
    a("--warmup", type=int, default=None, help="untimed (separately reported) runs per row before timing (default 1)")
    a("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: steadier timings on a shared "
      "machine; CUDA: torch's default)")
    a("--clock", default=None, choices=("wall", "process"), help="what a repeat measures: wall (latency; the "
      "default on CUDA and with several CPU threads) or process (CPU seconds of this process; the default for a "
      "single-threaded CPU run, steady on a shared machine). Wall seconds are kept in the JSON either way")
    a("--unstable-iqr", type=float, default=DEFAULT_UNSTABLE_IQR_PCT,
      help=f"mark a row unstable when the spread of its paired speedups (a base row: of its time) exceeds "
      f"this %% of the median (default {DEFAULT_UNSTABLE_IQR_PCT:g})")
    a("--budget", type=float, default=None, help="seconds: groups not started by then are recorded as skipped "
      "(default: none; gpu-suite preset 200)")
    a("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    a("--compile-mode", default=None, help="torch.compile mode of the torch.compile backend (default: PyTorch's)")
    a("--adadiff-thetas", default=None, help="AdaDiff exit thresholds ('' for none; default 0.07 on CPU, "
      "0.05,0.07,0.09 on CUDA): per theta the measured shrinking batch, the simulated exit, the paper's estimate")
    a("--adadiff-backends", default=None, help="backends of the AdaDiff rows (default reference on CPU, "
      "reference,auto on CUDA; never torch.compile, also when auto picks it: the shrinking batch changes shapes "
      "every layer)")
    a("--adadiff-solvers", default=None, help="solvers of the AdaDiff rows (default ddim on CPU, every solver on CUDA)")
    a("--methods", default=None, help="extra method rows: 'ase' (D1..D6 block dropping), 'multistage', and the "
      "training-free 'deepcache', 'fora', 'tome', 'l2c' (needs --l2c-router); '' for none")
    a("--cache-interval", type=int, default=None, help="deepcache/fora rows: full step every N evaluations "
      "(default deepcache 3, fora 2)")
    a("--tome-ratio", type=float, default=0.5, help="tome row: fraction of patch tokens merged (default 0.5)")
    a("--l2c-router", default=None, help="l2c row: a Learning-to-Cache router file ('<step>.prob' logits)")
    a("--l2c-threshold", type=float, default=0.1, help="l2c row: router threshold (default 0.1)")
    a("--ase-schedules", default=None, help="ASE dropping schedules (the paper's Table 2 names; default D1..D6)")
    a("--method-backends", default=None, help="backends of the ASE/multistage rows (default reference on CPU, "
      "reference,auto on CUDA; never torch.compile, also when auto picks it: these forwards bypass the compiled "
      "forward)")
    a("--method-solvers", default=None, help="solvers of the ASE/multistage rows (default ddim on CPU, every solver on CUDA)")
    a("--adadiff-checkpoint", default=None, help="trained AdaDiff weights (this package's AdaDiffUViT state dict, "
      "or the DuoDiff/AdaDiff authors' early-exit files) for the AdaDiff rows instead of programmed exits; "
      "needs one --configs entry that fits them (a heads-only file takes its backbone from --checkpoint)")
    a("--checkpoint", default=None, help="full U-ViT weights for the backbone of a heads-only --adadiff-checkpoint")
    a("--multistage-checkpoint", default=None, help="a saved MultistageUViT (save_multistage) for the multistage "
      "row instead of random stage decoders; needs one --configs entry")
    a("--multistage-boundaries", default="0.442,0.631", help="multistage stage boundaries on t (default: the paper's CIFAR-10 ones)")
    a("--multistage-widths", default="1.5,1,0.125", help="stage decoder widths as fractions of the shared width, data "
      "side first (default 1.5,1,0.125: the paper's 192/128/16 decoders over a 128 encoder)")
    a("--graph-solvers", default=None, help="solvers of the CUDA-graph-captured sampler rows among "
      f"{', '.join(GRAPH_SOLVERS)} (CUDA only; default ddim,dpm_solver,dpm_solver++, gpu-suite ddim,dpm_solver++; "
      "'' for none). They run on the fastest backend of the main rows")
    a("--graph-dpm-steps", type=int, default=None, help="DPM-Solver and DPM-Solver++ NFE of the graph rows (default 20)")
    a("--graph-batches", default=None, help="batch sizes of the graph rows (default '1,<batch-size>')")
    a("--graph-t-s", default=None, help="base (0) and DuoDiff switch points of the graph rows (default 0,300)")
    a("--nvtx", action="store_true", help="emit NVTX ranges (also DUODIFF_NVTX=1) for nsys")
    a("--no-progress", action="store_true", help="hide the progress bars")
    a("--results-dir", default="benchmarks/results", help="folder for the JSON result (default benchmarks/results)")
    a("--out", default=None, help="JSON output path (default <results-dir>/latency_<device>_<configs>.json)")
    return p


def parse_args(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def _split(text: Optional[str]) -> List[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def resolve(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill every option left unset from the preset, then the device type's defaults; check names.
    Usage errors raise SystemExit with a message (exit status 2 through ``duodiff-fast bench``)."""
    base = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    if args.configs is None and args.checkpoint and not args.preset:
        from ..models import resolve_pretrained_folder

        if os.path.isdir(args.checkpoint) and resolve_pretrained_folder(args.checkpoint):
            args.configs = args.checkpoint  # a checkpoint or run folder names its own architecture
    layer = dict(base, **PRESETS[args.preset]) if args.preset else base
    for key, value in layer.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.adadiff_solvers = args.adadiff_solvers if args.adadiff_solvers is not None else args.solvers
    args.method_solvers = args.method_solvers if args.method_solvers is not None else args.solvers
    args.graph_batches = args.graph_batches or f"1,{args.batch_size}"
    if args.clock is None:
        single = args.threads == 1 or (args.threads is None and torch.get_num_threads() == 1)
        args.clock = "process" if device.type == "cpu" and single else "wall"
    if args.clock == "process" and device.type != "cpu":
        raise SystemExit("--clock process measures CPU seconds: use it only with --device cpu")
    for name in ("batch_size", "ddpm_steps", "ddim_steps", "dpm_steps", "repeats", "warmup", "graph_dpm_steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {getattr(args, name)}")
    if args.backends is None:
        from ..dispatch import triton_unavailable_reason

        why_not = triton_unavailable_reason(device) if device.type == "cuda" else "not timed on a CPU"
        args.triton_skipped = why_not
        args.backends = ",".join(b for b in BACKENDS if b != "triton" or not why_not)
    for b in _split(args.backends) + _split(args.adadiff_backends) + _split(args.method_backends):
        if b not in BACKEND_CHOICES:
            raise SystemExit(f"unknown backend {b!r}; choose among {', '.join(BACKEND_CHOICES)}")
    for s in _split(args.solvers) + _split(args.adadiff_solvers) + _split(args.method_solvers):
        if s not in SOLVERS:
            raise SystemExit(f"unknown solver {s!r}; latency.py times {', '.join(SOLVERS)}")
    for s in _split(args.graph_solvers):
        if s not in GRAPH_SOLVERS:
            raise SystemExit(f"unknown graph solver {s!r}; choose among {', '.join(GRAPH_SOLVERS)}")
    for m in _split(args.methods):
        if m not in ("ase", "multistage") + CACHING_ROWS:
            raise SystemExit(f"unknown --methods entry {m!r}; choose among ase, multistage, {', '.join(CACHING_ROWS)}")
    if "l2c" in _split(args.methods) and not args.l2c_router:
        raise SystemExit("--methods l2c needs --l2c-router (a Learning-to-Cache router file)")
    if args.l2c_router and not os.path.isfile(args.l2c_router):
        raise SystemExit(f"--l2c-router: no such file: {args.l2c_router}")
    for c in _split(args.configs):
        get_spec(c)  # unknown config: ValueError naming the known ones
    try:
        args.t_s_list = [int(v) for v in _split(args.t_s)]
        args.theta_list = [float(v) for v in _split(args.adadiff_thetas)]
    except ValueError as e:
        raise SystemExit(f"--t-s takes integers and --adadiff-thetas numbers: {e}")
    if 0 not in args.t_s_list:
        args.t_s_list = [0] + args.t_s_list  # speedups need the base row
    for flag, path in (("--adadiff-checkpoint", args.adadiff_checkpoint),
                       ("--multistage-checkpoint", args.multistage_checkpoint), ("--checkpoint", args.checkpoint)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise SystemExit(f"{flag}: no such file or folder: {path}")
        if len(_split(args.configs)) != 1:
            raise SystemExit(f"{flag} fits one model config: pass exactly one --configs entry")
    return args


def steps_of(args, solver: str) -> int:
    if solver.startswith("dpm_solver"):
        return args.dpm_steps
    return args.ddpm_steps if solver == "ddpm" else args.ddim_steps


def resolve_auto(args, device: torch.device) -> Dict[str, Tuple[str, str]]:
    """Resolve ``auto`` (in any backend list) per config: {config: (backend, why)}, stored as
    ``args.auto_choices`` for :func:`plan`; empty when no list asks for auto."""
    from ..backends import resolve_backend

    lists = _split(args.backends) + _split(args.adadiff_backends) + _split(args.method_backends)
    args.auto_choices = {}
    if "auto" in lists:
        for config in _split(args.configs):
            args.auto_choices[config] = resolve_backend("auto", config, device)
    return args.auto_choices


def _backends_of(args, text: Optional[str], config: str) -> List[str]:
    """The backends of one list for ``config``: ``auto`` replaced by its choice, duplicates dropped."""
    chosen = getattr(args, "auto_choices", {}).get(config)
    out: List[str] = []
    for b in _split(text):
        b = chosen[0] if (b == "auto" and chosen) else b
        if b not in out:
            out.append(b)
    return out


def _choice_of(args, backend: str, config: str, text: Optional[str]) -> str:
    chosen = getattr(args, "auto_choices", {}).get(config)
    if chosen and chosen[0] == backend and "auto" in _split(text) and backend not in _split(text):
        return chosen[1]
    return f"requested: {backend}"


def plan(args, device_type: str) -> List[dict]:
    """The groups this run will time (after :func:`resolve` and :func:`resolve_auto`): one dict per
    group with its rows' method names. Used to print the plan and by tests to keep presets small."""
    groups = []
    methods = _split(args.methods)
    for config in _split(args.configs):
        dit = get_spec(config).arch == "dit"
        # AdaDiff's shrinking batch changes shapes every layer: never torch.compile, even when auto chose it
        adadiff_backends = [b for b in _backends_of(args, args.adadiff_backends, config) if b != "torch.compile"]
        method_backends = _backends_of(args, args.method_backends, config)
        for backend in _backends_of(args, args.backends, config):
            for solver in _split(args.solvers):
                rows = ["base" if t == 0 else f"DuoDiff t_s={t}" for t in args.t_s_list]
                if backend in adadiff_backends and solver in _split(args.adadiff_solvers):
                    rows += [f"AdaDiff {th:g} {m}" for th in args.theta_list for m in ("shrink", "sim", "bucket")]
                if (not dit and "multistage" in methods and backend in method_backends
                        and solver in _split(args.method_solvers) and backend != "torch.compile"):
                    rows.append("multistage")
                groups.append(dict(kind="main", config=config, backend=backend, solver=solver,
                                   steps=steps_of(args, solver), rows=rows,
                                   backend_choice=_choice_of(args, backend, config, args.backends)))
        if "ase" in methods:
            for backend in method_backends:
                for solver in _split(args.method_solvers):
                    if backend == "torch.compile":
                        continue
                    names = _split(args.ase_schedules)
                    if dit:  # the paper defines D1, D3, D4 and D6 for DiT
                        from ..methods.ase import PAPER_DIT_SCHEDULES

                        names = [n for n in names if n.upper().replace("-DIT", "") in PAPER_DIT_SCHEDULES]
                    groups.append(dict(kind="ase", config=config, backend=backend, solver=solver,
                                       steps=steps_of(args, solver),
                                       backend_choice=_choice_of(args, backend, config, args.method_backends),
                                       rows=["base"] + [f"ASE {n}" for n in names]))
        # DeepCache caches behind U-ViT's long skips: DiT has none, so its rows are FORA, ToMe and L2C
        caching = [m for m in methods if m in CACHING_ROWS and not (dit and m == "deepcache")]
        if caching:
            for backend in _split(args.method_backends):
                for solver in _split(args.method_solvers):
                    if backend not in ("reference", "eager-bf16"):
                        continue  # the caching forward runs the model's modules eagerly
                    groups.append(dict(kind="caching", config=config, backend=backend, solver=solver,
                                       steps=steps_of(args, solver), rows=["base"] + caching))
        groups += _caching_graph_groups(args, config, device_type, dit, caching)
        if device_type == "cuda":  # the captured sampler (U-ViT and DiT configs)
            for solver in _split(args.graph_solvers):
                steps = args.graph_dpm_steps if solver.startswith("dpm_solver") else args.ddim_steps
                for t_s in [int(v) for v in _split(args.graph_t_s)]:
                    for b in [int(v) for v in _split(args.graph_batches)]:
                        groups.append(dict(kind="graph", config=config, backend="fastest", solver=solver,
                                           backend_choice="the backend of the fastest base row timed",
                                           steps=steps, t_s=t_s, batch_size=b, rows=["eager", "graph"]))
    return groups


def _caching_graph_groups(args, config: str, device_type: str, dit: bool, caching: List[str]) -> List[dict]:
    """CUDA only, U-ViT, when graph rows are asked for (--graph-solvers): each caching method with a
    step pattern (not ToMe) timed three ways on the caching group's backends and solvers: the plain
    loop, the plain loop with one graph per step pattern (runtime.cache_graphs), the whole loop
    captured (GraphSampler)."""
    methods = [m for m in caching if m != "tome"]
    if device_type != "cuda" or dit or not methods or not _split(args.graph_solvers):
        return []
    groups = []
    for backend in _split(args.method_backends):
        if backend not in ("reference", "eager-bf16"):
            continue  # the caching forward runs the model's modules eagerly
        for solver in _split(args.method_solvers):
            if solver == "ddpm":
                continue  # GraphSampler's rows cover the fixed-step DDIM / DPM loops
            groups.append(dict(kind="caching_graph", config=config, backend=backend, solver=solver,
                               steps=steps_of(args, solver),
                               rows=[f"{m} {how}" for m in methods for how in CACHING_GRAPH_MODES]))
    return groups


CACHING_GRAPH_MODES = ("eager", "step-graphs", "graph")


# ------------------------------------------------------------------------------ running groups
def _sampler(denoiser, schedule, shape, solver, steps, y, device) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return sample(denoiser, schedule, shape, solver=solver, num_steps=steps, y=y, base_seed=0,
                          device=device, progress=False)
    return run


def _spy(denoiser, record: List[float]):
    """``denoiser`` that also records each evaluation's time (used in the untimed warm-up only)."""
    def spy(x, t, yy=None):
        record.append(float(t.reshape(-1)[0]))
        return denoiser(x, t, yy)

    spy.check = getattr(denoiser, "check", None)
    return spy


def _row(group: dict, method: str, args, timing: Optional[dict], batch_size: int, **extra) -> dict:
    """A result row from one entry's timings (status ok / failed)."""
    row = dict(config=group["config"], solver=group["solver"], steps=group["steps"], backend=group["backend"],
               backend_choice=group.get("backend_choice", f"requested: {group['backend']}"),
               method=method, kind=group["kind"], batch_size=batch_size, group=group["id"], status="ok", error=None,
               warmup_seconds=None, batch_seconds=None, per_sample=None, speedup=None, unstable=None)
    row.update(extra)
    if timing is None:
        return row
    row["warmup_seconds"] = timing["warmup_s"]
    if timing["error"]:
        row.update(status="failed", error=f"{timing['error']} (in {timing['failed_in']})", unstable=True)
        return row
    row["batch_seconds"] = summarize(timing["times_s"], args.unstable_iqr)
    row["clock"] = args.clock
    row["wall_batch_seconds"] = timing["wall_s"]
    row["per_sample"] = summarize([t / batch_size for t in timing["times_s"]], args.unstable_iqr)
    # the row's own time spread; a compared row's ``unstable`` is replaced by its speedup's (_add_speedups)
    row["time_unstable"] = row["unstable"] = row["per_sample"]["unstable"]
    return row


def _add_speedups(rows: List[dict], base: dict, label: str = "base") -> None:
    """Speedup of each ok row over ``base`` (same group, paired rounds).

    A compared row's ``unstable`` becomes its speedup's: the spread of the paired per-round ratios
    (see :mod:`duodiff_fast.bench.stats`); its own time IQR stays in ``time_unstable``.
    """
    if base.get("status") != "ok":
        return
    bt = base["batch_seconds"]["times_s"]
    for r in rows:
        if r is base or r.get("status") != "ok" or len(r["batch_seconds"]["times_s"]) != len(bt):
            continue
        threshold = r["per_sample"]["unstable_threshold_iqr_pct"]
        sp = speedup(bt, r["batch_seconds"]["times_s"], unstable_spread_pct=threshold)
        sp.update(over=label)
        r["speedup"] = sp
        r["unstable"] = sp["unstable"]


class Runner:
    """Runs the groups of :func:`plan`, keeping models per config and the budget."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.start = time.perf_counter()
        self.models: Dict[str, tuple] = {}
        self.rows: List[dict] = []
        self.group_id = 0

    def say(self, text: str) -> None:
        print(text, flush=True)

    def over_budget(self) -> Optional[str]:
        spent = time.perf_counter() - self.start
        if self.args.budget and spent > self.args.budget:
            return f"budget of {self.args.budget:g} s spent ({spent:.0f} s) before this group started"
        return None

    def config_models(self, name: str):
        if name not in self.models:
            spec = get_spec(name)
            torch.manual_seed(0)
            full = create_model(spec).to(self.device).eval()
            twin = shallow_spec(spec)
            shallow = create_model(twin).to(self.device).eval()
            if self.args.nvtx:
                from ..profiling import annotate_module

                annotate_module(full, spec.name), annotate_module(shallow, twin.name)
            self.models[name] = (get_schedule(spec.schedule), full, shallow)
        return self.models[name]

    def labels(self, model, batch: int):
        if not model.is_conditional:
            return None
        return torch.arange(batch, device=self.device) % (model.num_classes - 1)

    def run(self, groups: List[dict]) -> List[dict]:
        for g in groups:
            self.group_id += 1
            g["id"] = self.group_id
            head = f"[{g['kind']}] {g['config']} {g['solver']}-{g['steps']} {g['backend']}"
            skipped = self.over_budget()
            try:
                if skipped:
                    raise _Skip(skipped)
                rows = getattr(self, f"group_{g['kind']}")(g)
            except _Skip as s:
                rows = [_row(g, m, self.args, None, g.get("batch_size", self.args.batch_size), status="skipped",
                             error=str(s)) for m in g["rows"]]
                self.say(f"{head}: skipped: {s}")
            except Exception as exc:  # noqa: BLE001 - building the group failed: every row says why
                rows = [_row(g, m, self.args, None, g.get("batch_size", self.args.batch_size), status="failed",
                             error=f"{error_text(exc)} (while preparing the group)", unstable=True)
                        for m in g["rows"]]
                self.say(f"{head}: FAILED while preparing: {error_text(exc)}")
            for r in rows:
                if r["status"] == "failed" and r["error"]:
                    self.say(f"  row {r['method']!r} FAILED: {r['error']}")
            self.rows.extend(rows)
        return self.rows

    def _time(self, g: dict, fns: Dict[str, Callable[[], object]]) -> Dict[str, dict]:
        desc = f"{g['config']} {g['solver']} {g['backend']} ({g['kind']})"
        return time_interleaved(fns, self.device, self.args.repeats, self.args.warmup, desc=desc,
                                progress=not self.args.no_progress, clock=self.args.clock)

    def trained_adadiff(self, config: str):
        """The AdaDiffUViT of --adadiff-checkpoint (float32, on the device), read by the method factory."""
        from ..methods.factory import MethodWeights, _adadiff_model

        weights = MethodWeights(full=self.args.checkpoint, adadiff=self.args.adadiff_checkpoint)
        return _adadiff_model(config, weights, {}).float().to(self.device).eval()

    # ---- base, DuoDiff, AdaDiff, multistage of one (config, backend, solver) -----------------------
    def group_main(self, g: dict) -> List[dict]:
        args, dev = self.args, self.device
        schedule, full_ref, shallow_ref = self.config_models(g["config"])
        full = prepare_model(full_ref, g["backend"], compile_mode=args.compile_mode)
        shallow = prepare_model(shallow_ref, g["backend"], compile_mode=args.compile_mode)
        B = args.batch_size
        shape = (B, full_ref.in_chans, full_ref.img_size, full_ref.img_size)
        y = self.labels(full_ref, B)
        dens, evals, extra = {}, {}, {}
        for t_s in args.t_s_list:
            key = "base" if t_s == 0 else f"DuoDiff t_s={t_s}"
            dens[key] = ModelDenoiser(full, schedule) if t_s == 0 else DuoDiff(shallow, full, schedule, t_s)
            extra[key] = dict(t_s=t_s, paper_per_sample_s=PAPER_SECONDS.get((g["config"], g["solver"], t_s)))
        recorders = {}
        if any(m.startswith("AdaDiff") for m in g["rows"]):
            from ..analysis import ExitRecorder
            from ..methods import AdaDiff, AdaDiffUViT
            from ..methods.adadiff import set_synthetic_exit_profile

            if args.adadiff_checkpoint:  # trained heads and UEMs: the exits a real model takes
                ada, uem_note = self.trained_adadiff(g["config"]), f"trained: {args.adadiff_checkpoint}"
            else:
                profile = dict(ADADIFF_PROFILE, exit_layer=min(ADADIFF_PROFILE["exit_layer"], full_ref.num_layers - 1))
                ada = set_synthetic_exit_profile(AdaDiffUViT(copy.deepcopy(full_ref)), schedule, **profile).to(dev)
                uem_note = ADADIFF_NOTE
            ada_model = prepare_model(ada, g["backend"], compile_mode=args.compile_mode)
            for th in args.theta_list:
                for mode, lab in (("shrinking", "shrink"), ("simulated", "sim"), ("bucketed", "bucket")):
                    key = f"AdaDiff {th:g} {lab}"
                    rec = ExitRecorder(ada_model.num_layers)
                    recorders[key] = rec
                    dens[key] = AdaDiff(ada_model, schedule, th, mode=mode, recorder=rec)
                    extra[key] = dict(t_s=None, theta=th, exit_mode=mode, num_layers=ada_model.num_layers,
                                      uem_profile=uem_note,
                                      paper_per_sample_s=(PAPER_ADADIFF_SECONDS.get((g["config"], th))
                                                          if g["solver"] == "ddpm" and mode == "shrinking" else None))
        ms = None
        if "multistage" in g["rows"]:
            from ..methods.multistage import MultistageDenoiser, MultistageUViT

            bounds = [float(v) for v in _split(args.multistage_boundaries)]
            d = full_ref.embed_dim
            widths = [max(1, int(round(float(f) * d))) for f in _split(args.multistage_widths)]
            if args.multistage_checkpoint:
                from ..methods import load_multistage

                ms_ref = load_multistage(args.multistage_checkpoint).to(dev).eval()
                bounds, widths = list(ms_ref.boundaries), [int(st.width) for st in ms_ref.stages]
            else:
                torch.manual_seed(0)
                ms_ref = MultistageUViT(bounds, stage_widths=widths, **get_spec(g["config"]).kwargs).to(dev).eval()
            ms = MultistageDenoiser(prepare_model(ms_ref, g["backend"], compile_mode=args.compile_mode), schedule)
            dens["multistage"] = ms
            extra["multistage"] = dict(t_s=None, boundaries=bounds, stage_widths=widths, paper_per_sample_s=None)
        # the first warm-up run of each row goes through a spy that records its evaluation times
        fns = {}
        for key, den in dens.items():
            evals[key] = []
            fns[key] = _first_through(_sampler(_spy(den, evals[key]), schedule, shape, g["solver"], g["steps"], y, dev),
                                      _sampler(den, schedule, shape, g["solver"], g["steps"], y, dev),
                                      after_first=(lambda d=den: setattr(d, "recorder", None))
                                      if key in recorders else None)
        timing = self._time(g, fns)
        rows = {k: _row(g, k, args, timing[k], B, **extra[k]) for k in dens}
        _add_speedups(list(rows.values()), rows["base"])
        n_full = full_ref.num_layers
        for key, r in rows.items():
            if key.startswith("DuoDiff") and evals[key]:
                routes = dens[key].routing(evals[key])
                cost = sum(shallow_ref.num_layers / n_full if rt == "shallow" else 1.0 for rt in routes)
                r["layer_bound_speedup"] = len(routes) / cost  # the most the switch can save (layer count)
                r["shallow_evaluations"] = routes.count("shallow")
            if key in recorders and r["status"] == "ok":
                r["mean_exit_layer"] = recorders[key].mean_exit() if len(recorders[key]) else None
            if getattr(dens[key], "bucket_stats", None) is not None:  # over warm-up and timed runs
                r["bucket_padding"] = dens[key].bucket_stats.as_dict()
            if key == "multistage" and ms is not None and evals[key]:
                stages = ms.routing(evals[key])
                r["stage_steps"] = [stages.count(i) for i in range(ms.model.num_stages)]
        out = list(rows.values())
        out.extend(self._adadiff_estimates(g, rows))
        return out

    def _adadiff_estimates(self, g: dict, rows: Dict[str, dict]) -> List[dict]:
        """The paper's estimate (base time * mean exit layer / N) per theta, beside the measured rows."""
        out = []
        base = rows["base"]
        for th in self.args.theta_list:
            shrink, sim = rows.get(f"AdaDiff {th:g} shrink"), rows.get(f"AdaDiff {th:g} sim")
            if shrink is None:
                continue
            mean_exit = shrink.get("mean_exit_layer")
            n = shrink["num_layers"]
            if base["status"] != "ok" or shrink["status"] != "ok" or not mean_exit:
                continue
            base_s = base["per_sample"]["median_s"]
            estimate = base_s * mean_exit / n
            realised = base_s / shrink["per_sample"]["median_s"]
            # the simulated exit runs every layer for every row: the true exit's gain over it
            sim_s = sim["per_sample"]["median_s"] if sim is not None and sim["status"] == "ok" else None
            shrink.update(allowed_speedup=n / mean_exit, realised_speedup=realised,
                          speedup_efficiency=realised / (n / mean_exit),
                          speedup_over_simulated=None if sim_s is None else sim_s / shrink["per_sample"]["median_s"])
            bucket = rows.get(f"AdaDiff {th:g} bucket")
            if bucket is not None and bucket["status"] == "ok":
                realised = base_s / bucket["per_sample"]["median_s"]
                bucket.update(allowed_speedup=n / mean_exit, realised_speedup=realised,
                              speedup_efficiency=realised / (n / mean_exit),
                              speedup_over_simulated=None if sim_s is None else sim_s / bucket["per_sample"]["median_s"])
            out.append(_row(g, f"AdaDiff {th:g} est", self.args, None, self.args.batch_size, t_s=None, theta=th,
                            exit_mode="paper-estimate", estimate_per_sample_s=estimate, mean_exit_layer=mean_exit,
                            num_layers=n, status="estimate", paper_per_sample_s=None,
                            note="not measured: base median * mean exit layer / N (the paper's estimate)"))
        return out

    # ---- ASE D1..D6 with their own base (a depth-12 twin for shallower configs) ---------------------
    def group_ase(self, g: dict) -> List[dict]:
        from ..methods.ase import PAPER_OUT_BLOCKS, PAPER_SPEEDUP_PCT, ASEDenoiser, get_dropping_schedule

        args, dev = self.args, self.device
        schedule, full_ref, _ = self.config_models(g["config"])
        if hasattr(full_ref, "t_embedder"):
            return self._group_ase_dit(g, schedule, full_ref)
        n_out = len(full_ref.out_blocks)
        model_ref, depth = full_ref, None
        if n_out < PAPER_OUT_BLOCKS:  # the paper's schedules are written for 6 out-blocks
            torch.manual_seed(0)
            depth, n_out = 2 * PAPER_OUT_BLOCKS, PAPER_OUT_BLOCKS
            model_ref = create_model(g["config"], depth=depth).to(dev).eval()
        names = _split(args.ase_schedules)
        droppings = [get_dropping_schedule(n) for n in names]
        if n_out != PAPER_OUT_BLOCKS:
            droppings = [d.rescaled(n_out) for d in droppings]
        model = prepare_model(model_ref, g["backend"], compile_mode=args.compile_mode)
        B = args.batch_size
        shape = (B, model_ref.in_chans, model_ref.img_size, model_ref.img_size)
        y = self.labels(model_ref, B)
        dens = {"base": ModelDenoiser(model, schedule)}
        dens.update({f"ASE {n}": ASEDenoiser(model, schedule, d) for n, d in zip(names, droppings)})
        evals = {k: [] for k in dens}
        fns = {k: _first_through(_sampler(_spy(d, evals[k]), schedule, shape, g["solver"], g["steps"], y, dev),
                                 _sampler(d, schedule, shape, g["solver"], g["steps"], y, dev))
               for k, d in dens.items()}
        timing = self._time(g, fns)
        note = (f"the {g['config']} architecture at depth {depth} (the paper's schedules need 6 out-blocks)"
                if depth else None)
        rows = {k: _row(g, k if depth is None else f"{k} (depth {depth})", args, timing[k], B, t_s=None,
                        model_depth=depth,
                        model_note=note, paper_per_sample_s=None) for k in dens}
        _add_speedups(list(rows.values()), rows["base"], label=rows["base"]["method"])
        for (k, r), dropping in zip(list(rows.items())[1:], droppings):
            kept = dropping.kept_blocks(torch.tensor(evals[k] or [0.5], dtype=torch.float64)).double()
            key = k.split()[1].upper().replace("-U-VIT", "")
            r.update(ase_schedule=list(dropping.kept), mean_kept_out_blocks=float(kept.mean()), num_out_blocks=n_out,
                     layer_bound_saving_pct=100.0 * float((n_out - kept).mean()) / model.num_layers,
                     paper_speedup_pct=PAPER_SPEEDUP_PCT.get(key),
                     paper_speedup_note="ASE Table 2: U-ViT-S/4 CelebA64, EM-1000 (time saved, %)")
        return list(rows.values())

    def _group_ase_dit(self, g: dict, schedule, model_ref) -> List[dict]:
        """ASE on DiT: the paper's D1/D3/D4/D6-DiT (written for 28 blocks, rescaled to other depths)."""
        from ..methods.ase import PAPER_DIT_SPEEDUP_PCT, ASEDenoiser, dropping_for

        args, dev = self.args, self.device
        names = g["rows"][1:]
        droppings = [dropping_for(model_ref, n.split()[1]) for n in names]
        model = prepare_model(model_ref, g["backend"], compile_mode=args.compile_mode)
        B = args.batch_size
        shape = (B, model_ref.in_chans, model_ref.img_size, model_ref.img_size)
        y = self.labels(model_ref, B)
        dens = {"base": ModelDenoiser(model, schedule)}
        dens.update({n: ASEDenoiser(model, schedule, d) for n, d in zip(names, droppings)})
        evals = {k: [] for k in dens}
        fns = {k: _first_through(_sampler(_spy(d, evals[k]), schedule, shape, g["solver"], g["steps"], y, dev),
                                 _sampler(d, schedule, shape, g["solver"], g["steps"], y, dev))
               for k, d in dens.items()}
        timing = self._time(g, fns)
        rows = {k: _row(g, k, args, timing[k], B, t_s=None, paper_per_sample_s=None) for k in dens}
        _add_speedups(list(rows.values()), rows["base"])
        n = model_ref.num_layers
        for (k, r), dropping in zip(list(rows.items())[1:], droppings):
            kept = dropping.kept_blocks(torch.tensor(evals[k] or [0.5], dtype=torch.float64)).double()
            r.update(ase_schedule=list(dropping.kept), ase_boundaries=list(dropping.boundaries),
                     mean_kept_blocks=float(kept.mean()), num_blocks=n,
                     layer_bound_saving_pct=100.0 * float((n - kept).mean()) / n,
                     paper_speedup_pct=PAPER_DIT_SPEEDUP_PCT.get(k.split()[1].upper().replace("-DIT", "")),
                     paper_speedup_note="ASE Table 2: DiT-XL/2 ImageNet 256, DDPM (time saved, %)")
        return list(rows.values())

    # ---- training-free caching and ToMe against the base model ---------------------------------------
    def group_caching(self, g: dict) -> List[dict]:
        from ..methods.caching import CachingDenoiser
        from ..methods.factory import MethodSpec

        args, dev = self.args, self.device
        schedule, full_ref, _ = self.config_models(g["config"])
        model = prepare_model(full_ref, g["backend"], compile_mode=args.compile_mode)
        B = args.batch_size
        shape = (B, full_ref.in_chans, full_ref.img_size, full_ref.img_size)
        y = self.labels(full_ref, B)
        values = {"deepcache": args.cache_interval or 3, "fora": args.cache_interval or 2, "tome": args.tome_ratio,
                  "l2c": args.l2c_router}
        options = {"l2c": (("threshold", args.l2c_threshold),)}
        dens, extra = {"base": ModelDenoiser(model, schedule)}, {"base": {}}
        for m in g["rows"][1:]:
            spec = MethodSpec(m, value=str(values[m]), options=options.get(m, ()))
            policy = spec.policy(get_spec(g["config"]).arch)  # L2C on DiT: the published DiT router schedule
            dens[m] = CachingDenoiser(model, schedule, policy)
            extra[m] = dict(policy.details(), method_label=spec.label)
        fns = {k: _sampler(d, schedule, shape, g["solver"], g["steps"], y, dev) for k, d in dens.items()}
        timing = self._time(g, fns)
        rows = {k: _row(g, extra[k].get("method_label", k), args, timing[k], B, t_s=None, paper_per_sample_s=None,
                        **{n: v for n, v in extra[k].items() if n != "method_label"}) for k in dens}
        _add_speedups(list(rows.values()), rows["base"])
        return list(rows.values())

    # ---- caching methods: plain loop, per-pattern step graphs, whole loop captured ----------------------
    def group_caching_graph(self, g: dict) -> List[dict]:
        from ..methods.caching import CachingDenoiser
        from ..methods.factory import MethodSpec
        from ..runtime.cache_graphs import CacheStepGraphs
        from ..runtime.graphs import GraphSampler

        args, dev = self.args, self.device
        schedule, full_ref, _ = self.config_models(g["config"])
        model = prepare_model(full_ref, g["backend"], compile_mode=args.compile_mode)
        B = args.batch_size
        sample_shape = (full_ref.in_chans, full_ref.img_size, full_ref.img_size)
        y = self.labels(full_ref, B)
        seeds = list(range(B))
        values = {"deepcache": args.cache_interval or 3, "fora": args.cache_interval or 2, "l2c": args.l2c_router}
        options = {"l2c": (("threshold", args.l2c_threshold),)}
        fns, extra, methods = {}, {}, []
        for name in g["rows"]:
            m, how = name.rsplit(" ", 1)
            spec = MethodSpec(m, value=str(values[m]), options=options.get(m, ()))
            # each way its own denoiser: a caching denoiser keeps its trajectory's step and caches
            den = CachingDenoiser(model, schedule, spec.policy())
            if how == "step-graphs":
                CacheStepGraphs().attach(den)
            gs = GraphSampler(den, schedule, sample_shape, solver=g["solver"], num_steps=g["steps"], device=dev)
            fns[name] = _caching_graph_fn(gs, how, seeds, y)
            extra[name] = dict(den.policy.details(), runtime={"eager": "eager-philox-fused", "step-graphs":
                                                              "cuda-graph per step pattern", "graph": "cuda-graph"}[how])
            if how == "eager":
                methods.append(m)
        timing = self._time(g, fns)
        rows = {k: _row(g, k, args, timing[k], B, t_s=None, paper_per_sample_s=None, **extra[k]) for k in fns}
        for m in methods:
            _add_speedups([rows[f"{m} step-graphs"], rows[f"{m} graph"]], rows[f"{m} eager"], label=f"{m} eager")
        return list(rows.values())

    # ---- CUDA-graph-captured sampler against the same loop uncaptured ------------------------------
    def fastest_backend(self, config: str) -> str:
        """The backend whose base row was fastest (stable or not) for ``config``; else the first."""
        bases = [r for r in self.rows if r["config"] == config and r["method"] == "base" and r["status"] == "ok"
                 and r["kind"] == "main"]
        if bases:
            return min(bases, key=lambda r: r["per_sample"]["median_s"])["backend"]
        return _split(self.args.backends)[0]

    def group_graph(self, g: dict) -> List[dict]:
        from ..runtime.graphs import GraphSampler

        args, dev = self.args, self.device
        schedule, full_ref, shallow_ref = self.config_models(g["config"])
        g["backend"] = self.fastest_backend(g["config"])
        full = prepare_model(full_ref, g["backend"], compile_mode=args.compile_mode)
        shallow = prepare_model(shallow_ref, g["backend"], compile_mode=args.compile_mode)
        t_s, b = g["t_s"], g["batch_size"]
        den = ModelDenoiser(full, schedule) if t_s == 0 else DuoDiff(shallow, full, schedule, t_s)
        y = self.labels(full_ref, b)
        gs = GraphSampler(den, schedule, (full_ref.in_chans, full_ref.img_size, full_ref.img_size),
                          solver=g["solver"], num_steps=g["steps"], device=dev)
        seeds = list(range(b))

        def eager():
            with torch.inference_mode():
                return gs.plain(seeds, y)

        def graph():
            with torch.inference_mode():  # as the eager row (the static buffers take either mode)
                out = gs(seeds, y)
            if not gs.graphs:
                raise RuntimeError(f"CUDA graph capture failed: {next(iter(gs.failed.values()), '?')}")
            return out

        timing = self._time(g, {"eager": eager, "graph": graph})
        label = "base" if t_s == 0 else f"DuoDiff {t_s}"
        rows = {m: _row(g, f"{label} {m}", args, timing[m], b, t_s=None, duodiff_t_s=t_s,
                        runtime="cuda-graph" if m == "graph" else ("eager-philox-fused" if gs.fused else "eager-philox"),
                        paper_per_sample_s=None)
                for m in ("eager", "graph")}
        _add_speedups([rows["graph"]], rows["eager"], label=f"{label} eager")
        if rows["graph"]["status"] == "ok":
            try:
                kernels = _kernel_seconds(graph)
                rows["graph"].update(kernel_seconds=kernels,
                                     graph_over_kernels=rows["graph"]["batch_seconds"]["median_s"] / kernels)
            except Exception as exc:  # noqa: BLE001 - the timing stands; the missing figure says why
                rows["graph"].update(kernel_seconds=None, kernel_seconds_error=error_text(exc))
                self.say(f"  kernel time of the captured loop not measured: {error_text(exc)}")
        return list(rows.values())


def _caching_graph_fn(gs, how: str, seeds: List[int], y) -> Callable[[], object]:
    """One way of the caching-graph group: ``gs.plain`` (the plain loop, with or without step graphs
    attached to its denoiser) or the whole captured loop, which must have captured."""
    def run():
        with torch.inference_mode():  # the static buffers take either mode
            out = gs.plain(seeds, y) if how != "graph" else gs(seeds, y)
        if how == "graph" and not gs.graphs:
            raise RuntimeError(f"CUDA graph capture failed: {next(iter(gs.failed.values()), '?')}")
        return out
    return run


class _Skip(Exception):
    pass


def _first_through(first: Callable[[], object], rest: Callable[[], object],
                   after_first: Optional[Callable[[], None]] = None) -> Callable[[], object]:
    """A callable running ``first`` on its first call (the warm-up) and ``rest`` afterwards."""
    state = {"calls": 0}

    def call():
        state["calls"] += 1
        if state["calls"] == 1:
            out = first()
            if after_first is not None:
                after_first()
            return out
        return rest()
    return call


def _kernel_seconds(fn: Callable[[], object]) -> float:
    """Summed device time of the CUDA kernels one call of ``fn`` runs (torch.profiler). Raises when
    the profiler sees no kernel time (so a missing figure always carries a reason)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no CUDA kernel time")
    return total_us * 1e-6


# ------------------------------------------------------------------------------------ output
def _fmt_speedup(r: dict) -> str:
    sp = r.get("speedup")
    if r["status"] != "ok":
        return r["status"]
    if sp is None:
        return "-"
    if sp["unstable"]:
        return "unstable"
    return f"{sp['point']:.2f}x [{sp['low']:.2f}-{sp['high']:.2f}]"


def format_table(rows: List[dict]) -> str:
    """The result table: per-sample median and IQR, warm-up, speedup over the group's base (95%
    bootstrap interval), stability. Unstable speedups and failed rows are named, never printed as figures."""
    head = (f"{'config':14s} {'solver':9s} {'backend':14s} {'method':26s} {'ms/sample':>10s} {'IQR':>6s} "
            f"{'warm-up s':>9s} {'speedup (95% CI)':>20s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        ps = r.get("per_sample")
        warm = r.get("warmup_seconds") or []
        med = f"{ps['median_s'] * 1e3:10.3f}" if ps else (
            f"{r['estimate_per_sample_s'] * 1e3:10.3f}" if r.get("estimate_per_sample_s") else f"{'-':>10s}")
        iqr = f"{ps['iqr_pct']:5.1f}%" if ps else f"{'-':>6s}"
        warm_s = f"{warm[0]:9.2f}" if warm else f"{'-':>9s}"
        note = ""
        if r["status"] in ("failed", "skipped"):
            note = f"{r['status'].upper()}: {r['error']}"
        elif r["status"] == "estimate":
            note = "estimate (not measured)"
        elif r.get("speedup") and r["speedup"]["unstable"]:
            note = f"UNSTABLE (paired spread {r['speedup']['spread_pct']:.0f}% > {ps['unstable_threshold_iqr_pct']:g}%)"
        elif r.get("unstable"):
            note = f"UNSTABLE (IQR > {ps['unstable_threshold_iqr_pct']:g}%)"
        if r.get("layer_bound_speedup"):
            note += f" layer bound {r['layer_bound_speedup']:.2f}x"
        if r.get("mean_exit_layer") is not None and r.get("exit_mode") == "shrinking":
            note += f" mean exit {r['mean_exit_layer']:.2f}/{r['num_layers']}"
        if r.get("paper_per_sample_s"):
            note += f" paper {r['paper_per_sample_s']:.2f} s/sample"
        lines.append(f"{r['config']:14s} {r['solver'] + '-' + str(r['steps']):9s} {r['backend']:14s} "
                     f"{r['method'][:26]:26s} {med} {iqr} {warm_s} "
                     f"{_fmt_speedup(r):>20s}  {note.strip()}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> dict:
    """Run the benchmark with command-line arguments ``argv``; returns the result dict (its rows'
    ``status`` is ok, failed, skipped or estimate)."""
    from ..devices import normalize_device

    args = parse_args(argv, prog)
    device = normalize_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .edm_latency import EDM_PRESETS, main_edm

    if args.preset in EDM_PRESETS:  # EDM's U-Nets under Heun: their own rows (duodiff_fast.bench.edm_latency)
        return main_edm(args, device)
    args = resolve(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for config, (name, why) in resolve_auto(args, device).items():
        print(f"backend auto for {config}: {name} ({why})", flush=True)
    if "triton" in _split(args.backends):
        from ..dispatch import triton_unavailable_reason

        why_not = triton_unavailable_reason(device)
        if why_not:
            raise SystemExit(f"backend triton cannot run: {why_not}")
    if args.nvtx:
        from .. import profiling

        profiling.enable(True)
    env = environment(device)
    groups = plan(args, device.type)
    n_rows = sum(len(g["rows"]) for g in groups)
    print(f"device: {env['device']}  torch {env['torch']}  threads {torch.get_num_threads()}  clock {args.clock}  "
          f"batch {args.batch_size}  "
          f"{len(groups)} groups, {n_rows} timed rows, {args.repeats} interleaved rounds each"
          + (f"  budget {args.budget:g} s" if args.budget else ""), flush=True)
    if getattr(args, "triton_skipped", None):
        print(f"backend triton not timed: {args.triton_skipped}")
    runner = Runner(args, device)
    t0 = time.perf_counter()
    rows = runner.run(groups)
    wall = time.perf_counter() - t0
    table = format_table(rows)
    print("\n" + table)
    failed = [r for r in rows if r["status"] == "failed"]
    unstable = [r for r in rows if r["status"] == "ok" and r["unstable"]]
    print(f"\n{len(rows)} rows in {wall:.0f} s: {len(failed)} failed, {len(unstable)} unstable "
          f"(spread > {args.unstable_iqr:g}% of the median; their speedups are not figures)")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "auto_choices")}
    backend_choice = {c: {"backend": n, "backend_choice": why} for c, (n, why) in args.auto_choices.items()}
    result = dict(benchmark="latency", environment=env, settings=settings, wall_seconds=wall,
                  backend_choice=backend_choice,
                  statistics=dict(center="median", spread="interquartile range (q3 - q1), % of the median",
                                  unstable=(f"a compared row: the IQR of its paired per-round speedups > "
                                            f"{args.unstable_iqr:g}% of their median; a base row: its own time "
                                            f"IQR > {args.unstable_iqr:g}% of its median; or < 3 repeats "
                                            "(time_unstable: the row's own time IQR)"),
                                  speedup="median of per-round ratios base_i / row_i; 95% percentile bootstrap "
                                          "over rounds (2000 resamples)",
                                  timing="rows of a group interleaved, order rotating per round; warm-up runs "
                                         "timed apart (warmup_seconds, wall)",
                                  clock=(f"{args.clock}: " + ("wall-clock seconds" if args.clock == "wall" else
                                         "CPU seconds of the (single-threaded) process; wall seconds in "
                                         "wall_batch_seconds"))),
                  rows=rows)
    out = args.out or results_path(args.results_dir, "latency", device,
                                   "-".join(get_spec(c).name for c in _split(args.configs))
                                   + (f"_{args.preset}" if args.preset else ""))
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    import sys

    sys.exit(1 if any(r["status"] == "failed" for r in main()["rows"]) else 0)
