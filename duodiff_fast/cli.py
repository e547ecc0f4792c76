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

SOLVERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++")
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
                   help="solver steps (default: ddpm 1000, ddim 50, dpm_solver and dpm_solver++ 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--variance", default="beta", choices=("beta", "beta_tilde"),
                   help="DDPM ancestral variance (default beta)")
    p.add_argument("--order", type=int, default=None, choices=(1, 2, 3),
                   help="DPM-Solver order (default: dpm_solver 3, dpm_solver++ 2)")
    p.add_argument("--dpm-method", default=None, choices=("singlestep", "fast", "multistep"),
                   help="DPM-Solver step split: dpm_solver: 'fast' (mixed orders, default) or 'singlestep'; "
                        "dpm_solver++: 'multistep' (2M/3M, default) or 'singlestep' (2S)")
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
    from .eval.sample_cmd import add_sample_options

    add_sample_options(p)  # --method (adadiff/ase/multistage), sharding and resume


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
    sub = parser.add_subparsers(dest="command", metavar="{sample,train,bench,eval,configs}")
    sub.required = True
    _add_sample_parser(sub)
    _add_train_parser(sub)
    _add_bench_parser(sub)
    from .eval.table_cmd import add_eval_parser

    add_eval_parser(sub)
    sub.add_parser("configs", help="list the named model configurations")
    return parser


# ----------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    from .eval.sample_cmd import cmd_sample as run

    return run(args)


def cmd_eval(args) -> int:
    from .eval.table_cmd import cmd_eval as run

    return run(args)


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
        return {"sample": cmd_sample, "train": cmd_train, "eval": cmd_eval}[args.command](args)
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
