"""Linear layers with fused epilogues, and the two-input linear of the U-ViT skip connection.

Reference: ``F.linear(x, W, b)`` followed by the epilogue, all in one kernel:

    activation="gelu"        F.gelu(F.linear(x, W, b))         (exact erf GELU: U-ViT's fc1)
    activation="gelu_tanh"   F.gelu(F.linear(x, W, b), approximate="tanh")   (DiT's fc1)
    residual=r               r + F.linear(x, W, b)             (attn.proj and fc2 + residual)
    residual=r, gate=g       r + g[:, None, :] * F.linear(x, W, b)   (DiT's adaLN-Zero gated
                             residual: x (B, N, K), g (B, N_out) one gate row per sample)
    x2=skip                  F.linear(torch.cat([x, skip], -1), W, b)   (out-blocks' skip_linear)

The two-input form walks the K axis over ``x`` and then over ``skip`` against the matching
column halves of W, so the (M, 2D) concatenation is never written (no split-K, no extra pass).
Products accumulate in float32; the result is rounded once, to the output dtype, after the
epilogue (eager PyTorch rounds after the matmul and again after the GELU/add, so the fused
result is at least as accurate).

Matmul choice (cuBLAS vs this kernel): NOT MEASURED. This project has had no GPU; on a GPU the
16-bit kernel is tuned over :data:`TUNING_CONFIGS` (spill-free on sm_90 by ``kernels.aot``, speed
unmeasured) once per shape bucket (see :func:`tune`), float32 (tests) uses fixed tiles. The fused
kernel saves one read+write of the (M, N) output per epilogue, which matters most for fc1
(N = 4D); which is faster on the bare matmul is unknown here. ``duodiff_fast.dispatch`` can run either
("triton" fused epilogues, the default the issue asks for, or "cublas" with the epilogues done by
the LayerNorm kernel's fused residual and PyTorch); ``benchmarks/kernels.py`` times both, and
its result should decide the default.
"""
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._common import Launch, check_dtype, dot_precision, dot_upcast, interpreting, launch, mma


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): one exp2 and no
    # tanh (not in every Triton's tl.math); exp2 overflowing to inf gives the exact limit 0.
    u2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)            # 2u
    return x / (1.0 + tl.exp2(-1.4426950408889634 * u2))


@triton.jit
def _linear_kernel(
    a_ptr, a2_ptr, w_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr,
    M, N, K1, K2, stride_w, GATE_ROWS, stride_gate,
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GELU_TANH: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-tiles share each W column-tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # The tile origin is one 64-bit scalar per operand; offsets inside a tile are int32
    # (BLOCK x row length < 2^31). 2-D int64 offset tensors held the (BLOCK_M, BLOCK_N) epilogue
    # at twice the registers and made the wide tiles spill on sm_90 (see kernels/README.md).
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - row0
    n_ok = rn < N - col0
    a_tile = a_ptr + row0.to(tl.int64) * K1
    w_tile = w_ptr + col0.to(tl.int64) * stride_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_tile + rm[:, None] * K1 + rk[None, :]
    w_ptrs = w_tile + rn[None, :] * stride_w + rk[:, None]
    for k0 in range(0, K1, BLOCK_K):
        k_ok = rk < K1 - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_A2:
        # Second operand of the concatenation: columns K1 .. K1+K2 of W.
        a2_ptrs = a2_ptr + row0.to(tl.int64) * K2 + rm[:, None] * K2 + rk[None, :]
        w2_ptrs = w_tile + K1 + rn[None, :] * stride_w + rk[:, None]
        for k0 in range(0, K2, BLOCK_K):
            k_ok = rk < K2 - k0
            a = tl.load(a2_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(a, w, acc, PRECISION, UPCAST)
            a2_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + col0 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_erf(acc)
    if GELU_TANH:
        acc = _gelu_tanh(acc)
    out_offs = rm[:, None] * N + rn[None, :]
    tile0 = row0.to(tl.int64) * N + col0
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_GATE:
        # Row r of the output belongs to sample r // GATE_ROWS: scale by that sample's gate row.
        sample = (row0 + rm) // GATE_ROWS
        gate = tl.load(gate_ptr + sample[:, None] * stride_gate + (col0 + rn)[None, :], mask=mask, other=0.0)
        acc = acc * gate.to(tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + tile0 + out_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tile0 + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
Config = Tuple[int, int, int, int, int]

# Candidate tiles for 16-bit inputs on a GPU, tried by :func:`tune` once per shape bucket. Each one
# compiles for sm_90 without register spills and within shared memory for every epilogue
# (``python -m duodiff_fast.kernels.aot`` checks it); their speed is unmeasured (no GPU yet).
# Every tile is a multiple of 64 rows per warpgroup so the dots can use wgmma on sm_90.
TUNING_CONFIGS: List[Config] = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (128, 128, 32, 4, 4),
]


def default_config(m: int, dtype: torch.dtype, interpret: Optional[bool] = None) -> Config:
    """The tile used without tuning: float32, the interpreter, ``DUODIFF_TRITON_AUTOTUNE=0``, and a
    16-bit shape bucket first seen during CUDA-graph capture (untuned heuristic: small M gets the
    64x64 tile so more programs fill the GPU, large M the 128x128 one)."""
    if interpreting() if interpret is None else interpret:
        return 64, 128, 64, 4, 1  # the CPU interpreter: few, large programs run fastest
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    if m <= 64:
        return 64, 64, 64, 4, 4
    return 128, 128, 64, 8, 3


def autotune_enabled(dtype: torch.dtype, interpret: Optional[bool] = None) -> bool:
    """Whether 16-bit launches pick their tile by :func:`tune` (on a GPU, unless disabled)."""
    return (not (interpreting() if interpret is None else interpret) and dtype != torch.float32
            and os.environ.get("DUODIFF_TRITON_AUTOTUNE", "1") != "0")


def acc_registers(config: Config) -> int:
    """float32 accumulator registers per thread of a tile: BLOCK_M * BLOCK_N / threads."""
    bm, bn, _, warps, _ = config
    return bm * bn // (32 * warps)


# A GELU or residual epilogue needs registers on top of the accumulator: on sm_90 every tile whose
# accumulator takes 128 registers per thread (128x256 and 256x128 with 8 warps, 128x128 with 4)
# spilled 72-216 bytes with them (ptxas, `python -m duodiff_fast.kernels.aot`), so those tiles
# are tried for the plain and two-input epilogues only.
HEAVY_EPILOGUE_MAX_ACC_REGS = 64


def candidate_configs(m: int, dtype: torch.dtype, interpret: Optional[bool] = None, *, gelu: bool = False,
                      residual: bool = False) -> List[Config]:
    """Every tile a launch of this (M, dtype, epilogue) may use: the tuning set when tuning (without
    the tiles that spill under a GELU/residual epilogue), plus the untuned default."""
    default = default_config(m, dtype, interpret)
    if not autotune_enabled(dtype, interpret):
        return [default]
    cands = list(TUNING_CONFIGS) + ([default] if default not in TUNING_CONFIGS else [])
    if gelu or residual:
        cands = [c for c in cands if acc_registers(c) <= HEAVY_EPILOGUE_MAX_ACC_REGS]
    return cands


def linear_launch(
    m: int, n: int, k1: int, k2: int, dtype: torch.dtype, *, bias: bool, gelu: bool, residual: bool,
    config: Config, interpret: Optional[bool] = None, gelu_tanh: bool = False, gate: bool = False,
    gate_rows: int = 1, gate_stride: int = 1,
) -> Launch:
    """The launch of ``epilogue(cat[x, x2] @ W^T + b)`` for x (m, k1), x2 (m, k2), W (n, k1 + k2).

    ``gate``: the gated residual ``res + g[row // gate_rows] * (...)`` with gate rows ``gate_stride``
    elements apart (6 * n for a chunk of DiT's (B, 6D) adaLN output); unused values are 1.
    """
    if gelu and gelu_tanh:
        raise ValueError("gelu and gelu_tanh are exclusive")
    if gate and not residual:
        raise ValueError("the gate scales the residual branch: gate needs residual")
    bm, bn, bk, warps, stages = config
    flags = dict(HAS_A2=k2 > 0, HAS_BIAS=bias, GELU=gelu, GELU_TANH=gelu_tanh, HAS_RES=residual, HAS_GATE=gate,
                 PRECISION=dot_precision(dtype, interpret), UPCAST=dot_upcast(dtype, interpret),
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    scalars = (m, n, k1, k2, k1 + k2, int(gate_rows) if gate else 1, int(gate_stride) if gate else 1)
    return launch(_linear_kernel, grid, [dtype] * 7, scalars, flags, warps, stages)


# ---- tuning: once per shape bucket, never during CUDA-graph capture ------------------------------
TuningKey = Tuple[int, int, int, int, str, bool, bool, bool, bool, bool, bool]

# Best tile per key, filled by :func:`tune` (explicitly, or on the first eager call of a bucket).
_TUNED: Dict[TuningKey, Config] = {}


def m_bucket(m: int) -> int:
    """Rows rounded up to a power of two (>= 16): shrinking or mixed batches reuse one tuning."""
    return max(16, triton.next_power_of_2(int(m)))


def tuning_key(m: int, n: int, k1: int, k2: int, dtype: torch.dtype, *, bias: bool, gelu: bool,
               residual: bool, gelu_tanh: bool = False, gate: bool = False) -> TuningKey:
    """(M bucket, N, K1, K2, dtype, bias, gelu, gelu_tanh, residual, gate, two-input): what a tuned
    tile is kept for. The epilogue flags are part of the key: they change the registers a tile
    needs and its speed."""
    return (m_bucket(m), int(n), int(k1), int(k2), str(dtype).replace("torch.", ""),
            bool(bias), bool(gelu), bool(gelu_tanh), bool(residual), bool(gate), k2 > 0)


def stream_capturing() -> bool:
    """True while the current CUDA stream records a graph (benchmarking would break the capture)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def select_config(key: TuningKey, m: int, dtype: torch.dtype, tuner: Callable[[], Config]) -> Config:
    """The tile for a launch: the bucket's tuned tile; else, while a stream is capturing, the
    untuned :func:`default_config` (no benchmark may run inside a capture); else ``tuner()``,
    which benchmarks the candidates now and is remembered for the bucket."""
    if key in _TUNED:
        return _TUNED[key]
    if stream_capturing():
        return default_config(m, dtype)
    cfg = tuner()
    _TUNED[key] = cfg
    return cfg


def tuned_configs() -> Dict[TuningKey, Config]:
    """A copy of the tuning table (key -> tile)."""
    return dict(_TUNED)


def clear_tuning() -> None:
    """Forget every tuned tile."""
    _TUNED.clear()


def _bench_ms(fn: Callable[[], None]) -> float:
    """Median milliseconds of ``fn`` on the GPU (Triton's CUDA-event benchmark)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


ACTIVATIONS = (None, "gelu", "gelu_tanh")


def _flags(bias, activation, residual, gate) -> Dict[str, bool]:
    """The epilogue keywords of :func:`linear_launch` / :func:`tuning_key` for a call."""
    return dict(bias=bias is not None, gelu=activation == "gelu", gelu_tanh=activation == "gelu_tanh",
                residual=residual is not None, gate=gate is not None)


def _prepare(x, weight, bias, activation, residual, x2, gate=None):
    """Validated, contiguous operands and the output: (tensors for the launch, m, n, k1, k2, lead).
    The gate (B, n) stays a strided row view when its columns are contiguous."""
    check_dtype("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
    if activation is not None and residual is not None:
        raise ValueError("one epilogue at a time: activation or residual")
    if gate is not None:
        if residual is None:
            raise ValueError("gate scales the residual branch (residual + gate * linear): pass residual too")
        if x.dim() != 3:
            raise ValueError(f"a gated linear takes x as (B, N, K), got shape {tuple(x.shape)}")
        if gate.dim() != 2 or gate.shape != (x.shape[0], weight.shape[0]):
            raise ValueError(f"gate must be (B, N_out) = ({x.shape[0]}, {weight.shape[0]}), got {tuple(gate.shape)}")
        check_dtype("gate", gate)
    lead = x.shape[:-1]
    k1 = x.shape[-1]
    a = x.reshape(-1, k1).contiguous()
    m = a.shape[0]
    k2 = x2.shape[-1] if x2 is not None else 0
    if x2 is not None and x2.shape[:-1] != lead:
        raise ValueError(f"x2 leading shape {tuple(x2.shape[:-1])} differs from x's {tuple(lead)}")
    a2 = x2.reshape(-1, k2).contiguous().to(x.dtype) if x2 is not None else a
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k1 + k2:
        raise ValueError(f"weight has {tuple(weight.shape)[1:]} input features, inputs give {k1 + k2}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    if residual is not None and residual.numel() != m * n:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {(*lead, n)}")
    w = weight.contiguous().to(x.dtype)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    res = residual.reshape(m, n).contiguous().to(x.dtype) if residual is not None else out
    b = bias.contiguous().to(x.dtype) if bias is not None else w
    g = out
    if gate is not None:
        g = gate.to(x.dtype)
        if g.stride(1) != 1:
            g = g.contiguous()
    return (a, a2, w, b, res, g, out), m, n, k1, k2, lead


def _gate_geometry(x, gate, tensors) -> Dict[str, int]:
    """gate_rows (tokens per sample) and the row stride of the prepared gate (1, 1 when ungated)."""
    if gate is None:
        return dict(gate_rows=1, gate_stride=1)
    return dict(gate_rows=x.shape[1], gate_stride=tensors[5].stride(0))


def tune(x, weight, bias=None, activation=None, residual=None, x2=None, gate=None) -> Config:
    """Benchmark every candidate tile on these operands and remember the fastest for their bucket.

    Call it ahead of CUDA-graph capture (a warm-up forward at each batch bucket does the same);
    arguments as :func:`linear`. Returns the chosen (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
    Raises when tuning does not apply (float32, the interpreter, or tuning disabled).
    """
    tensors, m, n, k1, k2, _ = _prepare(x, weight, bias, activation, residual, x2, gate)
    if stream_capturing():
        raise RuntimeError("kernels.linear.tune cannot benchmark while a CUDA graph is being captured")
    if not autotune_enabled(x.dtype):
        raise RuntimeError("tuning applies to float16/bfloat16 on a GPU with DUODIFF_TRITON_AUTOTUNE != 0")
    flags = _flags(bias, activation, residual, gate)
    key = tuning_key(m, n, k1, k2, x.dtype, **flags)
    timings = {}
    heavy = dict(gelu=flags["gelu"] or flags["gelu_tanh"], residual=flags["residual"])
    with _common.device_guard(x):  # the benchmark's events and synchronisations belong to x's device
        for cfg in candidate_configs(m, x.dtype, **heavy):
            lch = linear_launch(m, n, k1, k2, x.dtype, config=cfg, **flags, **_gate_geometry(x, gate, tensors))
            timings[cfg] = _bench_ms(lambda: lch.run(*tensors))
    best = min(timings, key=timings.get)
    _TUNED[key] = best
    return best


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    x2: Optional[torch.Tensor] = None,
    blocks: Optional[Config] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``epilogue(cat[x, x2] @ weight^T + bias)`` in one kernel.

    Args:
        x: (..., K1) activations (float32, float16 or bfloat16).
        weight: (N, K1 + K2) in x's dtype (nn.Linear layout).
        bias: optional (N,).
        activation: None, "gelu" (exact, erf-based) or "gelu_tanh" (the tanh approximation).
        residual: optional (..., N) added last.
        gate: optional (B, N) per-sample gate for x of shape (B, T, K): ``residual + gate[:, None, :]
            * (x @ weight^T + bias)`` (needs ``residual``); strided row views are read in place.
        x2: optional (..., K2) second input, as if concatenated after x on the last axis.
        blocks: force (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) (tests, benchmarks);
            default: on a GPU for 16-bit inputs the shape bucket's tuned tile (:func:`tune`,
            :func:`select_config`), else :func:`default_config`.
    Returns:
        (..., N) in x's dtype.
    """
    tensors, m, n, k1, k2, lead = _prepare(x, weight, bias, activation, residual, x2, gate)
    flags = _flags(bias, activation, residual, gate)
    if blocks is not None:
        cfg = tuple(blocks)
    elif autotune_enabled(x.dtype):
        key = tuning_key(m, n, k1, k2, x.dtype, **flags)
        cfg = select_config(key, m, x.dtype, lambda: tune(x, weight, bias, activation, residual, x2, gate))
    else:
        cfg = default_config(m, x.dtype)
    geometry = _gate_geometry(x, gate, tensors)
    linear_launch(m, n, k1, k2, x.dtype, config=cfg, **flags, **geometry).run(*tensors)
    return tensors[-1].reshape(*lead, n)


def linear_reference(x, weight, bias=None, activation=None, residual=None, x2=None, gate=None):
    """The eager PyTorch computation :func:`linear` matches."""
    if x2 is not None:
        x = torch.cat([x, x2], dim=-1)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if gate is not None:
        y = gate.unsqueeze(1) * y
    if residual is not None:
        y = residual + y
    return y
