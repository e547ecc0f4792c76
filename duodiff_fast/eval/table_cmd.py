"""``duodiff-fast eval``: one command per paper table (FID, time per sample, speedup per method).

    duodiff-fast eval --config cifar10-s2 --checkpoint full.pth --shallow-checkpoint shallow.pth \\
        --adadiff-checkpoint ada.pth --methods base,duodiff:300/400/500,adadiff:0.05/0.07 \\
        --solver ddpm --reference fid_stats_cifar10_train.npz --n-samples 50000 --out tables/cifar10

For every method of the grid it draws ``--n-samples`` samples with the sharded, resumable sampler
of ``sample`` (``<out>/samples/<method>/``; under torchrun the ranks share the work and a rerun
resumes), scores them against the reference statistics, and times the sampling loop of one batch
on the same device with the benchmark's timer (``bench.common.time_call``: warm-up, then the
median of ``--timing-repeats`` runs; time per sample = batch time / batch size). It writes
``results.csv``, ``results.md``, ``fid_vs_time.png`` and ``results.json`` (with every method's
sample manifest and the FID protocol of :mod:`duodiff_fast.eval.protocol`, which is also printed
above the table); a grid with ASE rows also gets ``table1_ase.md``, the ASE paper's Table 1 layout
(base and D-n rows, FID and the acceleration in time saved; "DiT" / "D3-DiT" labels for DiT configs). With ``--random-inception`` (or ``--random-weights``) the outputs are labelled
a smoke check: the plumbing runs, the FID values mean nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List

__all__ = ["add_eval_parser", "cmd_eval", "SMOKE_NOTE"]

SMOKE_NOTE = "SMOKE CHECK of the plumbing: {why}; the FID values are meaningless."
# sample options that eval sets itself (per method, or fixed)
_NOT_FROM_SAMPLE = {"help", "method", "theta", "ase_schedule", "t_s", "no_float", "out", "adadiff_checkpoint",
                    "adadiff_mode", "ase_checkpoint", "multistage_checkpoint", "cache_interval", "tome_ratio",
                    "l2c_router"}


def add_eval_parser(sub) -> None:
    """Register ``eval``; it reuses the ``sample`` parser's options (model, solver, seeds, device...)."""
    from .sample_cmd import add_method_options

    p = sub.add_parser(
        "eval", help="a paper table: FID, time per sample and speedup for a grid of methods",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample = sub.choices["sample"]
    for action in sample._actions:  # one definition of the shared options: the sample parser's
        if action.dest not in _NOT_FROM_SAMPLE:
            p._add_action(action)
    add_method_options(p)
    p.add_argument("--methods", required=True,
                   help="method grid, comma-separated: base, duodiff:<t_s>[/<t_s>...], adadiff:<theta>[/...], "
                        "ase:<D1..D6>[/...] or ase:all, multistage, and the training-free deepcache[:<interval>], "
                        "fora[:<interval>], tome[:<ratio>], l2c:<router file>, each optionally @<t_s> after "
                        "DuoDiff's shallow phase; e.g. base,duodiff:300/400,ase:all,fora:2,tome:0.5@300")
    p.add_argument("--reference", required=True,
                   help="FID reference: a stats .npz (mu, sigma; U-ViT's fid_stats_*.npz), an image .npz (arr_0 "
                        "uint8) or an image folder (its statistics are computed once and cached)")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch.hub's cache, "
                        "$TORCH_HOME/hub/checkpoints; never downloaded)")
    p.add_argument("--random-inception", action="store_true",
                   help="randomly initialised Inception (smoke check of the plumbing; FID values meaningless)")
    p.add_argument("--stats-cache", default=None,
                   help="folder for cached reference statistics (default ~/.cache/duodiff_fast/fid_stats)")
    p.add_argument("--inception-batch-size", type=int, default=64, help="images per Inception pass (default 64)")
    p.add_argument("--timing-batch-size", type=int, default=None,
                   help="batch of the timed sampling loop (default --batch-size)")
    p.add_argument("--timing-repeats", type=int, default=3, help="timed runs per method (default 3)")
    p.add_argument("--timing-warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--out", default="eval", help="output folder (default ./eval)")


def _time_per_sample(job, batch: int, repeats: int, warmup: int) -> Dict[str, float]:
    """Median seconds per sample of the sampling loop for one batch (the benchmark's timer)."""
    from ..bench.common import time_call

    def run():
        job.produce(0, batch)

    times = time_call(run, job.device, repeats, warmup)
    med = statistics.median(times)
    return {"time_per_sample_s": med / batch, "batch_time_median_s": med, "batch_time_min_s": min(times),
            "batch_time_max_s": max(times), "timing_batch": batch, "timing_repeats": len(times)}


def _edm_row(args, device, dist, extractor, reference, fidlib, smoke, manifests) -> Dict[str, object]:
    """The EDM model's row in the multistage paper's Table 1/2 layout: method, NFE, GFLOPs per
    evaluation (weighted by the evaluations in each stage), FID, time per sample."""
    from ..edm.flops import weighted_gflops
    from .edm_sample import EDMSampleJob
    from .sample_cmd import run_sample

    job = EDMSampleJob(args, device)
    out = os.path.join(args.out, "samples", "edm")
    manifest = run_sample(args, job=job, out=out)
    if dist.rank != 0:
        return {}
    feats = extractor.features_of(os.path.join(out, "samples.npz"), progress=not args.no_progress)
    stats = fidlib.compute_stats(feats, meta={"method": job.spec.label, "inception": extractor.weights_id})
    cost = weighted_gflops(job.net, job.heun)
    timing = _time_per_sample(job, args.timing_batch_size or args.batch_size, args.timing_repeats, args.timing_warmup)
    manifests[job.spec.label] = manifest
    return {"method": job.spec.label, "nfe": cost["nfe"], "gflops_per_eval": cost["gflops_per_eval"],
            "evals_per_stage": cost["evals_per_stage"], "gflops_per_stage": cost["gflops_per_stage"],
            "fid": fidlib.fid_from_stats(stats, reference), **timing,
            "n_samples": args.n_samples, "solver": "heun", "steps": job.heun.num_steps, "smoke_check": bool(smoke),
            "settings": f"config={args.config}"}


def cmd_eval(args) -> int:
    """Run the grid; write results.{csv,md,json} and fid_vs_time.png in --out (rank 0)."""
    from ..io_utils import atomic_write_json
    from ..methods.factory import parse_method_grid
    from . import fid as fidlib
    from .protocol import build_protocol, checkpoints_of, format_protocol, reference_info
    from .sample_cmd import SampleJob, _solver_kwargs, caching_options_from_args, device_for, resolve_backend_arg, run_sample
    from .sharding import dist_info
    from .table import COLUMNS, EDM_COLUMNS, EDM_MD_COLUMNS, add_speedups, write_csv, write_plot

    t0 = time.perf_counter()
    from .edm_sample import is_edm_run

    edm = is_edm_run(args)
    if edm and args.methods != "edm":
        raise ValueError("an EDM model (--solver heun) is evaluated with --methods edm: one row per model "
                         "(run eval once per checkpoint, e.g. EDM and multistage EDM)")
    specs = [None] if edm else parse_method_grid(args.methods, adadiff_mode=args.adadiff_mode,
                                                 caching_options=caching_options_from_args(args))
    for name in ("timing_repeats", "inception_batch_size", "n_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_samples < 2:
        raise ValueError("--n-samples must be >= 2: FID needs a covariance")
    dist = dist_info()
    device = device_for(args.device, dist.local_rank)
    resolve_backend_arg(args, device)
    if dist.rank == 0:
        print(f"backend: {args.backend} ({args.backend_choice})", flush=True)
    args.no_float = True  # eval needs only the uint8 images
    extractor = reference = None
    if dist.rank == 0:
        # Load Inception and the reference first: a missing file fails before hours of sampling.
        fidlib.require_torch_fidelity()
        if args.random_inception:
            extractor = fidlib.InceptionFeatures.random(args.seed, device, args.inception_batch_size)
        else:
            extractor = fidlib.InceptionFeatures.from_file(args.inception_weights, device, args.inception_batch_size)
        reference = fidlib.reference_stats(args.reference, extractor, args.stats_cache, progress=not args.no_progress)
        ref_info = reference_info(args.reference)
        ref_info["count"] = reference.count or ref_info.get("images")
    smoke = [why for flag, why in ((args.random_inception, "random Inception weights"),
                                   (args.random_weights, "random model weights")) if flag]
    rows: List[Dict[str, object]] = []
    manifests = {}
    config_name = args.config
    for spec in specs:
        if edm:
            row = _edm_row(args, device, dist, extractor, reference, fidlib, smoke, manifests)
            if row:
                rows.append(row)
            continue
        job = SampleJob(args, spec, device)
        config_name = job.model_spec.name
        if job.model_spec.latent and job.decoder is None:
            raise ValueError(f"{job.model_spec.name} is a latent model: FID needs images, pass --autoencoder")
        manifest = run_sample(args, job=job, out=os.path.join(args.out, "samples", spec.slug))
        if dist.rank != 0:
            continue
        feats = extractor.features_of(os.path.join(args.out, "samples", spec.slug, "samples.npz"),
                                      progress=not args.no_progress)
        stats = fidlib.compute_stats(feats, meta={"method": spec.label, "inception": extractor.weights_id})
        timing = _time_per_sample(job, args.timing_batch_size or args.batch_size, args.timing_repeats,
                                  args.timing_warmup)
        rows.append({"method": spec.label, "fid": fidlib.fid_from_stats(stats, reference), **timing,
                     "n_samples": args.n_samples, "solver": args.solver, "steps": args.steps, "smoke_check": bool(smoke),
                     "settings": ";".join(f"{k}={v}" for k, v in {**spec.settings(), **job.built.details}.items())})
        manifests[spec.label] = manifest
    if dist.rank != 0:
        return 0
    add_speedups(rows)
    os.makedirs(args.out, exist_ok=True)
    notes = []
    if smoke:
        notes.append(SMOKE_NOTE.format(why=" and ".join(smoke)))
    elif not extractor.is_standard:
        notes.append(f"Inception weights {extractor.weights_id} are not the standard "
                     f"{fidlib.INCEPTION_FILENAME}: FID values are not comparable with published ones.")
    from .sample_cmd import _denoised_kwargs, denoised_setting

    denoised = denoised_setting(_denoised_kwargs(args))
    notes.append(f"{config_name}, {args.solver} {args.steps or 'default'} steps, {args.n_samples} samples per "
                 f"method, reference {args.reference}, device {device}, backend {args.backend}, "
                 f"denoised estimate: {denoised if isinstance(denoised, str) else 'dynamic thresholding'}.")
    protocol = build_protocol(args, device, extractor.weights_id, ref_info, checkpoints_of(manifests),
                              _solver_kwargs(args))
    protocol_text = format_protocol(protocol)
    title = f"FID vs time per sample: {config_name}"
    write_csv(os.path.join(args.out, "results.csv"), rows, EDM_COLUMNS if edm else COLUMNS)
    from ..io_utils import atomic_write_text
    from .table import markdown_table

    md_columns = EDM_MD_COLUMNS if edm else None
    atomic_write_text(os.path.join(args.out, "results.md"),
                      markdown_table(rows, notes, title, md_columns) + "\n```\n" + protocol_text + "\n```\n")
    write_plot(os.path.join(args.out, "fid_vs_time.png"), rows, title, notes[0] if smoke else None)
    if any(str(r["method"]).startswith("ase ") for r in rows):  # the ASE paper's Table 1 layout
        from ..models import get_spec
        from .table import write_ase_table

        arch = "DiT" if get_spec(args.config).arch == "dit" else "U-ViT"
        steps = args.steps or ("250" if arch == "DiT" and args.solver == "ddpm" else "default")
        write_ase_table(os.path.join(args.out, "table1_ase.md"), rows, arch, f"{args.solver.upper()}-{steps}", notes)
    from .manifest import environment

    atomic_write_json(os.path.join(args.out, "results.json"), {
        "smoke_check": bool(smoke), "protocol": protocol, "notes": notes, "rows": rows, "denoised": denoised,
        "inception": extractor.weights_id,
        "reference": {"source": args.reference, "count": reference.count, "meta": reference.meta},
        "backend": args.backend, "backend_choice": args.backend_choice,
        "environment": environment(device), "wall_time_s": time.perf_counter() - t0, "manifests": manifests,
    })
    from .table import markdown_table

    print(protocol_text + "\n")
    print(markdown_table(rows, notes, columns=EDM_MD_COLUMNS if edm else None))
    print(f"wrote results.csv, results.md, results.json and fid_vs_time.png to {args.out}/")
    return 0
