"""The ``duodiff-fast`` command: sample, train, bench, eval, configs, convert.

    duodiff-fast sample --config cifar10-s2 --checkpoint full.pth \\
        --shallow-checkpoint shallow.pth --t-s 300 --solver ddim --steps 50 --n-samples 64 --out samples/
    duodiff-fast train --config cifar10-s2-shallow --data folder:/data/cifar10 --out-dir runs/shallow
    duodiff-fast train --config tiny-cond --method adadiff --backbone runs/full/latest.pt --out-dir runs/ada
    duodiff-fast calibrate --config tiny-cond --adadiff-checkpoint runs/ada/adadiff.pt --target-speedup 1.3
    duodiff-fast bench                      # benchmarks/latency.py with the machine's defaults
    duodiff-fast configs                    # the named model configurations
    duodiff-fast configs --show tiny-cond   # one of them as a JSON model config (edit, pass to --config)
    duodiff-fast sample --checkpoint runs/my_run --n-samples 16   # a run folder knows its config
    duodiff-fast sample --solver heun --config multistage-cifar10-ddpmpp --checkpoint ms.pt --steps 18 ...
    duodiff-fast convert edm_state_dict.pt edm.pt   # an exported EDM / multistage U-Net state dict

Exit status: 0 success; 2 a usage error (bad option or value, unknown config, a file that does not
exist or does not fit; the message names it); 1 a runtime error (the command was valid but could not
run here, e.g. a backend this machine cannot run, a Triton kernel that failed to compile or launch,
or a benchmark row that failed). ``duodiff_fast.errors.is_usage_error`` tells the two apart.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

SOLVERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++")
# The same names as duodiff_fast.backends.BACKEND_CHOICES (kept literal so that --help needs no torch
# import; tests/test_cli.py checks they agree).
BACKEND_NAMES = ("reference", "eager-bf16", "torch.compile", "triton", "auto")
EXIT_USAGE, EXIT_RUNTIME = 2, 1


def _add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images (or latents) from a U-ViT, optionally with DuoDiff",
        description="Generate samples with any solver, optionally DuoDiff (shallow + full backbone) "
                    "and classifier-free guidance. Writes samples.npz (uint8 images or float latents), "
                    "samples.pt (float tensor) and, for pixel models, grid.png.",
    )
    p.add_argument("--config", default=None,
                   help="model config of the full backbone: a registered name (`duodiff-fast configs`) or a "
                        "JSON model config (`duodiff-fast configs --show NAME`); optional when --checkpoint "
                        "records its config (a checkpoint folder, a training run folder, trainer checkpoints)")
    p.add_argument("--checkpoint", default=None,
                   help="weights of the full backbone: a checkpoint folder (config.json + model.safetensors), a "
                        "training run folder (its export/ema: the EMA weights; RUN/export/raw for the raw ones), "
                        "or a file (.pth/.pt/.safetensors; official or trainer checkpoints). Required unless "
                        "--random-weights")
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
    p.add_argument("--solver", default="ddim", choices=SOLVERS + ("heun",),
                   help="sampling solver (default ddim); heun: EDM's sampler for the EDM U-Nets (--config "
                        "edm-*/multistage-*-ddpmpp or auto)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: ddpm 1000, ddim 50, dpm_solver and dpm_solver++ 20, heun 18 = 35 evaluations)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--variance", default="beta", choices=("beta", "beta_tilde"),
                   help="DDPM ancestral variance (default beta)")
    p.add_argument("--order", type=int, default=None, choices=(1, 2, 3),
                   help="DPM-Solver order (default: dpm_solver 3, dpm_solver++ 2)")
    p.add_argument("--dpm-method", default=None, choices=("singlestep", "fast", "multistep"),
                   help="DPM-Solver step split: dpm_solver: 'fast' (mixed orders, default) or 'singlestep'; "
                        "dpm_solver++: 'multistep' (2M/3M, default) or 'singlestep' (2S)")
    p.add_argument("--clip-denoised", action="store_true",
                   help="clip each step's denoised estimate x0 to [-1, 1], every solver (ADM's clip_denoised, "
                        "diffusers' clip_sample); default off, as the papers' samplers")
    p.add_argument("--thresholding", action="store_true",
                   help="dynamic thresholding of each step's x0 instead (Imagen / DPM-Solver): per sample s = the "
                        "--thresholding-ratio quantile of |x0|, at least --thresholding-max; x0 -> clamp(x0, -s, s) / s")
    p.add_argument("--thresholding-ratio", type=float, default=0.995,
                   help="quantile of |x0| for --thresholding (default 0.995)")
    p.add_argument("--thresholding-max", type=float, default=1.0,
                   help="floor of the --thresholding threshold s, the data range (default 1.0)")
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
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                   help="execution backend: reference (float32), eager-bf16, torch.compile, triton (the fused "
                        "Triton kernels; needs a CUDA GPU), or auto: the fastest of them that runs on the device "
                        "and passes a self-check there (checked once, cached; reference on a CPU). The choice is "
                        "printed and recorded in the manifest (default auto)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .eval.edm_sample import add_heun_options
    from .eval.sample_cmd import add_sample_options

    add_sample_options(p)  # --method (adadiff/ase/multistage), sharding and resume
    add_heun_options(p)  # EDM's Heun grid and churn (--solver heun)


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
                   help="model config: a registered name (train DuoDiff's shallow backbone with <name>-shallow) "
                        "or a path to a JSON model config (`duodiff-fast configs --show NAME` prints one), or an EDM "
                        "config (edm-*, multistage-*: EDM's loss; writes RUN/edm_ema.pt for sample --solver heun)")
    p.add_argument("--data", default="synthetic",
                   help="data source: folder:/path (images; labels from sub-folders), npz:/path.npz "
                        "(pixels or latents), a bare path, or 'synthetic' (default synthetic)")
    p.add_argument("--schedule", default=None, help="noise schedule name (default: the config's own)")
    p.add_argument("--out-dir", default=d["out_dir"].default, help="run folder (default runs/train)")
    p.add_argument("--steps", type=int, default=d["steps"].default, help="optimizer steps (default 500000)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="global batch size (default 128)")
    # Unset optimisation options take the config's recipe: DuoDiff's for U-ViT, DiT's train.py for DiT.
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-4; DiT configs 1e-4)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (default 0.03; DiT configs 0)")
    p.add_argument("--betas", default=None, help="AdamW betas (default 0.99,0.999; DiT configs 0.9,0.999)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default 1500; DiT configs 0)")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm, 0 disables (default 1.0; DiT configs 0)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.9999), reached after a warm-up: update t uses "
                        "min(decay, (1 + t) / (10 + t))")
    p.add_argument("--no-ema-warmup", action="store_true",
                   help="use --ema-decay from the first update (U-ViT's EMA; a short run's EMA then keeps "
                        "much of the random initial weights)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of the training images (default: off, except for the "
                        "CIFAR-10/CelebA recipes cifar10-s2 and celeba64-s4 and their -shallow twins)")
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
    p.add_argument("--method", default="base", choices=("base", "adadiff", "ase", "multistage"),
                   help="what to train: base (the U-ViT of --config), adadiff (exit heads + uncertainty modules on "
                        "the frozen --backbone), ase (fine-tune --backbone for --ase-schedule), multistage "
                        "(per-stage decoders, from --backbone or fresh) (default base)")
    p.add_argument("--shallow", action="store_true",
                   help="train the DuoDiff shallow twin of --config (depth 2: <name>-shallow)")
    p.add_argument("--backbone", default=None,
                   help="the pretrained U-ViT for --method adadiff/ase/multistage: a checkpoint or run folder "
                        "(anything load_model reads; built with --config)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights of a trainer checkpoint --backbone")
    p.add_argument("--ase-schedule", default=None,
                   help="ASE dropping schedule D1..D6 for --method ase (--schedule stays the noise schedule)")
    p.add_argument("--boundaries", default=None,
                   help="multistage stage boundaries on t, comma-separated (default 0.442,0.631)")
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
    sub = parser.add_subparsers(dest="command", metavar="{sample,train,bench,eval,calibrate,configs,convert}")
    sub.required = True
    _add_sample_parser(sub)
    _add_train_parser(sub)
    _add_bench_parser(sub)
    from .eval.table_cmd import add_eval_parser

    add_eval_parser(sub)
    from .eval.calibrate_cmd import add_calibrate_parser

    add_calibrate_parser(sub)
    cp = sub.add_parser("configs", help="list the named model configurations, or print one as JSON")
    cp.add_argument("--show", default=None, metavar="NAME",
                    help="print config NAME as a JSON model config (a starting point for --config my.json)")
    _add_convert_parser(sub)
    return parser


def _add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="check an exported EDM / multistage U-Net state dict and write the package's model file",
        description="Reads a state dict exported from EDM's (or the multistage authors') pickle with "
                    "torch.save(net.state_dict(), PATH) -- the package never unpickles their files -- checks it "
                    "against a config (named, or inferred from the tensor shapes) and writes "
                    "{format, config, state_dict} for `sample --solver heun --config auto`.")
    p.add_argument("src", help="the exported state dict (.pt, read with weights_only=True)")
    p.add_argument("dst", help="output file (written atomically)")
    p.add_argument("--config", default="auto",
                   help="EDM config name (edm-cifar10-ddpmpp, multistage-cifar10-ddpmpp, ...) or auto (default: "
                        "inferred from the shapes)")
    p.add_argument("--stage-interval", default=None,
                   help="multistage: per-stage (lo, hi] intervals on sigma as JSON, e.g. "
                        "'[[[0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, Infinity]]]' (default: the authors' CIFAR-10 ones)")


def cmd_convert(args) -> int:
    import json

    from .edm.checkpoint import convert_edm_state_dict

    try:
        intervals = None if args.stage_interval is None else json.loads(args.stage_interval)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--stage-interval is not JSON: {e}")
    cfg = convert_edm_state_dict(args.src, args.dst, args.config, intervals)
    print(f"wrote {args.dst} ({cfg['model_type']}, {cfg['img_resolution']}x{cfg['img_resolution']}); "
          f"sample it with: duodiff-fast sample --solver heun --config auto --checkpoint {args.dst}")
    return 0


# ----------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    from .eval.sample_cmd import cmd_sample as run

    return run(args)


def cmd_eval(args) -> int:
    from .eval.table_cmd import cmd_eval as run

    return run(args)


# ------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    from .models import get_spec
    from .training import TrainConfig
    from .training.config import DIT_RECIPE

    from .edm.configs import EDM_CONFIGS

    is_edm = args.config in EDM_CONFIGS
    if is_edm:  # EDM / multistage U-Nets: EDM's loss, no --method (edm.train_cmd)
        from .edm.train_cmd import check_edm_train_args

        check_edm_train_args(args)
    d = TrainConfig.__dataclass_fields__
    recipe = dict(lr=d["lr"].default, weight_decay=d["weight_decay"].default, betas="0.99,0.999",
                  warmup_steps=d["warmup_steps"].default, grad_clip=1.0, ema_decay=d["ema_decay"].default)
    if is_edm:
        from .edm.train_cmd import EDM_RECIPE

        recipe.update(EDM_RECIPE)
    elif get_spec(args.config).arch == "dit":  # DiT's train.py recipe (training.config.DIT_RECIPE)
        recipe.update({k: v for k, v in DIT_RECIPE.items() if k in recipe})
        recipe.update(betas=",".join(str(b) for b in DIT_RECIPE["betas"]), grad_clip=DIT_RECIPE["grad_clip"] or 0.0)
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        betas = [float(b) for b in args.betas.split(",")]
    except ValueError:
        raise SystemExit(f"--betas must be two comma-separated floats, got {args.betas!r}")
    cfg = TrainConfig(
        model=args.config, schedule=args.schedule, data=args.data, out_dir=args.out_dir,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        betas=betas, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
        ema_decay=args.ema_decay, ema_warmup=not args.no_ema_warmup, hflip=args.hflip, p_uncond=args.p_uncond, amp=args.amp, seed=args.seed,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
        device=args.device, num_workers=args.num_workers,
        resume=args.resume,
        model_overrides={"use_checkpoint": True} if args.gradient_checkpointing else {},
        progress=not args.no_progress,
    )
    from .training.methods import method_training
    from .training.trainer import Trainer

    boundaries = None
    if args.boundaries is not None:
        try:
            boundaries = [float(v) for v in args.boundaries.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--boundaries must be comma-separated floats, got {args.boundaries!r}")
    if args.schedule and args.schedule.strip().upper() in ("D1", "D2", "D3", "D4", "D5", "D6"):
        raise SystemExit(f"--schedule is the noise schedule; the ASE dropping schedule is --ase-schedule {args.schedule}")
    if is_edm:
        from .edm.train_cmd import edm_training

        run = edm_training(args.config, cfg)
    else:
        run = method_training(args.method, cfg, backbone=args.backbone, backbone_config=args.config,
                              use_ema=args.use_ema, shallow=args.shallow, ase_schedule=args.ase_schedule,
                              boundaries=boundaries)
    trainer = Trainer(run.cfg, model=run.model, loss_fn=run.loss_fn)
    try:
        if trainer.resumed_from and not cfg.progress and trainer.is_main:
            # the trainer prints this line only with progress output on; a resume is never silent
            print(f"resumed from {trainer.resumed_from} at step {trainer.step}", flush=True)
        trainer.fit()
        path = run.export(trainer)
        if path and trainer.is_main:
            print(f"trained {run.description}; wrote its EMA weights to {path}", flush=True)
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
            from .models import describe, spec_json

            if args.show:
                print(spec_json(args.show))
                return 0
            from .edm import EDM_CONFIGS

            print(describe())
            print("\nEDM U-Nets (train; sample/eval --solver heun):")
            for name, cfg in EDM_CONFIGS.items():
                print(f"  {name}: {cfg['model_type']} {cfg['img_resolution']}x{cfg['img_resolution']}")
            return 0
        if args.command == "calibrate":
            from .eval.calibrate_cmd import cmd_calibrate

            return cmd_calibrate(args)
        return {"sample": cmd_sample, "train": cmd_train, "eval": cmd_eval, "convert": cmd_convert}[args.command](args)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): a usage error found while checking input
            return _error(command, e.code, EXIT_USAGE)
        raise
    except Exception as e:  # noqa: BLE001 - classified below; anything else keeps its traceback
        from .errors import is_usage_error

        if is_usage_error(e):
            # Bad input already carries a message naming the problem: show it without a traceback.
            return _error(command, e.args[0] if isinstance(e, KeyError) and e.args else e, EXIT_USAGE)
        if _is_reported_runtime_error(e):
            return _error(command, e, EXIT_RUNTIME)
        raise


def _is_reported_runtime_error(e: BaseException) -> bool:
    """Runtime errors whose message says all (exit 1 without a traceback): a backend or device this
    machine does not have, out of memory, a Triton kernel that failed to compile or launch."""
    from .dispatch import BackendUnavailable
    from .errors import DeviceUnavailable

    if isinstance(e, (BackendUnavailable, DeviceUnavailable)) or type(e).__name__ == "OutOfMemoryError":
        return True
    common = sys.modules.get("duodiff_fast.kernels._common")  # loaded whenever a kernel ran
    return common is not None and isinstance(e, common.KernelLaunchError)


if __name__ == "__main__":
    sys.exit(main())
