"""``duodiff-fast sample``: any method, sharded and resumable, on one process or under torchrun.

    duodiff-fast sample --config cifar10-s2 --checkpoint full.pth --method adadiff \\
        --adadiff-checkpoint ada.pth --theta 0.05 --n-samples 50000 --out runs/ada005
    torchrun --nproc_per_node=8 -m duodiff_fast sample ...   # the same set, 8 processes

Outputs in ``--out``: ``shards/`` (resumable pieces), ``samples.npz`` (``arr_0`` uint8 images
(N, H, W, C), or float latents; ``arr_1`` labels), ``samples.pt`` (float (N, C, H, W), unless
``--no-float``), ``grid.png`` (first 64 images) and ``manifest.json``.
Sample i depends only on (--seed, i): its noise is seeded by ``mix_seed(seed, i)`` and a random
class label by ``mix_seed(seed + 2**64, i)``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, Optional

import numpy as np
import torch

from ..methods.factory import METHODS, MethodSpec, MethodWeights, parse_ase_checkpoints
from .edm_sample import is_edm_run
from .sharding import ShardPlan

__all__ = ["add_method_options", "add_caching_options", "caching_options_from_args", "add_sample_options",
           "method_spec_from_args", "weights_from_args", "sample_labels", "device_for", "resolve_model_spec",
           "resolve_backend_arg", "SampleJob", "run_sample", "cmd_sample"]

DEFAULT_SHARD_SIZE = 1000
LABEL_STREAM = 1 << 64  # added to the seed: labels draw from a stream apart from the noise


def add_method_options(p: argparse.ArgumentParser) -> None:
    """Checkpoint options of AdaDiff, ASE and multistage (shared by sample and eval)."""
    p.add_argument("--adadiff-checkpoint", default=None,
                   help="AdaDiff weights: an AdaDiffUViT state dict (backbone.*, heads.*, uems.*; bare or in a "
                        "trainer checkpoint); without backbone.* keys the backbone comes from --checkpoint")
    p.add_argument("--adadiff-mode", default="shrinking", choices=("shrinking", "simulated"),
                   help="AdaDiff exit: shrinking batch (real early exit) or simulated (every layer; default shrinking)")
    p.add_argument("--ase-checkpoint", action="append", default=None, metavar="[D1=]PATH",
                   help="ASE fine-tuned U-ViT weights: PATH for every schedule or D3=PATH per schedule "
                        "(repeatable); default: --checkpoint with blocks dropped, no fine-tuning")
    p.add_argument("--multistage-checkpoint", default=None,
                   help="multistage model file written by duodiff_fast.methods.save_multistage")


def add_caching_options(p: argparse.ArgumentParser) -> None:
    """Further options of the caching methods (shared by sample and eval)."""
    p.add_argument("--deepcache-depth", type=int, default=None,
                   help="deepcache: in/out-block pairs run on cache steps (default 1)")
    p.add_argument("--deepcache-steps", type=int, default=None,
                   help="deepcache: the non-uniform 1:N full steps (DeepCache's) for a trajectory of this many "
                        "full-backbone evaluations (the solver's NFE, less DuoDiff's shallow phase); default uniform")
    p.add_argument("--deepcache-center", type=float, default=None,
                   help="deepcache non-uniform: centre of the dense full steps, a fraction of the trajectory (default 0.3)")
    p.add_argument("--deepcache-power", type=float, default=None,
                   help="deepcache non-uniform: power >= 1 of the step curve; larger crowds more (default 1.4)")
    p.add_argument("--fora-layers", default=None, help="fora: layer indices that cache, '/'-separated (default all)")
    p.add_argument("--tome-stride", type=int, default=None, help="tome: destination grid cell side (default 2)")
    p.add_argument("--tome-max-level", type=int, default=None,
                   help="tome: merge only in layers of skip level <= this (1: the outermost in/out pair; default all)")
    p.add_argument("--tome-schedule", default=None,
                   help="tome: the ASE paper's F<k> (first k layers), R<k> (last k) or B<k> (k/2 at each end)")
    p.add_argument("--l2c-threshold", type=float, default=None,
                   help="l2c: recompute a branch when sigmoid(router logit) > this (default 0.1)")


def caching_options_from_args(args) -> Dict[str, Dict[str, object]]:
    """{method: {option: value}} of the caching options given on the command line."""
    given = {"deepcache": {"depth": args.deepcache_depth, "steps": args.deepcache_steps,
                           "center": args.deepcache_center,
                           "power": args.deepcache_power},
             "fora": {"layers": args.fora_layers},
             "tome": {"stride": args.tome_stride, "max_level": args.tome_max_level,
                      "schedule": args.tome_schedule},
             "l2c": {"threshold": args.l2c_threshold}}
    return {m: {k: v for k, v in o.items() if v is not None} for m, o in given.items()}


def add_sample_options(p: argparse.ArgumentParser) -> None:
    """The method and sharding options of ``sample`` (added to the existing parser)."""
    p.add_argument("--method", default=None, choices=METHODS,
                   help="acceleration method (default: duodiff when --t-s > 0, else base)")
    p.add_argument("--theta", type=float, default=None, help="AdaDiff exit threshold in [0, 1] (--method adadiff)")
    p.add_argument("--ase-schedule", default=None,
                   help="ASE dropping schedule D1..D6 (--method ase; the ASE paper's Table 2)")
    add_method_options(p)
    p.add_argument("--cache-interval", type=int, default=None,
                   help="--method deepcache/fora: full step every N evaluations (default deepcache 3, fora 2)")
    p.add_argument("--tome-ratio", type=float, default=None, help="--method tome: fraction of patch tokens merged (default 0.5)")
    p.add_argument("--l2c-router", default=None,
                   help="--method l2c: Learning-to-Cache router file (a state dict of '<step>.prob' logits)")
    add_caching_options(p)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard file; a restart redraws only missing shards (default {DEFAULT_SHARD_SIZE}; "
                        "keep it fixed across restarts)")
    p.add_argument("--no-float", action="store_true",
                   help="do not keep float samples (samples.pt): 4x less disk for large runs")


def method_spec_from_args(args) -> MethodSpec:
    from ..methods.factory import CACHING_METHODS

    method = args.method or ("duodiff" if args.t_s else "base")
    values = {"deepcache": args.cache_interval, "fora": args.cache_interval, "tome": args.tome_ratio,
              "l2c": args.l2c_router}
    given = {"--cache-interval": args.cache_interval, "--tome-ratio": args.tome_ratio, "--l2c-router": args.l2c_router}
    for flag, v in given.items():
        owners = {"--cache-interval": ("deepcache", "fora"), "--tome-ratio": ("tome",), "--l2c-router": ("l2c",)}[flag]
        if v is not None and method not in owners:
            raise ValueError(f"{flag} applies to --method {'/'.join(owners)}, not {method}")
    if method in CACHING_METHODS:
        if args.theta is not None or args.ase_schedule is not None:
            raise ValueError(f"--method {method} does not combine with AdaDiff or ASE settings")
        value = values[method]
        return MethodSpec(method, t_s=args.t_s, value=None if value is None else str(value),
                          options=tuple(caching_options_from_args(args)[method].items()))
    if args.t_s and method != "duodiff":
        raise ValueError(f"--t-s is DuoDiff's switch point; it applies to --method duodiff and the caching methods "
                         f"({', '.join(CACHING_METHODS)}), not to --method {method}")
    if method == "duodiff" and not args.t_s:
        raise ValueError("--method duodiff needs --t-s > 0 (steps on the 1000-step axis run by the shallow model)")
    if (args.theta is not None) != (method == "adadiff"):
        raise ValueError("--theta is needed with, and only with, --method adadiff")
    if (args.ase_schedule is not None) != (method == "ase"):
        raise ValueError("--ase-schedule (D1..D6) is needed with, and only with, --method ase")
    return MethodSpec(method, t_s=args.t_s if method == "duodiff" else 0,
                      theta=args.theta if method == "adadiff" else None,
                      ase_schedule=args.ase_schedule if method == "ase" else None,
                      adadiff_mode=args.adadiff_mode)


def weights_from_args(args) -> MethodWeights:
    return MethodWeights(
        full=args.checkpoint, shallow=args.shallow_checkpoint, adadiff=args.adadiff_checkpoint,
        ase=parse_ase_checkpoints(args.ase_checkpoint), multistage=args.multistage_checkpoint,
        use_ema=args.use_ema, random=args.random_weights, seed=args.seed)


def sample_labels(indices: np.ndarray, seed: int, class_labels: Optional[str], num_classes: int) -> Optional[np.ndarray]:
    """Class ids of samples ``indices``: each depends only on (seed, index) (or cycles a given list).

    ``num_classes`` <= 0: unconditional (None). The last id is the null class and is never drawn.
    """
    from ..samplers import mix_seed

    if num_classes <= 0:
        if class_labels not in (None, "random"):
            raise ValueError("--class-labels given but the model is unconditional")
        return None
    if class_labels in (None, "random"):
        return np.array([mix_seed(seed + LABEL_STREAM, int(i)) % (num_classes - 1) for i in indices], dtype=np.int64)
    try:
        ids = [int(v) for v in class_labels.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--class-labels must be comma-separated integers or 'random', got {class_labels!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise ValueError(f"class ids must lie in [0, {num_classes - 1}], got {bad or ids}")
    return np.array([ids[int(i) % len(ids)] for i in indices], dtype=np.int64)


def device_for(arg: Optional[str], local_rank: int) -> torch.device:
    """--device, with cuda meaning this process's GPU (LOCAL_RANK) under torchrun; a CUDA device is
    made the current one (:func:`~duodiff_fast.eval.sharding.set_local_device`), so kernels, streams
    and graphs of every rank run on that rank's GPU."""
    from ..devices import normalize_device
    from .sharding import set_local_device

    if arg in (None, "cuda") and torch.cuda.is_available():
        return set_local_device(torch.device("cuda", local_rank))
    if arg is None:
        return torch.device("cpu")
    device = torch.device(arg)
    return set_local_device(normalize_device(device)) if device.type == "cuda" else device


def resolve_backend_arg(args, device: torch.device) -> str:
    """Resolve ``args.backend`` in place ("auto" becomes the backend it chose on ``device``, see
    :mod:`duodiff_fast.auto_backend`) and set ``args.backend_choice`` to why; returns the backend."""
    from ..backends import resolve_backend

    if is_edm_run(args):  # EDM U-Nets: their own candidates and self-check (duodiff_fast.edm.auto_backend)
        if args.backend == "auto":
            from ..edm.auto_backend import choose_edm_backend

            if torch.device(device).type != "cuda":  # reference without a check: no config to read
                choice = choose_edm_backend({}, device)
            else:
                config, name = _edm_config_for_auto(args)
                choice = choose_edm_backend(config, device, name=name)
            args.backend, args.backend_choice = choice.backend, choice.reason
        elif getattr(args, "backend_choice", None) is None:
            args.backend_choice = f"requested: {args.backend}"
        return args.backend
    if getattr(args, "backend_choice", None) is None or args.backend == "auto":
        # --config may be left out when the checkpoint records its config: self-check that one
        config = args.config if args.config else resolve_model_spec(args)
        args.backend, args.backend_choice = resolve_backend(args.backend, config, device)
    return args.backend


def _edm_config_for_auto(args):
    """(config dict, registered name or None) of an EDM run: the named config, else the one a
    converted --checkpoint records (what ``sample`` will build)."""
    from ..edm import EDM_CONFIGS, get_edm_config

    if args.config in EDM_CONFIGS:
        return get_edm_config(args.config), args.config
    from ..edm.checkpoint import read_edm_file

    if not args.checkpoint:
        raise ValueError("--config auto reads the EDM config from --checkpoint; pass one")
    own, _ = read_edm_file(args.checkpoint)
    if own is None:
        raise ValueError(f"{args.checkpoint!r} is a bare state dict: name its config or convert it first "
                         "(duodiff-fast convert)")
    return own, None


def _solver_kwargs(args) -> Dict[str, object]:
    if args.solver == "ddim":
        return {"eta": args.eta}
    if args.solver == "ddpm":
        return {"variance": args.variance}
    if args.solver == "heun":  # EDM's sampler: its noise-level grid and churn settings
        import dataclasses

        from .edm_sample import heun_config_from_args

        return dataclasses.asdict(heun_config_from_args(args))
    from ..samplers.driver import DPM_DEFAULTS

    order, method, _ = DPM_DEFAULTS[args.solver]
    method = args.dpm_method or method
    allowed = ("fast", "singlestep") if args.solver == "dpm_solver" else ("multistep", "singlestep")
    if method not in allowed:
        raise ValueError(f"--dpm-method {method} does not apply to --solver {args.solver}; choose among {allowed}")
    return {"order": args.order or order, "method": method}


L2C_TRAINED_FOR = ("dpm_solver++", "singlestep", 2)  # the published U-ViT-H/2 routers' solver (20 and 50 NFE)
L2C_DIT_TRAINED_FOR = "ddim"  # the published DiT-XL/2 routers' solver (DDIM-20 and DDIM-50)


def router_mismatch_warning(router_steps: int, solver: str, steps, solver_kwargs: Dict[str, object],
                            arch: str = "uvit") -> Optional[str]:
    """Warn (and return the text) when a run's solver or step count differs from what Learning-to-Cache
    routers are trained for: one router step per network evaluation of 2nd-order singlestep DPM-Solver++
    (U-ViT), of DDIM (DiT, ``arch="dit"``)."""
    import warnings

    from ..samplers.driver import DEFAULT_NUM_STEPS

    nfe = steps if steps is not None else DEFAULT_NUM_STEPS[solver]
    problems = []
    if nfe != router_steps:
        problems.append(f"the router has {router_steps} steps, this run makes {nfe} network evaluations")
    run = (solver, solver_kwargs.get("method"), solver_kwargs.get("order"))
    if arch == "dit":
        if solver != L2C_DIT_TRAINED_FOR:
            problems.append(f"Learning-to-Cache's DiT routers go with DDIM (--solver ddim); this run uses {solver}")
    elif run != L2C_TRAINED_FOR:
        problems.append(f"Learning-to-Cache's U-ViT routers go with 2nd-order singlestep DPM-Solver++ "
                        f"(--solver dpm_solver++ --dpm-method singlestep --order 2); this run uses {solver} "
                        f"{solver_kwargs.get('method') or ''} order {solver_kwargs.get('order') or '-'}")
    if not problems:
        return None
    text = "l2c: " + "; ".join(problems) + ": the cached layers were chosen for other steps"
    warnings.warn(text, stacklevel=2)
    return text


def resolve_model_spec(args):
    """The model config of ``--config`` (a registered name, a JSON model config or a checkpoint
    folder), else the one ``--checkpoint`` records (a checkpoint folder, a run folder, this
    package's trainer files); a ValueError says what to pass when neither gives one."""
    from ..models import checkpoint_spec, get_spec

    if args.config:
        return get_spec(args.config)
    if not args.checkpoint:
        raise ValueError("--config is needed (a registered name or a JSON model config) unless --checkpoint "
                         "is a file or folder that records its config")
    spec = checkpoint_spec(args.checkpoint, use_ema=args.use_ema)
    if spec is None:
        raise ValueError(f"--checkpoint {args.checkpoint} does not record its model config: pass --config "
                         "(a registered name, `duodiff-fast configs`, or a JSON model config)")
    return spec


def _denoised_kwargs(args) -> Dict[str, object]:
    """The x0 correction options of :func:`duodiff_fast.samplers.sample` (checked here, before any work)."""
    from ..samplers import denoised_correction

    kw = {"clip_denoised": bool(args.clip_denoised), "thresholding": bool(args.thresholding),
          "thresholding_ratio": args.thresholding_ratio, "thresholding_max_value": args.thresholding_max}
    try:
        denoised_correction(**kw)
    except ValueError as e:
        raise ValueError(f"--clip-denoised/--thresholding: {e}") from None
    return kw


def denoised_setting(kw: Dict[str, object]):
    """What the manifest records of the x0 correction: "none", "clip" or the thresholding parameters."""
    from ..samplers import denoised_correction

    c = denoised_correction(**kw)
    return "none" if c is None else ("clip" if c.mode == "clip" else c.settings())


class SampleJob:
    """One method's sampling set-up: denoiser, labels and the settings that identify its samples.

    Built from the ``sample`` arguments; ``produce(start, count)`` draws samples start ..
    start + count - 1 (float (count, C, H, W) on the CPU, labels (count,) or None).
    """

    def __init__(self, args, spec: MethodSpec, device: torch.device):
        from ..methods.factory import build_method
        from ..samplers import make_guidance
        from ..models import resolve_time_input
        from .manifest import checkpoint_hashes

        self.args, self.spec, self.device = args, spec, device
        self.model_spec = resolve_model_spec(args)
        resolve_backend_arg(args, device)
        self.schedule_name = args.schedule or self.model_spec.schedule
        # The time input the checkpoints declare (e.g. the DuoDiff authors' t/1000), else the config's.
        self.time_input = resolve_time_input(self.model_spec.time_input, [
            args.checkpoint, args.shallow_checkpoint if spec.method == "duodiff" else None])
        self.schedule = self.model_spec.make_schedule(args.schedule, self.time_input)
        built = build_method(spec, self.model_spec, weights_from_args(args), self.schedule, device, args.backend)
        if spec.method == "l2c":
            router_mismatch_warning(built.denoiser.policy.num_steps, args.solver, args.steps, _solver_kwargs(args),
                                    self.model_spec.arch)
        self.built = built
        model = built.model
        self.num_classes = int(model.num_classes) if getattr(model, "is_conditional", False) else 0
        # validate labels before any work
        sample_labels(np.arange(1), args.seed, args.class_labels, self.num_classes)
        denoiser = built.denoiser
        if args.cfg_scale:
            denoiser = make_guidance(denoiser, args.cfg_scale, built.null_class)  # DiT: forward_with_cfg's form
        self.denoiser = denoiser
        self.shape = (int(model.in_chans), int(model.img_size), int(model.img_size))
        self.decoder = None
        if args.autoencoder:
            if not self.model_spec.latent:
                raise ValueError(f"--autoencoder is for latent models; {self.model_spec.name} works in pixel space")
            from ..autoencoder import AutoencoderKL

            self.decoder = AutoencoderKL.from_checkpoint(args.autoencoder).to(device).decode
        self.as_uint8 = not (self.model_spec.latent and self.decoder is None)
        self.solver_kwargs = _solver_kwargs(args)
        self.denoised_kwargs = _denoised_kwargs(args)
        files = dict(built.checkpoints)
        if args.autoencoder:
            files["autoencoder"] = args.autoencoder
        self.checkpoints = checkpoint_hashes(files)

    def settings(self) -> Dict[str, object]:
        """Everything that decides sample i's value (not the batch size, device count or n)."""
        a = self.args
        from ..models import REGISTRY

        registered = REGISTRY.get(self.model_spec.name) is self.model_spec
        return {
            "config": self.model_spec.name,
            # a config that is not a registry entry is identified by its keywords
            **({} if registered else {"model_config": dict(self.model_spec.kwargs)}),
            **self.spec.settings(), **self.built.details,
            "checkpoints": {r: c["sha256"] for r, c in self.checkpoints.items()},
            "random_weights": bool(a.random_weights), "use_ema": bool(a.use_ema), "weights_seed": a.seed,
            "schedule": self.schedule_name, "time_input": self.time_input, "solver": a.solver, "steps": a.steps,
            # the DPM-Solver step split is "solver_method": "method" names the acceleration method
            **{("solver_method" if k == "method" else k): v for k, v in self.solver_kwargs.items()},
            "denoised": denoised_setting(self.denoised_kwargs),
            "cfg_scale": a.cfg_scale, "class_labels": a.class_labels or "random", "seed": a.seed,
            "backend": a.backend, "output": "uint8" if self.as_uint8 else "latent-float32",
        }

    def produce(self, start: int, count: int):
        from ..samplers import generate

        idx = np.arange(start, start + count)
        labels = sample_labels(idx, self.args.seed, self.args.class_labels, self.num_classes)
        y = None if labels is None else torch.from_numpy(labels)
        with torch.inference_mode():
            x = generate(self.denoiser, self.schedule, self.shape, count, batch_size=count, y=y,
                         base_seed=self.args.seed, start_index=start, device=self.device, progress=False,
                         postprocess=self.decoder, solver=self.args.solver, num_steps=self.args.steps,
                         **self.solver_kwargs, **self.denoised_kwargs)
        return x.float().cpu(), labels


def _write_extras(out: str, plan: ShardPlan, job: SampleJob, keep_float: bool) -> list:
    """samples.pt and grid.png beside the merged samples.npz; returns the files written."""
    from ..io_utils import atomic_torch_save
    from ..samplers import save_png_grid
    from .sharding import load_float_samples

    written = []
    with np.load(os.path.join(out, "samples.npz")) as d:
        head = d["arr_0"][:64]
        floats = None if job.as_uint8 else d["arr_0"]
    if job.as_uint8 and keep_float:
        floats = load_float_samples(out, plan)
    if floats is not None:
        atomic_torch_save(torch.from_numpy(np.ascontiguousarray(floats)), os.path.join(out, "samples.pt"))
        written.append("samples.pt")
    if job.as_uint8 and head.shape[-1] in (1, 3):
        save_png_grid(os.path.join(out, "grid.png"), head)
        written.append("grid.png")
    return written


def run_sample(args, job: Optional[SampleJob] = None, out: Optional[str] = None) -> Dict[str, object]:
    """Draw (or finish) the sample set of ``args`` into ``out``; on rank 0 merge it and return the manifest.

    ``job``: a prebuilt :class:`SampleJob` (default: built from ``args`` and its --method options).
    Other ranks return {"rank": r, "drawn": [...]} after writing their shards.
    """
    from ..backends import check_backend
    from ..io_utils import atomic_write_json
    from .manifest import environment, settings_fingerprint
    from .sharding import dist_info, merge_shards, run_shards

    t0 = time.perf_counter()
    check_backend(args.backend, allow_auto=True)
    if args.n_samples < 1 or args.batch_size < 1 or args.shard_size < 1:
        raise ValueError("--n-samples, --batch-size and --shard-size must be >= 1")
    out = out or args.out
    dist = dist_info()
    if job is None and is_edm_run(args):  # --solver heun: EDM's U-Nets (their own job, no triton)
        from .edm_sample import EDMSampleJob

        device = device_for(args.device, dist.local_rank)
        resolve_backend_arg(args, device)  # auto: the U-Net self-check runs on this device
        if dist.rank == 0:
            print(f"backend: {args.backend} ({args.backend_choice})", flush=True)
        job = EDMSampleJob(args, device)
    if job is None:
        device = device_for(args.device, dist.local_rank)
        resolve_backend_arg(args, device)
        if dist.rank == 0:
            print(f"backend: {args.backend} ({args.backend_choice})", flush=True)
        if args.backend == "triton":
            from ..dispatch import BackendUnavailable, triton_unavailable_reason

            why_not = triton_unavailable_reason(device)
            if why_not:  # before any weights load
                raise BackendUnavailable(f"the 'triton' backend cannot run on {device}: {why_not}")
        job = SampleJob(args, method_spec_from_args(args), device)
    spec, device = job.spec, job.device
    settings = dict(job.settings(), shard_size=args.shard_size)
    fingerprint = settings_fingerprint(settings)
    plan = ShardPlan(args.n_samples, args.shard_size)
    keep_float = not args.no_float
    drawn = run_shards(out, plan, job.produce, fingerprint, args.batch_size, dist, as_uint8=job.as_uint8,
                       keep_float=keep_float, progress=not args.no_progress)
    if dist.rank != 0:
        return {"rank": dist.rank, "drawn": drawn}
    merged = merge_shards(out, plan, fingerprint)
    files = ["samples.npz"] + _write_extras(out, plan, job, keep_float)
    manifest = {
        "settings": settings, "fingerprint": fingerprint, "method_label": spec.label,
        "checkpoints": job.checkpoints, "count": plan.n_samples, "num_shards": plan.num_shards,
        "sample_shape": merged["shape"][1:], "dtype": merged["dtype"], "world_size": dist.world_size,
        "backend": args.backend, "backend_choice": args.backend_choice,
        "device": str(device), "environment": environment(device),
        "shards_drawn_by_rank0_this_run": drawn, "shard_compute_seconds": merged["shard_seconds"],
        "wall_time_s": time.perf_counter() - t0, "files": files,
    }
    atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def cmd_sample(args) -> int:
    """The ``sample`` subcommand."""
    manifest = run_sample(args)
    if "files" in manifest:
        kind = "images" if manifest["dtype"] == "uint8" else \
            "latents (Stable Diffusion KL-f8 space, scale 0.18215; pass --autoencoder to decode them)"
        print(f"wrote {manifest['count']} {kind} ({manifest['method_label']}) to {args.out}/ "
              f"({', '.join(manifest['files'])}, manifest.json)")
    return 0
