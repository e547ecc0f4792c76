"""The ``duodiff-fast`` command: sample, train, bench, configs.

    duodiff-fast sample --config cifar10-s2 --checkpoint full.pth \\
        --shallow-checkpoint shallow.pth --t-s 300 --solver ddim --steps 50 --n-samples 64 --out samples/
    duodiff-fast train --config cifar10-s2-shallow --data folder:/data/cifar10 --out-dir runs/shallow
    duodiff-fast bench                      # benchmarks/latency.py with the machine's defaults
    duodiff-fast configs                    # the named model configurations

Exit status: 0 success; 2 a usage error (bad option or value, unknown config, a file that does not
exist or does not fit; the message names it); 1 a runtime error (the command was valid but could not
run here, e.g. a backend this machine cannot run, or a benchmark row that failed).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

SOLVERS = ("ddpm", "ddim", "dpm_solver")
# The same names as duodiff_fast.backends.BACKENDS (kept literal so that --help needs no torch
# import; tests/test_cli.py checks they agree).
BACKEND_NAMES = ("reference", "eager-bf16", "torch.compile", "triton")
EXIT_USAGE, EXIT_RUNTIME = 2, 1


def _add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images (or latents) from a U-ViT, optionally with DuoDiff",
        description="Generate samples with any solver, optionally DuoDiff (shallow + full backbone) "
                    "and classifier-free guidance. Writes samples.npz (uint8 images or float latents), "
                    "samples.pt (float tensor) and, for pixel models, grid.png.",
    )
    p.add_argument("--config", required=True,
                   help="model config name of the full backbone (see `duodiff-fast configs`)")
    p.add_argument("--checkpoint", default=None,
                   help="weights of the full backbone (.pth/.pt/.safetensors; official or trainer "
                        "checkpoints). Required unless --random-weights")
    p.add_argument("--shallow-checkpoint", default=None,
                   help="weights of the DuoDiff shallow backbone (config <config>-shallow); needed when --t-s > 0")
    p.add_argument("--t-s", type=int, default=0,
                   help="DuoDiff switch point: the first t_s steps of the 1000-step reverse process run "
                        "the shallow backbone (0 = base model only; default 0)")
    p.add_argument("--use-ema", action="store_true",
                   help="load the EMA weights (ema_state_dict) of trainer checkpoints")
    p.add_argument("--random-weights", action="store_true",
                   help="use randomly initialised weights, seeded by --seed (smoke tests and timing only: the images are noise)")
    p.add_argument("--schedule", default=None,
                   help="noise schedule (linear, vp-linear, scaled-linear); default: the config's own")
    p.add_argument("--solver", default="ddim", choices=SOLVERS, help="sampling solver (default ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: ddpm 1000, ddim 50, dpm_solver 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--variance", default="beta", choices=("beta", "beta_tilde"),
                   help="DDPM ancestral variance (default beta)")
    p.add_argument("--order", type=int, default=3, choices=(1, 2, 3), help="DPM-Solver order (default 3)")
    p.add_argument("--dpm-method", default="fast", choices=("singlestep", "fast"),
                   help="DPM-Solver step split: fixed-order singlestep, or the 'fast' mixed-order variant (default fast)")
    p.add_argument("--cfg-scale", type=float, default=0.0,
                   help="classifier-free guidance scale s in cond + s*(cond - uncond); 0 disables (default 0)")
    p.add_argument("--class-labels", default=None,
                   help="class ids for conditional models: comma-separated list cycled over the samples, "
                        "or 'random' (default random, drawn from --seed)")
    p.add_argument("--n-samples", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default 16)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; sample i's noise depends only on (seed, i), not on the batch size")
    p.add_argument("--autoencoder", default=None,
                   help="latent models: Stable Diffusion KL-f8 autoencoder weights (.ckpt/.pth/.safetensors, "
                        "original key names) to decode the latents into images; without it the latents are saved")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--backend", default="reference", choices=BACKEND_NAMES,
                   help="execution backend: reference (float32), eager-bf16, torch.compile, triton (the fused "
                        "Triton kernels; needs a CUDA GPU) (default reference)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_train_parser(sub) -> None:
    from .training.config import TrainConfig

    d = TrainConfig.__dataclass_fields__
    p = sub.add_parser(
        "train", help="train a U-ViT (full or DuoDiff shallow backbone) with the noise-prediction loss",
        description="Train with AdamW (DuoDiff paper settings by default), warm-up, EMA, gradient "
                    "clipping and label dropout. Runs on one process or under torchrun (DDP). "
                    "Checkpoints are written atomically and a rerun with the same --out-dir resumes.",
    )
    p.add_argument("--config", required=True,
                   help="model config name; train DuoDiff's shallow backbone with <name>-shallow")
    p.add_argument("--data", default="synthetic",
                   help="data source: folder:/path (images; labels from sub-folders), npz:/path.npz "
                        "(pixels or latents), a bare path, or 'synthetic' (default synthetic)")
    p.add_argument("--schedule", default=None, help="noise schedule name (default: the config's own)")
    p.add_argument("--out-dir", default=d["out_dir"].default, help="run folder (default runs/train)")
    p.add_argument("--steps", type=int, default=d["steps"].default, help="optimizer steps (default 500000)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="global batch size (default 128)")
    p.add_argument("--lr", type=float, default=d["lr"].default, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"].default, help="AdamW weight decay (default 0.03)")
    p.add_argument("--betas", default="0.99,0.999", help="AdamW betas (default 0.99,0.999)")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"].default, help="linear warm-up steps (default 1500)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 disables (default 1.0)")
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"].default, help="EMA decay (default 0.9999)")
    p.add_argument("--p-uncond", type=float, default=None,
                   help="label drop rate to the null class for conditional models (default 0.1; 0.15 for imagenet256-l2)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"),
                   help="bf16 autocast: auto = on CUDA only (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and noise (default 0)")
    p.add_argument("--save-every", type=int, default=d["save_every"].default, help="checkpoint period in steps (default 10000)")
    p.add_argument("--keep-last", type=int, default=d["keep_last"].default, help="step checkpoints kept (default 3)")
    p.add_argument("--log-every", type=int, default=d["log_every"].default, help="steps between log lines (default 100)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for on-disk data (default 0)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (resume from --out-dir when it holds a checkpoint), a checkpoint path, or 'none'")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward to save memory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_bench_parser(sub) -> None:
    sub.add_parser(
        "bench", add_help=False,
        help="per-sample latency of the base model and DuoDiff (benchmarks/latency.py); "
             "`duodiff-fast bench --help` lists its options",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duodiff-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"duodiff-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{sample,train,bench,configs}")
    sub.required = True
    _add_sample_parser(sub)
    _add_train_parser(sub)
    _add_bench_parser(sub)
    sub.add_parser("configs", help="list the named model configurations")
    return parser


# ----------------------------------------------------------------------------------- sample
def _labels(args, model, n: int):
    import torch

    if not model.is_conditional:
        if args.class_labels not in (None, "random"):
            raise SystemExit(f"--class-labels given but {args.config} is unconditional")
        return None
    num_real = model.num_classes - 1  # the last id is the null class
    if args.class_labels in (None, "random"):
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, num_real, (n,), generator=g)
    try:
        ids = [int(v) for v in args.class_labels.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--class-labels must be comma-separated integers or 'random', got {args.class_labels!r}")
    bad = [i for i in ids if not 0 <= i < model.num_classes]
    if not ids or bad:
        raise SystemExit(f"class ids must lie in [0, {model.num_classes - 1}], got {bad or ids}")
    return torch.tensor([ids[i % len(ids)] for i in range(n)])


def _load_backbone(config: str, checkpoint: Optional[str], args):
    from .models import create_model, load_weights

    import torch

    # Random weights come from --seed, so two runs with the same arguments agree.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = create_model(config)
    if checkpoint:
        load_weights(model, checkpoint, use_ema=args.use_ema)
    elif not args.random_weights:
        raise SystemExit(f"no weights for {config}: pass --checkpoint (and --shallow-checkpoint for DuoDiff) "
                         "or --random-weights for a smoke test")
    return model


def cmd_sample(args) -> int:
    import torch

    from .backends import check_backend, prepare_model
    from .methods import DuoDiff, ModelDenoiser
    from .models import get_spec, shallow_name
    from .samplers import ClassifierFreeGuidance, generate, save_npz, save_png_grid
    from .schedules import get_schedule

    spec = get_spec(args.config)
    check_backend(args.backend)
    if args.n_samples < 1 or args.batch_size < 1:
        raise SystemExit("--n-samples and --batch-size must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "triton":
        from .dispatch import BackendUnavailable, triton_unavailable_reason

        why_not = triton_unavailable_reason(device)
        if why_not:  # before any weights load
            raise BackendUnavailable(f"the 'triton' backend cannot run on {device}: {why_not}")
    schedule = get_schedule(args.schedule or spec.schedule)
    full = prepare_model(_load_backbone(args.config, args.checkpoint, args).to(device), args.backend)
    if args.t_s:
        if not args.shallow_checkpoint and not args.random_weights:
            raise SystemExit("--t-s > 0 needs --shallow-checkpoint (weights of the shallow backbone)")
        shallow = prepare_model(
            _load_backbone(shallow_name(args.config), args.shallow_checkpoint, args).to(device), args.backend)
        denoiser = DuoDiff(shallow, full, schedule, args.t_s)
    else:
        denoiser = ModelDenoiser(full, schedule)
    labels = _labels(args, full, args.n_samples)
    if args.cfg_scale:
        if not full.is_conditional:
            raise SystemExit("--cfg-scale needs a class-conditional model")
        denoiser = ClassifierFreeGuidance(denoiser, args.cfg_scale, full.null_class)
    solver_kw = {}
    if args.solver == "ddim":
        solver_kw["eta"] = args.eta
    elif args.solver == "ddpm":
        solver_kw["variance"] = args.variance
    else:
        solver_kw.update(order=args.order, method=args.dpm_method)
    decoder = None
    if args.autoencoder:
        if not spec.latent:
            raise SystemExit(f"--autoencoder is for latent models; {args.config} works in pixel space")
        from .autoencoder import AutoencoderKL

        autoencoder = AutoencoderKL.from_checkpoint(args.autoencoder).to(device)
        decoder = autoencoder.decode
    with torch.inference_mode():
        samples = generate(
            denoiser, schedule, (full.in_chans, full.img_size, full.img_size), args.n_samples,
            batch_size=args.batch_size, solver=args.solver, num_steps=args.steps, y=labels,
            base_seed=args.seed, device=device, progress=not args.no_progress, postprocess=decoder,
            **solver_kw,
        )
    samples = samples.float().cpu()
    os.makedirs(args.out, exist_ok=True)
    from .io_utils import atomic_torch_save

    atomic_torch_save(samples, os.path.join(args.out, "samples.pt"))
    if spec.latent and decoder is None:
        save_npz(os.path.join(args.out, "samples.npz"), samples, labels=labels, as_uint8=False)
        print(f"wrote {args.n_samples} latents (Stable Diffusion KL-f8 space, scale 0.18215) to {args.out}/; "
              "pass --autoencoder to decode them into images")
    else:
        save_npz(os.path.join(args.out, "samples.npz"), samples, labels=labels)
        save_png_grid(os.path.join(args.out, "grid.png"), samples)
        print(f"wrote {args.n_samples} samples to {args.out}/ (samples.npz, samples.pt, grid.png)")
    return 0


# ------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    from .training import TrainConfig, train

    try:
        betas = [float(b) for b in args.betas.split(",")]
    except ValueError:
        raise SystemExit(f"--betas must be two comma-separated floats, got {args.betas!r}")
    cfg = TrainConfig(
        model=args.config, schedule=args.schedule, data=args.data, out_dir=args.out_dir,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        betas=betas, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
        ema_decay=args.ema_decay, p_uncond=args.p_uncond, amp=args.amp, seed=args.seed,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
        device=args.device, num_workers=args.num_workers,
        resume=None if args.resume == "none" else args.resume,
        model_overrides={"use_checkpoint": True} if args.gradient_checkpointing else {},
        progress=not args.no_progress,
    )
    from .training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        if trainer.resumed_from and not cfg.progress and trainer.is_main:
            # the trainer prints this line only with progress output on; a resume is never silent
            print(f"resumed from {trainer.resumed_from} at step {trainer.step}", flush=True)
        trainer.fit()
    finally:
        trainer.close()
    return 0


def cmd_bench(argv: List[str]) -> int:
    """``duodiff-fast bench ...``: benchmarks/latency.py; exit 1 when a row failed (after writing the JSON)."""
    from .bench.latency import main as bench_main

    result = bench_main(argv, prog="duodiff-fast bench")
    failed = [r for r in result["rows"] if r.get("status") == "failed"]
    return EXIT_RUNTIME if failed else 0


def _error(command: str, msg, code: int) -> int:
    print(f"duodiff-fast {command}: error: {msg}", file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv``; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        if command == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)  # usage errors exit 2 here (argparse), --help exits 0
        if args.command == "configs":
            from .models import describe

            print(describe())
            return 0
        return {"sample": cmd_sample, "train": cmd_train}[args.command](args)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): a usage error found while checking input
            return _error(command, e.code, EXIT_USAGE)
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        # Bad input already carries a message naming the problem: show it without a traceback.
        return _error(command, e.args[0] if isinstance(e, KeyError) and e.args else e, EXIT_USAGE)
    except Exception as e:  # noqa: BLE001 - only the two kinds below; anything else keeps its traceback
        from .dispatch import BackendUnavailable

        if isinstance(e, BackendUnavailable) or type(e).__name__ == "OutOfMemoryError":
            return _error(command, e, EXIT_RUNTIME)
        raise


if __name__ == "__main__":
    sys.exit(main())
