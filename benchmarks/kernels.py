"""Micro-benchmarks of the fused Triton kernels against their PyTorch peers, at U-ViT shapes.

For every paper config (cifar10-s2, celeba64-s4, imagenet64-m4, imagenet256-l2) and batch size
(default 1, 16, 64, 128, 256) it times each fused op against eager PyTorch and ``torch.compile``
(and, for attention, ``scaled_dot_product_attention`` and flash-attn when installed), then the
whole U-ViT forward on the "triton" backend (both matmul implementations) against eager bf16 and
``torch.compile(mode="max-autotune-no-cudagraphs")``.

Timing: CUDA events around each call, L2 flushed before each run (a 256 MiB write), warm-up runs
first, the median of ``--reps`` runs. Rooflines are *measured* in the same run: the bf16 matmul
peak (8192^3 ``torch.matmul``) and the copy bandwidth (1 GiB ``copy_``). Each row prints the time,
TFLOP/s (matmul-bound ops) or GB/s (memory-bound ops) and the fraction of the measured roofline,
and the JSON (``benchmarks/results/kernels_<device>.json``) holds every number.

Needs a CUDA device: on a machine without one it prints so and exits 0 without writing numbers.
``--smoke`` instead runs every case once at tiny shapes (on the CPU through Triton's interpreter)
to check the harness itself; it times nothing and writes nothing.

    python benchmarks/kernels.py                           # everything (GPU; hours of torch.compile builds)
    python benchmarks/kernels.py --preset gpu-suite        # U-ViT-L/2 at batch 128, a few minutes (gpu_suite.sh)
    python benchmarks/kernels.py --configs imagenet256-l2 --batches 128 --ops attention,forward
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

OPS = ("layernorm", "add_layernorm", "qkv", "attention", "proj_residual", "fc1_gelu", "fc2_residual",
       "skip_linear", "frontend", "final_layer", "forward")


DEFAULTS = dict(configs="cifar10-s2,celeba64-s4,imagenet64-m4,imagenet256-l2", batches="1,16,64,128,256",
                forward_batches="128", reps=50, warmup=10, forward_compile_mode="max-autotune-no-cudagraphs",
                budget=0.0)
PRESETS = {
    # benchmarks/gpu_suite.sh: U-ViT-L/2 (the DuoDiff paper's ImageNet-256 model) at batch 128, every
    # op against eager, torch.compile and SDPA, the whole forward with torch.compile's default mode
    # (max-autotune alone takes minutes); a 150 s budget.
    "gpu-suite": dict(configs="imagenet256-l2", batches="128", forward_batches="128", reps=20, warmup=5,
                      forward_compile_mode="default", budget=150.0),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named plan (gpu-suite: imagenet256-l2 at batch 128, 20 reps, 150 s budget)")
    p.add_argument("--configs", default=None, help=f"model configs (default {DEFAULTS['configs']})")
    p.add_argument("--batches", default=None, help="batch sizes for the per-op rows (default 1,16,64,128,256)")
    p.add_argument("--forward-batches", default=None, help="batch sizes for the full-forward rows (default 128)")
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {', '.join(OPS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (median reported; default 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--forward-compile-mode", default=None,
                   help="torch.compile mode of the whole-forward peer (default max-autotune-no-cudagraphs; "
                        "'default' for PyTorch's default mode)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: cases not started by then are recorded as skipped (default: none)")
    p.add_argument("--smoke", action="store_true", help="run each case once at tiny shapes; time nothing")
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    layer = dict(DEFAULTS, **PRESETS[args.preset]) if args.preset else DEFAULTS
    for key, value in layer.items():  # explicit options win over the preset, the preset over the defaults
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [o for o in _split(args.ops) if o not in OPS]
    if unknown:
        p.error(f"unknown --ops {', '.join(unknown)}; choose among {', '.join(OPS)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def plan(args) -> List[tuple]:
    """(config, batch, ops) of every case group this run builds, in order (ops of the full-forward
    group: ["forward"])."""
    ops = _split(args.ops)
    out = []
    for config in _split(args.configs):
        per_op = [o for o in ops if o != "forward"]
        if per_op:
            out += [(config, int(b), per_op) for b in _split(args.batches)]
        if "forward" in ops:
            out += [(config, int(b), ["forward"]) for b in _split(args.forward_batches)]
    return out


# ----------------------------------------------------------------------------- timing
def _flush_buffer(device):
    import torch

    return torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)


def time_ms(fn: Callable[[], object], reps: int, warmup: int, flush) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, each after an L2 flush, by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def measure_rooflines(device, dtype, reps: int, flush) -> Dict[str, float]:
    """Measured bf16/fp16 matmul peak (TFLOP/s) and device copy bandwidth (GB/s, read + write)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b), reps, 5, flush)
    peak = 2 * n ** 3 / (ms * 1e-3) / 1e12
    src = torch.empty(2 ** 30, dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms_copy = time_ms(lambda: dst.copy_(src), reps, 5, flush)
    bw = 2 * src.numel() / (ms_copy * 1e-3) / 1e9
    del a, b, src, dst
    return {"matmul_tflops": peak, "copy_gbps": bw}


# ----------------------------------------------------------------------------- cases
class Case:
    """One op at one shape: named peers (callables), and its work in FLOPs or bytes."""

    def __init__(self, op: str, shape: dict, peers: Dict[str, Callable[[], object]],
                 flops: float = 0.0, bytes_moved: float = 0.0):
        self.op, self.shape, self.peers, self.flops, self.bytes = op, shape, peers, flops, bytes_moved


def _compiled(fn, enabled: bool, mode: Optional[str] = None):
    import torch

    return torch.compile(fn, mode=mode, dynamic=False) if enabled else None


def build_cases(config: str, batch: int, ops: List[str], device, dtype, use_compile: bool) -> List[Case]:
    """The per-op cases of ``config`` at ``batch`` (random inputs and weights)."""
    import torch
    import torch.nn.functional as F

    from duodiff_fast import dispatch
    from duodiff_fast.models import get_config

    cfg = get_config(config)
    d, heads = cfg["embed_dim"], cfg["num_heads"]
    p, c, img = cfg["patch_size"], cfg["in_chans"], cfg["img_size"]
    extras = 2 if cfg["num_classes"] > 0 else 1
    n = extras + (img // p) ** 2
    m = batch * n
    hidden = int(d * cfg["mlp_ratio"])
    elt = torch.finfo(dtype).bits // 8
    shape = dict(config=config, batch=batch, tokens=n, width=d, heads=heads)

    def r(*s, scale=1.0):
        return torch.randn(*s, device=device, dtype=dtype) * scale

    x, res = r(batch, n, d), r(batch, n, d)
    lw, lb = torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype)
    cases = []
    peers_c = (lambda f: _compiled(f, use_compile))

    def add(op, peers, flops=0.0, nbytes=0.0):
        if op in ops:
            cases.append(Case(op, shape, {k: v for k, v in peers.items() if v is not None}, flops, nbytes))

    ln_eager = lambda t: F.layer_norm(t, (d,), lw, lb, 1e-6)  # noqa: E731
    ln_c = peers_c(ln_eager)
    add("layernorm", {"triton": lambda: dispatch.layernorm(x, lw, lb, 1e-6), "eager": lambda: ln_eager(x),
                      "torch.compile": (lambda: ln_c(x)) if ln_c else None}, nbytes=2 * m * d * elt)
    addln = lambda a, b: (F.layer_norm(a + b, (d,), lw, lb, 1e-6), a + b)  # noqa: E731
    addln_c = peers_c(addln)
    add("add_layernorm", {"triton": lambda: dispatch.add_layernorm(x, res, lw, lb, 1e-6),
                          "eager": lambda: addln(x, res),
                          "torch.compile": (lambda: addln_c(x, res)) if addln_c else None},
        nbytes=4 * m * d * elt)

    def linear_case(op, k, nout, gelu=False, residual=False, two=False):
        a = r(batch, n, k)
        a2 = r(batch, n, k) if two else None
        w = r(nout, 2 * k if two else k, scale=0.02)
        b = r(nout)
        rr = r(batch, n, nout) if residual else None

        def eager():
            inp = torch.cat([a, a2], -1) if two else a
            y = F.linear(inp, w, b)
            y = F.gelu(y) if gelu else y
            return rr + y if residual else y

        comp = peers_c(eager)
        flops = 2 * m * nout * (2 * k if two else k)

        add(op, {"triton": lambda: dispatch.linear(a, w, b, rr, a2, gelu), "cublas+torch": eager,
                 "torch.compile": comp if comp else None}, flops=flops)

    linear_case("qkv", d, 3 * d)
    linear_case("proj_residual", d, d, residual=True)
    linear_case("fc1_gelu", d, hidden, gelu=True)
    linear_case("fc2_residual", hidden, d, residual=True)
    linear_case("skip_linear", d, d, two=True)

    if "attention" in ops:
        qkv = r(batch, n, 3 * d)
        dh = d // heads
        q, k, v = qkv.reshape(batch, n, 3, heads, dh).permute(2, 0, 3, 1, 4).contiguous().unbind(0)

        def math_attn():
            return ((q @ k.transpose(-1, -2)) * dh ** -0.5).softmax(-1) @ v

        peers = {"triton": lambda: dispatch.attention_qkv(qkv, heads, dh ** -0.5),
                 # SDPA given its preferred (B, H, N, Dh) layout, the permute not timed
                 "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                 "eager-math": math_attn}
        if use_compile:
            peers["torch.compile"] = _compiled(math_attn, True)
        try:
            from flash_attn import flash_attn_qkvpacked_func

            packed = qkv.reshape(batch, n, 3, heads, dh)
            peers["flash-attn"] = lambda: flash_attn_qkvpacked_func(packed)
        except Exception as exc:  # noqa: BLE001 - not installed (or no wheel for this torch): said, not hidden
            print(f"attention peer flash-attn skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        add("attention", peers, flops=4 * batch * heads * n * n * dh)

    if "frontend" in ops or "final_layer" in ops:
        from duodiff_fast.models.fused import fused_embed
        from duodiff_fast.models.uvit import UViT

        model = UViT(**dict(cfg, depth=0)).to(device, dtype).eval().requires_grad_(False)
        images = r(batch, c, img, img)
        t = torch.rand(batch, device=device) * 999
        y = torch.randint(0, max(cfg["num_classes"] - 1, 1), (batch,), device=device) if extras == 2 else None
        emb_c = peers_c(model.embed)
        add("frontend", {"triton": lambda: fused_embed(model, images, t, y),
                         "eager": lambda: model.embed(images, t, y),
                         "torch.compile": (lambda: emb_c(images, t, y)) if emb_c else None},
            nbytes=(images.numel() + 2 * m * d) * elt)
        tokens = r(batch, n, d)
        dec = lambda tok: model.decoder_pred(model.norm(tok))[:, extras:]  # noqa: E731
        from duodiff_fast.models.uvit import unpatchify

        dec_full = lambda tok: unpatchify(dec(tok), c)  # noqa: E731
        dec_c = peers_c(dec_full)
        add("final_layer", {"triton": lambda: dispatch.final_layer(tokens, model.norm.weight, model.norm.bias,
                                                                   model.norm.eps, model.decoder_pred.weight,
                                                                   model.decoder_pred.bias, extras, c),
                            "eager": lambda: dec_full(tokens),
                            "torch.compile": (lambda: dec_c(tokens)) if dec_c else None},
            nbytes=(m * d + images.numel()) * elt)
    return cases


def forward_flops(cfg: dict, batch: int) -> float:
    """Matmul + attention FLOPs of one U-ViT forward (the tiny rest is ignored)."""
    d = cfg["embed_dim"]
    extras = 2 if cfg["num_classes"] > 0 else 1
    n = extras + (cfg["img_size"] // cfg["patch_size"]) ** 2
    hidden = int(d * cfg["mlp_ratio"])
    layers = cfg["depth"] + 1
    per_layer = 2 * n * d * (3 * d + d + 2 * hidden) + 4 * n * n * d
    skips = cfg["depth"] // 2 * 2 * n * (2 * d) * d
    io = 2 * n * d * cfg["in_chans"] * cfg["patch_size"] ** 2 * 2
    return float(batch * (layers * per_layer + skips + io))


def build_forward_cases(config: str, batch: int, device, dtype, use_compile: bool,
                        compile_mode: Optional[str] = "max-autotune-no-cudagraphs") -> List[Case]:
    import torch

    from duodiff_fast import dispatch
    from duodiff_fast.backends import prepare_model
    from duodiff_fast.models import create_model, get_config

    torch.manual_seed(0)
    model = create_model(config).to(device)
    fused = prepare_model(model, "triton")
    eager = prepare_model(model, "eager-bf16")
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device=device, dtype=torch.bfloat16)
    t = torch.rand(batch, device=device) * 999
    y = torch.randint(0, model.num_classes - 1, (batch,), device=device) if model.is_conditional else None

    def fused_with(impl):
        def run():
            dispatch.set_matmul(impl)
            try:
                return fused(x, t, y)
            finally:
                dispatch.set_matmul("triton")
        return run

    peers = {"triton": fused_with("triton"), "triton+cublas": fused_with("cublas"), "eager-bf16": lambda: eager(x, t, y)}
    if use_compile:
        mode = None if compile_mode in (None, "default") else compile_mode
        comp = prepare_model(model, "torch.compile", compile_mode=mode)
        peers[f"torch.compile({mode or 'default'})"] = lambda: comp(x, t, y)
    shape = dict(config=config, batch=batch)
    return [Case("forward", shape, peers, flops=forward_flops(get_config(config), batch))]


# ----------------------------------------------------------------------------- main
def _split(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def smoke(args) -> int:
    """Run every case once at tiny shapes (no timing): checks the harness on any machine."""
    import torch

    from duodiff_fast import dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = dispatch.triton_unavailable_reason(device)
    if reason:
        print(f"smoke test needs runnable Triton kernels: {reason}")
        return 0
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ops = _split(args.ops)
    count = 0
    with torch.no_grad():
        for case in build_cases("tiny-cond", 1, [o for o in ops if o != "forward"], device, dtype, False):
            for name, fn in case.peers.items():
                fn()
                count += 1
        if "forward" in ops:
            for case in build_forward_cases("tiny-cond", 1, device, dtype, False):
                for name, fn in case.peers.items():
                    if device.type == "cpu" and name == "eager-bf16":
                        continue
                    fn()
                    count += 1
    print(f"smoke: ran {count} peer calls OK on {device.type}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke(args)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device (none found): nothing measured, nothing written.")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from duodiff_fast import dispatch
    from duodiff_fast.bench.common import environment, results_path
    from duodiff_fast.io_utils import atomic_write_json

    device = torch.device("cuda")
    reason = dispatch.triton_unavailable_reason(device)
    if reason:
        print(f"Triton kernels cannot run here: {reason}")
        return 0
    dtype = getattr(torch, args.dtype)
    flush = _flush_buffer(device)
    roof = measure_rooflines(device, dtype, args.reps, flush)
    print(f"measured: {args.dtype} matmul peak {roof['matmul_tflops']:.1f} TFLOP/s, "
          f"copy bandwidth {roof['copy_gbps']:.0f} GB/s")
    use_compile = not args.no_compile
    rows = []
    import time

    start = time.perf_counter()
    with torch.no_grad():
        for config, batch, op_list in plan(args):
            spent = time.perf_counter() - start
            if args.budget and spent > args.budget:
                reason = f"budget of {args.budget:g} s spent ({spent:.0f} s) before this case started"
                for op in op_list:
                    rows.append(dict(op=op, shape=dict(config=config, batch=batch), flops=0.0, bytes=0.0,
                                     peers={}, skipped=reason))
                    print(f"{op:14s} config={config} batch={batch}: skipped: {reason}", flush=True)
                continue
            try:
                cases = (build_forward_cases(config, batch, device, dtype, use_compile, args.forward_compile_mode)
                         if op_list == ["forward"] else build_cases(config, batch, op_list, device, dtype, use_compile))
            except Exception as e:  # building the inputs failed: every op of the group says why
                for op in op_list:
                    rows.append(dict(op=op, shape=dict(config=config, batch=batch), flops=0.0, bytes=0.0,
                                     peers={}, error=f"{type(e).__name__}: {e}"[:300]))
                    print(f"{op:14s} config={config} batch={batch}: FAILED to build: {rows[-1]['error']}", flush=True)
                continue
            for case in cases:
                results = {}
                for name, fn in case.peers.items():
                    try:
                        ms = time_ms(fn, args.reps, args.warmup, flush)
                    except Exception as e:  # a peer that fails (e.g. compile error) is reported, not fatal
                        results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                        continue
                    entry = {"ms": ms}
                    if case.flops:
                        entry["tflops"] = case.flops / (ms * 1e-3) / 1e12
                        entry["fraction_of_matmul_peak"] = entry["tflops"] / roof["matmul_tflops"]
                    if case.bytes:
                        entry["gbps"] = case.bytes / (ms * 1e-3) / 1e9
                        entry["fraction_of_copy_bw"] = entry["gbps"] / roof["copy_gbps"]
                    results[name] = entry
                rows.append(dict(op=case.op, shape=case.shape, flops=case.flops, bytes=case.bytes,
                                 peers=results))
                _print_row(rows[-1])
    result = dict(benchmark="kernels", environment=environment(device), rooflines=roof,
                  settings=vars(args), rows=rows)
    out = results_path(args.results_dir, "kernels", device, args.dtype + (f"_{args.preset}" if args.preset else ""))
    atomic_write_json(out, result)
    print(f"\nwrote {out}")
    failed = sum(1 for r in rows if r.get("error") or any("error" in e for e in r["peers"].values()))
    if failed:
        print(f"{failed} case(s) had a failed peer or could not be built (see the rows above and the JSON)")
    return 1 if failed else 0


def _print_row(row: dict) -> None:
    shape = " ".join(f"{k}={v}" for k, v in row["shape"].items())
    parts = []
    for name, e in row["peers"].items():
        if "error" in e:
            parts.append(f"{name}: FAILED ({e['error'][:120]})")
            continue
        rate = (f"{e['tflops']:.0f}TF/s {100 * e['fraction_of_matmul_peak']:.0f}%pk" if "tflops" in e
                else f"{e['gbps']:.0f}GB/s {100 * e['fraction_of_copy_bw']:.0f}%bw")
        parts.append(f"{name} {e['ms']:.3f}ms {rate}")
    print(f"{row['op']:14s} {shape:60s} | " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
