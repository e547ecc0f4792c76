"""EDM rows of the latency benchmark: EDM's DDPM++ U-Net and the multistage U-Net under Heun.

    duodiff-fast bench --preset edm-cpu        # the tiny EDM and tiny multistage U-Nets, on a CPU (seconds)
    duodiff-fast bench --preset edm-cifar10    # CIFAR-10 DDPM++ vs the authors' multistage net, NFE 35, GPU

Per backend (``reference``, ``eager-bf16``, ``torch.compile``; ``--backends``) one group: the
single U-Net (the group's base, the first ``--configs`` entry) and the multistage U-Net, timed
**interleaved** with :func:`~duodiff_fast.bench.timing.time_interleaved` as the other rows are
(warm-up timed apart, median and IQR of the per-sample time, the speedup of the multistage net
over the single U-Net as the median of paired per-round ratios with a bootstrap interval). On a
CUDA device the preset adds, per backend, a group of CUDA-graph rows (the whole Heun loop captured,
:class:`~duodiff_fast.runtime.edm_graphs.EDMGraphSampler`).

Each row also reports the compute of one evaluation, **GFLOPs per evaluation weighted by the steps
in each stage** (:func:`~duodiff_fast.edm.flops.weighted_gflops`: a multistage net's decoder
differs per stage, so the run's mean over its 2N - 1 evaluations), and the GFLOPs ratio of the base
to the row. Weights are random (timing does not depend on them). A row that cannot be prepared or
run is recorded as failed, with the error; a captured row whose capture failed says so and is
not timed (it would time the eager loop).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch

from ..edm import HeunConfig, build_edm_net, get_edm_config, heun_nfe, heun_sample
from ..edm.backends import EDM_BACKENDS, prepare_edm_net
from ..edm.flops import weighted_gflops
from ..io_utils import atomic_write_json
from .common import environment, results_path
from .timing import error_text, time_interleaved

__all__ = ["EDM_PRESETS", "resolve_edm", "plan_edm", "run_edm", "format_edm_table", "main_edm"]

EDM_PRESETS: Dict[str, dict] = {
    "edm-cpu": dict(configs="edm-tiny-ddpmpp,multistage-tiny-ddpmpp", batch_size=2, heun_steps=6,
                    backends="reference,eager-bf16", repeats=5, warmup=1, threads=1, graphs=False),
    "edm-cifar10": dict(configs="edm-cifar10-ddpmpp,multistage-cifar10-ddpmpp", batch_size=128, heun_steps=18,
                        backends="reference,eager-bf16,torch.compile", repeats=5, warmup=1, threads=None,
                        graphs=True),
}


def _split(text: Optional[str]) -> List[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def resolve_edm(args, device: torch.device):
    """Fill options left unset from the EDM preset; check names (SystemExit with a message on bad ones)."""
    from ..edm import EDM_CONFIGS

    for key, value in EDM_PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.graphs = bool(args.graphs) and device.type == "cuda"
    if args.clock is None:
        single = args.threads == 1 or (args.threads is None and torch.get_num_threads() == 1)
        args.clock = "process" if device.type == "cpu" and single else "wall"
    if args.clock == "process" and device.type != "cpu":
        raise SystemExit("--clock process measures CPU seconds: use it only with --device cpu")
    for name in ("batch_size", "heun_steps", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    configs = _split(args.configs)
    for c in configs:
        if c not in EDM_CONFIGS:
            raise SystemExit(f"--preset {args.preset} times EDM configs; unknown {c!r} (known: {', '.join(sorted(EDM_CONFIGS))})")
    if not configs or get_edm_config(configs[0])["model_type"] != "SongUNet":
        raise SystemExit(f"--configs of --preset {args.preset}: the first entry is the base and must be a SongUNet "
                         f"config (e.g. edm-cifar10-ddpmpp), got {configs[:1]}")
    for b in _split(args.backends):
        if b not in EDM_BACKENDS:
            raise SystemExit(f"EDM U-Nets are timed on {', '.join(EDM_BACKENDS)}; not {b!r} (auto picks per net; "
                             "triton has no U-Net kernels)")
    if not _split(args.backends):
        raise SystemExit("--backends: name at least one backend")
    return args


def plan_edm(args) -> List[dict]:
    """The groups: one per backend (kind "edm"), then one captured group per backend (kind "edm-graph") when on."""
    configs, backends = _split(args.configs), _split(args.backends)
    groups = [dict(id=f"edm/{b}", kind="edm", backend=b, configs=configs) for b in backends]
    if args.graphs:
        groups += [dict(id=f"edm-graph/{b}", kind="edm-graph", backend=b, configs=configs) for b in backends]
    return groups


def _method(config: str, kind: str) -> str:
    name = "multistage U-Net" if get_edm_config(config)["model_type"] == "MultistageUNet" else "EDM U-Net"
    return name + (" (graph)" if kind == "edm-graph" else "")


class _EDMRunner:
    """Builds each config's net once (random weights, fixed seed) and its GFLOPs, then times groups."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.heun = HeunConfig(num_steps=int(args.heun_steps))
        self.nets: Dict[str, torch.nn.Module] = {}
        self.flops: Dict[str, dict] = {}

    def net(self, config: str):
        if config not in self.nets:
            torch.manual_seed(0)
            net = build_edm_net(get_edm_config(config)).to(self.device).eval()
            self.flops[config] = weighted_gflops(net, self.heun)
            self.nets[config] = net
        return self.nets[config]

    def latents(self, config: str) -> torch.Tensor:
        cfg = get_edm_config(config)
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.args.batch_size, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"],
                           generator=g).to(self.device)

    def prepare(self, group: dict, config: str) -> Callable[[], object]:
        """The timed call of one row (raises what preparing it raised)."""
        net = prepare_edm_net(self.net(config), group["backend"], self.device, compile_mode=self.args.compile_mode)
        lat = self.latents(config)
        if group["kind"] == "edm-graph":
            from ..runtime.edm_graphs import EDMGraphSampler

            gs = EDMGraphSampler(net, self.heun, mode="whole")
            with torch.inference_mode():
                gs(lat)  # capture now: a row whose capture fails is not timed as if it were a graph
            if gs.failed:
                raise RuntimeError(f"CUDA graph capture failed: {next(iter(gs.failed.values()))}")

            def run():
                with torch.inference_mode():
                    return gs(lat)
            return run

        def run():
            with torch.inference_mode():
                return heun_sample(net, lat, self.heun)
        return run

    def run_group(self, group: dict) -> List[dict]:
        from .latency import _add_speedups, _row

        args = self.args
        fns, errors = {}, {}
        for config in group["configs"]:
            try:
                fns[config] = self.prepare(group, config)
            except Exception as exc:  # noqa: BLE001 - recorded as the row's failure, with the error
                errors[config] = error_text(exc)
        timings = time_interleaved(fns, self.device, args.repeats, args.warmup, desc=group["id"],
                                   progress=not args.no_progress, clock=args.clock) if fns else {}
        rows = []
        base_flops = self.flops.get(group["configs"][0], {}).get("gflops_per_eval")
        for config in group["configs"]:
            meta = dict(config=config, solver="heun", steps=self.heun.num_steps, backend=group["backend"],
                        kind=group["kind"], id=group["id"])
            flops = self.flops.get(config)
            extra = dict(nfe=heun_nfe(self.heun.num_steps))
            if flops is not None:
                extra.update(gflops_per_eval=flops["gflops_per_eval"], gflops_per_stage=flops["gflops_per_stage"],
                             evals_per_stage=flops["evals_per_stage"])
                if base_flops is not None:
                    extra["gflops_ratio"] = base_flops / flops["gflops_per_eval"]
            row = _row(meta, _method(config, group["kind"]), args, timings.get(config), args.batch_size, **extra)
            if config in errors:
                row.update(status="failed", error=f"{errors[config]} (in preparation)", unstable=True)
            rows.append(row)
        if rows:
            _add_speedups(rows, rows[0], label=rows[0]["method"])
        return rows


def run_edm(args, device: torch.device) -> List[dict]:
    runner = _EDMRunner(args, device)
    rows: List[dict] = []
    for group in plan_edm(args):
        rows.extend(runner.run_group(group))
    return rows


def format_edm_table(rows: List[dict]) -> str:
    """Per-sample median and IQR, warm-up, weighted GFLOPs per evaluation, speedup over the group's single U-Net."""
    from .latency import _fmt_speedup

    head = (f"{'config':26s} {'solver':8s} {'backend':14s} {'method':24s} {'ms/sample':>10s} {'IQR':>6s} "
            f"{'warm-up s':>9s} {'GFLOPs/eval':>11s} {'speedup (95% CI)':>20s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        ps = r.get("per_sample")
        warm = r.get("warmup_seconds") or []
        med = f"{ps['median_s'] * 1e3:10.3f}" if ps else f"{'-':>10s}"
        iqr = f"{ps['iqr_pct']:5.1f}%" if ps else f"{'-':>6s}"
        warm_s = f"{warm[0]:9.2f}" if warm else f"{'-':>9s}"
        gf = f"{r['gflops_per_eval']:11.4f}" if r.get("gflops_per_eval") is not None else f"{'-':>11s}"
        note = ""
        if r["status"] == "failed":
            note = f"FAILED: {r['error']}"
        elif r.get("speedup") and r["speedup"]["unstable"]:
            note = f"UNSTABLE (paired spread {r['speedup']['spread_pct']:.0f}%)"
        elif r.get("unstable"):
            note = "UNSTABLE (IQR)"
        if r.get("evals_per_stage") and len(r["evals_per_stage"]) > 1:
            note += f" evals per stage {r['evals_per_stage']}"
            if r.get("gflops_ratio") is not None:
                note += f", GFLOPs ratio {r['gflops_ratio']:.2f}x"
        lines.append(f"{r['config']:26s} {'heun-' + str(r['steps']):8s} {r['backend']:14s} {r['method'][:24]:24s} "
                     f"{med} {iqr} {warm_s} {gf} {_fmt_speedup(r):>20s}  {note.strip()}")
    return "\n".join(lines)


def main_edm(args, device: torch.device) -> dict:
    """The EDM benchmark for parsed latency arguments with an EDM ``--preset``; writes the JSON."""
    args = resolve_edm(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    groups = plan_edm(args)
    print(f"device: {env['device']}  torch {env['torch']}  threads {torch.get_num_threads()}  clock {args.clock}  "
          f"batch {args.batch_size}  heun N={args.heun_steps} (NFE {heun_nfe(args.heun_steps)})  {len(groups)} groups, "
          f"{args.repeats} interleaved rounds each", flush=True)
    t0 = time.perf_counter()
    rows = run_edm(args, device)
    wall = time.perf_counter() - t0
    print("\n" + format_edm_table(rows))
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"\n{len(rows)} rows in {wall:.0f} s: {len(failed)} failed")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = dict(benchmark="latency", environment=env, settings=settings, wall_seconds=wall,
                  statistics=dict(center="median", spread="interquartile range (q3 - q1), % of the median",
                                  speedup="median of per-round ratios single U-Net_i / row_i; 95% percentile "
                                          "bootstrap over rounds",
                                  gflops="GFLOPs of one evaluation for one image (FlopCounterMode), averaged over "
                                         "the Heun run's 2N - 1 evaluations by the stage each one runs",
                                  clock=args.clock),
                  rows=rows)
    out = args.out or results_path(args.results_dir, "latency", device, args.preset)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result
