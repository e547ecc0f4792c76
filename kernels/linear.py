"""Linear layers with fused epilogues, and the two-input linear of the U-ViT skip connection.

Reference: ``F.linear(x, W, b)`` followed by the epilogue, all in one kernel:

    activation="gelu"   F.gelu(F.linear(x, W, b))             (exact erf GELU: U-ViT's fc1)
    residual=r          r + F.linear(x, W, b)                  (attn.proj and fc2 + residual)
    x2=skip             F.linear(torch.cat([x, skip], -1), W, b)   (out-blocks' skip_linear)

The two-input form walks the K axis over ``x`` and then over ``skip`` against the matching
column halves of W, so the (M, 2D) concatenation is never written (no split-K, no extra pass).
Products accumulate in float32; the result is rounded once, to the output dtype, after the
epilogue (eager PyTorch rounds after the matmul and again after the GELU/add, so the fused
result is at least as accurate).

Matmul choice (cuBLAS vs this kernel): NOT MEASURED. This project has had no GPU; on a GPU the
16-bit kernel is autotuned over :data:`TUNING_CONFIGS` (a common starting set for sm_80/sm_90,
itself unmeasured), float32 (tests) uses fixed tiles. The fused
kernel saves one read+write of the (M, N) output per epilogue, which matters most for fc1
(N = 4D); which is faster on the bare matmul is unknown here. ``duodiff_fast.dispatch`` can run either
("triton" fused epilogues, the default the issue asks for, or "cublas" with the epilogues done by
the LayerNorm kernel's fused residual and PyTorch); ``benchmarks/kernels.py`` times both, and
its result should decide the default.
"""
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_dtype, dot_precision, dot_upcast, mma, interpreting


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _linear_kernel(
    a_ptr, a2_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K1, K2, stride_w,
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_a = offs_m.to(tl.int64)[:, None]
    rows_w = offs_n.to(tl.int64)[None, :] * stride_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + rows_a * K1 + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K1), other=0.0)
        w = tl.load(w_ptr + rows_w + kk[:, None], mask=(kk[:, None] < K1) & n_ok[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, UPCAST)
    if HAS_A2:
        # Second operand of the concatenation: columns K1 .. K1+K2 of W.
        for k0 in range(0, K2, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a2_ptr + rows_a * K2 + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K2), other=0.0)
            w = tl.load(w_ptr + rows_w + K1 + kk[:, None], mask=(kk[:, None] < K2) & n_ok[None, :], other=0.0)
            acc = mma(a, w, acc, PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_erf(acc)
    out_offs = rows_a * N + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(m: int, n: int, k: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) when not autotuning. Untuned defaults."""
    if interpreting():
        return 64, 128, 64, 4, 1  # the CPU interpreter: few, large programs run fastest
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    if m <= 64:
        return 64, 64, 64, 4, 4
    return 128, 128, 64, 8, 3


# Candidate tiles for 16-bit inputs on sm_80/sm_90, benchmarked by Triton's autotuner on the first
# call of each (M, N, K1, K2) and cached for the process. A common starting set, not a measured
# one (no GPU was available to this project when it was written). Tiles that do not fit the
# device's shared memory are skipped by the autotuner. The first call of a new shape must happen
# outside CUDA graph capture (warm up first); DUODIFF_TRITON_AUTOTUNE=0 uses :func:`_blocks`.
TUNING_CONFIGS = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (128, 128, 32, 4, 4),
]


def _autotune_enabled(dtype: torch.dtype) -> bool:
    return (not interpreting() and dtype != torch.float32
            and os.environ.get("DUODIFF_TRITON_AUTOTUNE", "1") != "0")


_linear_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                           num_warps=w, num_stages=st) for bm, bn, bk, w, st in TUNING_CONFIGS],
    key=["M", "N", "K1", "K2"],
)(_linear_kernel)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    x2: Optional[torch.Tensor] = None,
    blocks: Optional[Tuple[int, int, int, int, int]] = None,
) -> torch.Tensor:
    """``epilogue(cat[x, x2] @ weight^T + bias)`` in one kernel.

    Args:
        x: (..., K1) activations (float32, float16 or bfloat16).
        weight: (N, K1 + K2) in x's dtype (nn.Linear layout).
        bias: optional (N,).
        activation: None or "gelu" (exact, erf-based).
        residual: optional (..., N) added last.
        x2: optional (..., K2) second input, as if concatenated after x on the last axis.
        blocks: force (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) (tests, benchmarks);
            default: autotuned on a GPU for 16-bit inputs, else :func:`_blocks`.
    Returns:
        (..., N) in x's dtype.
    """
    check_dtype("x", x)
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if activation is not None and residual is not None:
        raise ValueError("one epilogue at a time: activation or residual")
    lead = x.shape[:-1]
    k1 = x.shape[-1]
    a = x.reshape(-1, k1).contiguous()
    m = a.shape[0]
    k2 = x2.shape[-1] if x2 is not None else 0
    a2 = x2.reshape(-1, k2).contiguous().to(x.dtype) if x2 is not None else a
    n = weight.shape[0]
    if weight.shape[1] != k1 + k2:
        raise ValueError(f"weight has {weight.shape[1]} input features, inputs give {k1 + k2}")
    w = weight.contiguous().to(x.dtype)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    res = residual.reshape(m, n).contiguous() if residual is not None else out
    args = (a, a2, w, bias if bias is not None else w, res, out, m, n, k1, k2, w.stride(0))
    flags = dict(HAS_A2=x2 is not None, HAS_BIAS=bias is not None, GELU=activation == "gelu",
                 HAS_RES=residual is not None, PRECISION=dot_precision(x.dtype), UPCAST=dot_upcast(x.dtype))
    if blocks is None and _autotune_enabled(x.dtype):
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _linear_kernel_tuned[grid](*args, **flags)
    else:
        bm, bn, bk, warps, stages = blocks or _blocks(m, n, k1 + k2, x.dtype)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _linear_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                             num_warps=warps, num_stages=stages)
    return out.reshape(*lead, n)


def linear_reference(x, weight, bias=None, activation=None, residual=None, x2=None):
    """The eager PyTorch computation :func:`linear` matches."""
    if x2 is not None:
        x = torch.cat([x, x2], dim=-1)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = residual + y
    return y
