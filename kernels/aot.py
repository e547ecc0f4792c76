"""Ahead-of-time sm_90 compile check of every Triton kernel launch: no GPU and no driver needed.

    python -m duodiff_fast.kernels.aot                    # the full matrix (see below), a table
    python -m duodiff_fast.kernels.aot --workloads H/2 --batches 256 --dtypes bf16 --jobs 2

For each workload (U-ViT and DiT widths, heads and token counts below), batch (1, 256) and dtype
(bfloat16, float16) it asks each launcher's planning function (``*_launch`` in this package, the
same pure functions the launchers call) for the launches it would make, every linear tuning
candidate included, and compiles each distinct one with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``. Triton's bundled ptxas needs no driver. The check fails (exit
status 1) on a compile error, on any register spill, or on shared memory above sm_90's 227 KiB per
block, and prints one row per compiled kernel: registers, spill bytes, shared memory and the
tensor-core instruction its dots use (wgmma, or the older mma.sync).

Register and spill counts come from ptxas's own ``-v`` log of the compile (Triton prints it with
``TRITON_DUMP_PTXAS_LOG=1``; ``TRITON_ALWAYS_COMPILE=1`` makes every compile run ptxas even when
Triton's cache holds the kernel); shared memory from the compiled kernel's metadata (what a launch
allocates). Works with the Triton 3.6 and 3.8 APIs. Run it without ``TRITON_INTERPRET``.

The workloads are the check's input, not model knowledge of the kernels: they name the shapes a
U-ViT or DiT forward passes to the launchers.
"""
import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

SM90_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.int64: "i64", torch.int32: "i32"}


@dataclasses.dataclass(frozen=True)
class Workload:
    """Shapes of one U-ViT as its forward calls the kernels."""
    name: str
    width: int
    heads: int
    img: int        # input side (pixels or latent cells)
    patch: int
    channels: int
    labels: bool    # class-conditional: a label token besides the time token
    qkv_bias: bool = False
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        return (2 if self.labels else 1) + (self.img // self.patch) ** 2


@dataclasses.dataclass(frozen=True)
class DiTWorkload:
    """Shapes of one DiT as its forward calls the kernels: patch tokens only, adaLN-Zero blocks
    (norms without affine, eps 1e-6), qkv bias, tanh-GELU MLP, learned sigma (2C outputs)."""
    name: str
    width: int
    heads: int
    img: int        # latent side
    patch: int
    channels: int
    mlp_ratio: int = 4
    eps: float = 1e-6

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2


WORKLOADS: Tuple[object, ...] = (
    Workload("S/2", 512, 8, 32, 2, 3, False),      # CIFAR-10 32x32: 256 + 1 tokens
    Workload("M/4", 768, 12, 64, 4, 3, True),      # ImageNet 64x64: 256 + 2
    Workload("L/2", 1024, 16, 32, 2, 4, True),     # ImageNet 256 latent 32x32x4: 256 + 2
    Workload("H/2", 1152, 16, 32, 2, 4, True),     # same, head dim 72
    DiTWorkload("DiT-XL/2", 1152, 16, 32, 2, 4),   # ImageNet 256 latent 32x32x4: 256 tokens, head dim 72
)
BATCHES = (1, 256)
FAMILIES = ("frontend", "layernorm", "linear", "attention", "final_layer")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _modules():
    """The kernel modules (importlib: the package re-exports functions under the same names)."""
    import importlib

    return [importlib.import_module(f"{__package__}.{m}")
            for m in ("attention", "final_layer", "frontend", "layernorm", "linear")]


def dit_launches(w: DiTWorkload, batch: int, dtype: torch.dtype) -> Iterator[Tuple[str, str, object]]:
    """(family, what, Launch) for the kernels of one DiT forward's blocks and final layer (the patch
    embedding and the B-row condition MLPs run in PyTorch). The modulation vectors are the chunks
    of the (B, 6D) / (B, 2D) adaLN outputs in the model dtype."""
    attention, _, _, layernorm, linear = _modules()
    d, n = w.width, w.tokens
    m, mlp = batch * n, w.mlp_ratio * d
    yield "layernorm", "adaLN norm (block)", layernorm.adaln_layernorm_launch(
        m, d, n, dtype, w.eps, (dtype, dtype), (6 * d, 6 * d))
    yield "layernorm", "adaLN norm (final)", layernorm.adaln_layernorm_launch(
        m, d, n, dtype, w.eps, (dtype, dtype), (2 * d, 2 * d))
    out = w.patch * w.patch * 2 * w.channels
    layers = (  # (name, n_out, k, gelu_tanh, gated residual)
        ("qkv", 3 * d, d, False, False),
        ("proj+gate*res", d, d, False, True),
        ("fc1+gelu_tanh", mlp, d, True, False),
        ("fc2+gate*res", d, mlp, False, True),
        ("final linear", out, d, False, False),
    )
    for name, n_out, k, tanh, gated in layers:
        for cfg in linear.candidate_configs(m, dtype, interpret=False, gelu=tanh, residual=gated):
            yield "linear", name, linear.linear_launch(
                m, n_out, k, 0, dtype, bias=True, gelu=False, gelu_tanh=tanh, residual=gated, gate=gated,
                gate_rows=n, gate_stride=6 * d, config=cfg, interpret=False)
    yield "attention", f"{w.heads} heads x {d // w.heads}", attention.attention_launch(
        batch, n, w.heads, d // w.heads, dtype, (d // w.heads) ** -0.5, interpret=False)


def workload_launches(w, batch: int, dtype: torch.dtype) -> Iterator[Tuple[str, str, object]]:
    """(kernel family, what it computes, Launch) for every launch of one forward, every tuning
    candidate of each linear included. GPU plans (``interpret=False``) whatever the environment."""
    if isinstance(w, DiTWorkload):
        yield from dit_launches(w, batch, dtype)
        return
    attention, final_layer, frontend, layernorm, linear = _modules()

    d, m, n = w.width, batch * w.tokens, w.tokens
    mlp = 4 * d
    # Pointer dtypes as the fused forward passes them: images, conv weight, bias, pos_embed in the
    # model dtype, the time token in float32, the label table (or the weight in its place), then y
    # (int64), or the time token again when there are no labels.
    dt = [dtype] * 4 + [torch.float32, dtype, torch.int64 if w.labels else torch.float32]
    yield "frontend", "patch embed + tokens", frontend.frontend_launch(
        batch, w.channels, w.img, w.patch, d, w.labels, dt, interpret=False)
    for res in (False, True):
        yield "layernorm", "add+norm" if res else "norm", layernorm.layernorm_launch(
            m, d, dtype, res, w.eps, (dtype, dtype))
    layers = (  # (name, n_out, k1, k2, bias, gelu, residual)
        ("qkv", 3 * d, d, 0, w.qkv_bias, False, False),
        ("proj+res", d, d, 0, True, False, True),
        ("fc1+gelu", mlp, d, 0, True, True, False),
        ("fc2+res", d, mlp, 0, True, False, True),
        ("skip(x2)", d, d, d, True, False, False),
    )
    for name, n_out, k1, k2, bias, gelu, res in layers:
        for cfg in linear.candidate_configs(m, dtype, interpret=False, gelu=gelu, residual=res):
            yield "linear", name, linear.linear_launch(m, n_out, k1, k2, dtype, bias=bias, gelu=gelu,
                                                       residual=res, config=cfg, interpret=False)
    yield "attention", f"{w.heads} heads x {d // w.heads}", attention.attention_launch(
        batch, n, w.heads, d // w.heads, dtype, (d // w.heads) ** -0.5, interpret=False)
    out = w.patch * w.patch * w.channels
    yield "final_layer", "norm + pred + unpatchify", final_layer.final_layer_launch(
        batch, n, d, out, w.channels, 2 if w.labels else 1, w.eps, [dtype] * 5, interpret=False)


def _specialize(value) -> Tuple[str, Optional[object], bool]:
    """(signature type, constexpr value or None, divisible by 16) the way Triton's JIT specializes
    a scalar argument: the integer 1 becomes a constant, multiples of 16 get a divisibility hint."""
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot specialize scalar {value!r}")


def compile_spec(lch) -> Tuple[str, Dict[str, str], Dict[str, object], Dict[tuple, list], int, int]:
    """(kernel name, signature, constexprs, attrs, warps, stages) that reproduce a launch's compile."""
    fn = lch.kernel
    names = list(fn.arg_names)
    cx = dict(lch.constexprs)
    n_ptr, n_sc = len(lch.pointers), len(lch.scalars)
    if names[n_ptr + n_sc:] != list(cx) or len(names) != n_ptr + n_sc + len(cx):
        raise ValueError(f"{fn.__name__}: launch does not match the kernel's arguments {names}")
    sig: Dict[str, str] = {}
    attrs: Dict[tuple, list] = {}
    constexprs: Dict[str, object] = {}
    for i, (name, dt) in enumerate(zip(names, lch.pointers)):
        sig[name] = "*" + _TRITON_TYPES[dt]
        attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
    for i, (name, value) in enumerate(zip(names[n_ptr:], lch.scalars), start=n_ptr):
        kind, const, div16 = _specialize(value)
        sig[name] = kind
        if const is not None:
            constexprs[name] = const
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in cx.items():
        sig[name] = "constexpr"
        constexprs[name] = value
    return fn.__name__, sig, constexprs, attrs, lch.num_warps, lch.num_stages


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90(lch) -> Dict[str, object]:
    """Compile one launch for sm_90; the resource figures as a dict (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, sig, constexprs, attrs, warps, stages = compile_spec(lch)
    src = ASTSource(lch.kernel, sig, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    text = log.getvalue()
    regs = [int(r) for r in _REGS.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    if not regs or not spills:
        raise RuntimeError(f"{name}: no ptxas -v figures in Triton's log (TRITON_DUMP_PTXAS_LOG unsupported?):\n"
                           f"{text[-2000:]}")
    ptx = ck.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "-")
    return dict(regs=max(regs), spill_bytes=max(spills), shared=int(ck.metadata.shared), mma=mma)


def _key(lch) -> str:
    name, sig, constexprs, attrs, warps, stages = compile_spec(lch)
    return repr((name, sorted(sig.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted(attrs.items()), warps, stages))


_ITEMS: List[Tuple[str, object]] = []  # (key, launch) for forked workers (kernels do not pickle)


def _worker(index: int):
    key, lch = _ITEMS[index]
    t0 = time.time()
    try:
        res = compile_sm90(lch)
        res["error"] = None
    except Exception as e:  # reported as a failure row, never dropped
        res = dict(regs=None, spill_bytes=None, shared=None, mma=None, error=f"{type(e).__name__}: {e}")
    res["seconds"] = round(time.time() - t0, 1)
    return key, res


def collect(workloads: Sequence[Workload], batches: Sequence[int], dtypes: Sequence[torch.dtype],
            kernels: Optional[Sequence[str]] = None):
    """{compile key: (launch, [uses])}: each distinct compilation once, with where it is used
    (only the kernel families in ``kernels`` when given)."""
    found: Dict[str, Tuple[object, List[str]]] = {}
    for w in workloads:
        for b in batches:
            for dt in dtypes:
                for family, what, lch in workload_launches(w, b, dt):
                    if kernels and family not in kernels:
                        continue
                    use = f"{w.name} b{b} {_TRITON_TYPES[dt]} {family} {what}"
                    found.setdefault(_key(lch), (lch, []))[1].append(use)
    return found


def run_check(workloads, batches, dtypes, jobs: int = 1, kernels=None) -> List[Dict[str, object]]:
    """Compile everything (or the families in ``kernels``); one row per distinct compilation."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    found = collect(workloads, batches, dtypes, kernels)
    _ITEMS[:] = [(k, lch) for k, (lch, _) in found.items()]
    results = {}

    def progress(done):
        for key, res in done:
            results[key] = res
            print(f"\r[{len(results)}/{len(_ITEMS)}] compiled", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

    if jobs > 1:
        import multiprocessing

        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            progress(pool.map(_worker, range(len(_ITEMS))))
    else:
        progress(map(_worker, range(len(_ITEMS))))
    rows = []
    for key, (lch, uses) in found.items():
        res = results[key]
        flags = " ".join(k for k, v in lch.constexprs if v is True)
        problems = []
        if res["error"]:
            problems.append(res["error"])
        else:
            if res["spill_bytes"]:
                problems.append(f"spills {res['spill_bytes']} bytes")
            if res["shared"] > SM90_SMEM_LIMIT:
                problems.append(f"shared memory {res['shared']} > {SM90_SMEM_LIMIT}")
        rows.append(dict(kernel=lch.kernel.__name__.strip("_"), config=lch.describe(), flags=flags,
                         dtype=_TRITON_TYPES[lch.pointers[0]], uses=uses, problems=problems, **res))
    rows.sort(key=lambda r: (r["kernel"], r["config"], r["flags"], r["dtype"]))
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    head = f"{'kernel':<16} {'config':<52} {'flags':<22} {'dt':<4} {'regs':>4} {'spill':>5} {'smem':>7} " \
           f"{'mma':<8} {'uses':>4}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda v: "?" if v is None else str(v)  # noqa: E731
        lines.append(f"{r['kernel']:<16} {r['config']:<52} {r['flags']:<22} {r['dtype']:<4} {fmt(r['regs']):>4} "
                     f"{fmt(r['spill_bytes']):>5} {fmt(r['shared']):>7} {fmt(r['mma']):<8} {len(r['uses']):>4}  "
                     f"{'; '.join(r['problems']) or 'ok'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m duodiff_fast.kernels.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                    help="comma-separated subset of " + ", ".join(w.name for w in WORKLOADS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--kernels", default="", help="comma-separated subset of " + ", ".join(FAMILIES))
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--plan-only", action="store_true",
                    help="plan and check every launch's compile arguments, compile nothing (seconds)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot compiles GPU code: run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    by_name = {w.name: w for w in WORKLOADS}
    try:
        workloads = [by_name[n] for n in args.workloads.split(",")]
        dtypes = [DTYPES[n] for n in args.dtypes.split(",")]
    except KeyError as e:
        ap.error(f"unknown workload or dtype {e}")
    batches = [int(b) for b in args.batches.split(",")]
    kernels = [k for k in args.kernels.split(",") if k]
    if set(kernels) - set(FAMILIES):
        ap.error(f"unknown kernel family in {args.kernels!r}; known: {', '.join(FAMILIES)}")
    t0 = time.time()
    if args.plan_only:
        found = collect(workloads, batches, dtypes, kernels)
        uses = sum(len(u) for _, u in found.values())
        print(f"{uses} launches planned, {len(found)} distinct sm_90 compilations")
        return 0
    import triton

    rows = run_check(workloads, batches, dtypes, jobs=max(1, args.jobs), kernels=kernels)
    print(format_table(rows))
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} distinct sm_90 compilations with Triton {triton.__version__} in {time.time() - t0:.0f}s: "
          f"{len(bad)} failing (spill, shared memory or compile error)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
